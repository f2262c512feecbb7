"""Data-preparation benchmark: rows/s and peak memory of the data stage at growing sizes and process counts.

`peft-pipeline bench-data` (and `make bench-data`) generates alpaca JSONL files of N rows
(seeded, about 600 bytes a row like the 300 k-row file of issue 17), then prepares each one
in a fresh Python process, so every measurement starts cold:

  arrow      data.build_datasets: the Arrow build (raw table on disk, batched map over
             data.num_proc processes, cache written), the path `train` and `prepare` take;
  per-row    what the data stage did before it: load_examples + tokenize_examples (every row in
             Python lists, apply_chat_template and one tokenizer call per piece) + Dataset.from_dict.

Reported per run: wall time, rows/s, rows/s per process, and peak memory: the peak resident set
of the main process (getrusage) and of the whole process tree (main + tokenizing processes,
sampled every 50 ms with psutil), and the same two for anonymous memory only (RssAnon: RSS
less the pages of mapped files, which the kernel can reclaim). Tokens come from the embedded base's tokenizer (SmolLM2); no
model weights are loaded. Results go to docs/data-scale.md and a JSON file beside it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = ("order", "ship", "invoice", "customer", "warehouse", "parcel", "deliver", "refund", "address", "account",
         "report", "summary", "product", "price", "discount", "quarter", "market", "review", "support", "ticket",
         "the", "a", "of", "to", "and", "in", "for", "with", "on", "by", "from", "is", "was", "will", "be", "this")
TASKS = ("Summarize the following text.", "Translate the text into plain English.", "Classify the sentiment.",
         "Extract the key facts as a list.", "Rewrite the paragraph more formally.", "Answer the question briefly.")


def make_rows(n: int, seed: int = 0):
    """n alpaca rows, a pure function of (n, seed): instruction, an input of 0-80 words, an output of 20-120."""
    rng = random.Random(seed)
    for _ in range(n):
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731 - local shorthand
        yield {"instruction": rng.choice(TASKS), "input": words(rng.randint(0, 80)), "output": words(rng.randint(20, 120))}


def data_file(n: int, folder: Path) -> Path:
    """The generated file of n rows (written once, then reused)."""
    path = folder / f"alpaca-{n}.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for row in make_rows(n):
                f.write(json.dumps(row) + "\n")
        tmp.rename(path)
    return path


def run_one(path: str, mode: str, num_proc: int, max_length: int) -> dict[str, Any]:
    """Prepare one file in this process; the caller runs it in a fresh one."""
    import resource

    from peft_pipeline.config import DataSection, DataSource
    from peft_pipeline.data.template import load_tokenizer
    from peft_pipeline.paths import embedded_base_dir

    tokenizer = load_tokenizer(str(embedded_base_dir()))
    settings = DataSection(train=[DataSource(path=path)], num_proc=num_proc)
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as cache:
        start = time.perf_counter()
        if mode == "arrow":
            from peft_pipeline.data.build import build_datasets

            train, _, report = build_datasets(settings, tokenizer, max_length, 0, cache_root=Path(cache), progress=False)
            rows, tokens = len(train), report.tokens["train_total"]
        else:
            rows, tokens = _per_row(settings, tokenizer, max_length)
        seconds = time.perf_counter() - start
    return {"rows": rows, "tokens": tokens, "seconds": seconds,
            "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _per_row(settings, tokenizer, max_length) -> tuple[int, int]:
    # The data stage before the Arrow build: every row in Python lists, then one in-memory Dataset.
    from datasets import Dataset

    from peft_pipeline.data.build import DataReport, load_examples, tokenize_examples

    report = DataReport()
    examples = load_examples(settings.train, None, 0, report)
    columns = tokenize_examples(examples, tokenizer, settings, max_length, report, "train", progress=False)
    train = Dataset.from_dict(columns)
    return len(train), sum(len(x) for x in columns["input_ids"])


def measure(path: Path, mode: str, num_proc: int, max_length: int) -> dict[str, Any]:
    """run_one in a fresh interpreter, with the process tree's memory sampled from outside."""
    import psutil

    code = ("import json, sys; from peft_pipeline.tools.bench_data import run_one; "
            f"print(json.dumps(run_one({str(path)!r}, {mode!r}, {num_proc}, {max_length})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PEFT_PIPELINE_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = main_anon = tree_anon = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
            anon = [anon_bytes(p.pid) for p in tree]
            main_anon, tree_anon = max(main_anon, anon[0]), max(tree_anon, sum(anon))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench-data run failed ({mode}, {path.name}, {num_proc} proc):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({"mode": mode, "num_proc": num_proc, "file": path.name, "file_mb": path.stat().st_size / 2**20,
                   "tree_peak_mb": peak / 2**20, "main_anon_mb": main_anon / 2**20, "tree_anon_mb": tree_anon / 2**20,
                   "rows_per_s": result["rows"] / result["seconds"]})
    result["rows_per_s_per_proc"] = result["rows_per_s"] / num_proc
    return result


def anon_bytes(pid: int) -> int:
    """A process's anonymous resident memory (RssAnon): what it allocated, without the pages of files it maps.

    RSS also counts the touched pages of the memory-mapped Arrow files, which the kernel can drop at
    any time (they are the file cache); RssAnon is the memory that grows with the data if anything does.
    0 where /proc is not there (not Linux).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bench_data(sizes: list[int], procs: list[int], per_row_max: int, out: Path, folder: Path,
               max_length: int = 2048, progress: bool = True) -> list[dict[str, Any]]:
    """Every (size, processes) with the Arrow build, and the per-row path up to per_row_max rows; write the report."""
    results = []
    for n in sizes:
        path = data_file(n, folder)
        runs = [("per-row", 1)] if n <= per_row_max else []
        runs += [("arrow", p) for p in procs]
        for mode, p in runs:
            r = measure(path, mode, p, max_length)
            results.append(r)
            if progress:
                print(f"{n:>9,} rows  {mode:<8} {p} proc  {r['seconds']:8.1f} s  {r['rows_per_s']:8,.0f} rows/s  "
                      f"main peak {r['main_peak_mb']:7,.0f} MB  tree peak {r['tree_peak_mb']:7,.0f} MB  "
                      f"anon main {r['main_anon_mb']:7,.0f} MB  tree {r['tree_anon_mb']:7,.0f} MB", flush=True)
            out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    write_report(out, report_markdown(results))
    return results


BEGIN, END = "<!-- bench-data: begin (written by peft-pipeline bench-data) -->", "<!-- bench-data: end -->"


def write_report(out: Path, table: str) -> None:
    """Put the table between the markers of `out`, keeping the prose around it (a new file gets only the table)."""
    from peft_pipeline.report import env_lines

    block = f"{BEGIN}\n{table}\n" + "\n".join(f"    {line}" for line in env_lines()) + f"\n{END}"
    text = out.read_text() if out.is_file() else f"# Data preparation at scale\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + block + rest.split(END, 1)[1])


def report_markdown(results: list[dict[str, Any]]) -> str:
    """The measured table (docs/data-scale.md keeps its prose above a marker line and this below it)."""
    lines = ["| rows | file | path | processes | time | rows/s | rows/s per process | tokens | main peak RSS | tree peak RSS "
             "| main peak anon | tree peak anon |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['file_mb']:,.0f} MB | {r['mode']} | {r['num_proc']} | {r['seconds']:,.1f} s | "
                     f"{r['rows_per_s']:,.0f} | {r['rows_per_s_per_proc']:,.0f} | {r['tokens']:,} | "
                     f"{r['main_peak_mb']:,.0f} MB | {r['tree_peak_mb']:,.0f} MB | "
                     f"{r['main_anon_mb']:,.0f} MB | {r['tree_anon_mb']:,.0f} MB |")
    return "\n".join(lines) + "\n"
