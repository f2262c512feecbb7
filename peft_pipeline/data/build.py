"""Building the datasets of a run: sources mixed, split, tokenized, length-checked and cached.

build_datasets is the data stage's entry: (train, eval, DataReport), from the cache when the
files, tokenizer and settings are unchanged. Nothing here drops or cuts a row silently: the
report counts every dropped, truncated and duplicate example.

Memory does not grow with the data: rows go from the files into an Arrow table on disk (JSON
text and line numbers), are mixed and split as index arrays, then normalized, rendered and
tokenized by `Dataset.map` in batches over `data.num_proc` processes, into memory-mapped files.
load_examples + tokenize_examples are the same steps on Python lists, one row at a time: small
callers (eval --data, merge, bench) use them, and the tests check both paths give the same tokens.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_pipeline.config import DataSection, DataSource, ReplaySection
from peft_pipeline.data.formats import RawSource, Row, detect_format, normalize, parse_line, raw_source, read_source
from peft_pipeline.data.template import DATA_VERSION, ChatApply, Rendered, render_all, tokenize, tokenize_many
from peft_pipeline.errors import UserError
from peft_pipeline.paths import file_digest

REPLAY_BUNDLED = Path(__file__).resolve().parents[1] / "resources" / "replay-general.jsonl"  # data/make_replay.py writes it


@dataclass
class DataReport:
    """What happened to the data: counts that must never be silent."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    dropped_overlong: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    duplicates: int = 0
    tokens: dict[str, Any] = field(default_factory=dict)
    cache: str = ""

    def lines(self) -> list[str]:
        """Human summary, one fact per line."""
        out = [f"data: {'replay ' if s.get('replay') else ''}{s['path']} ({s['format']}): {s['rows']} rows -> {s['used']} used"
               for s in self.sources]
        out.append(f"data: {self.examples.get('train', 0)} train / {self.examples.get('eval', 0)} eval examples; "
                   f"{self.tokens.get('train_total', 0)} tokens, {self.tokens.get('train_trained', 0)} carry loss")
        if self.dropped_overlong or self.truncated:
            out.append(f"data: {self.dropped_overlong} dropped and {self.truncated} truncated as longer than max_length={self.tokens.get('max_length')}")
        if self.dropped_no_loss:
            out.append(f"data: {self.dropped_no_loss} dropped with no token left to learn from")
        if self.duplicates:
            out.append(f"data: {self.duplicates} duplicate examples in train (kept; dedupe the source if unintended)")
        out.append(f"data: cache {self.cache}")
        return out


def mix(src: DataSource, rows: list, seed: int) -> list:
    """A source's share of the mixture: max_samples (a seeded sample), then weight (a row multiplier)."""
    return [rows[i] for i in mix_indices(src, len(rows), seed)]


def mix_indices(src: DataSource, n: int, seed: int) -> list[int] | range:
    """mix() as row indices into a source of n rows (the same seeded draws), so rows can stay on disk."""
    rng = random.Random(f"{seed}:{src.path}")
    rows: list[int] | range = range(n)
    if src.max_samples and src.max_samples < n:
        rows = sorted(rng.sample(range(n), src.max_samples))
    whole, frac = int(src.weight), src.weight - int(src.weight)
    if whole == 1 and not frac:
        return rows
    mixed = list(rows) * whole
    if frac:
        mixed += [rows[i] for i in sorted(rng.sample(range(len(rows)), round(frac * len(rows))))]
    return mixed


def load_examples(sources: list[DataSource], system_prompt: str | None, seed: int, report: DataReport,
                  keep_fields: bool = False) -> list[dict]:
    """Read, normalize and mix sources (max_samples, then weight) into one list of examples."""
    examples: list[dict] = []
    for src in sources:
        rows = read_source(src)
        if not rows:
            raise UserError(f"{src.path}: no rows; the dataset is empty")
        fmt = src.format if src.format != "auto" else detect_format(rows[0].data.keys(), rows[0].data)
        normalized = [normalize(r, fmt, system_prompt, keep_fields) for r in rows]
        mixed = mix(src, normalized, seed)
        report.sources.append({"path": src.path, "format": fmt, "rows": len(rows), "used": len(mixed)})
        examples.extend(mixed)
    return examples


def tokenize_examples(examples: list[dict], tokenizer, settings: DataSection, max_length: int | None,
                      report: DataReport, split: str, progress: bool = True, kept: list[int] | None = None) -> dict[str, list]:
    """Render, tokenize and length-filter examples one by one; counts go into the report, kept rows' indices into `kept`."""
    from tqdm.auto import tqdm

    out: dict[str, list] = {"input_ids": [], "labels": []}
    seen: set[int] = set()
    limit = overlong_chars(tokenizer, max_length)
    for index, ex in enumerate(tqdm(examples, desc=f"Tokenizing {split}", disable=not progress, unit="ex")):
        for part, rendered in enumerate(render_all(ex, tokenizer, settings.train_on_prompt)):
            rendered, cut = precut(rendered, limit, settings.overlong)
            ids, labels = tokenize(rendered, tokenizer) if rendered is not None else ([], [])
            status, ids, labels = fit(rendered, ids, labels, cut, max_length, settings.overlong)
            if _count(report, status):
                continue
            if split == "train":
                key = example_key(ex, part)
                report.duplicates += key in seen
                seen.add(key)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            if kept is not None:
                kept.append(index)
    return out


KEPT, TRUNCATED, DROPPED_OVERLONG, DROPPED_NO_LOSS = 0, 1, 2, 3  # what fit() did with a sequence
# Cut to max_length and then left with no token to learn from (the answer was past the cut): counted
# as truncated and as dropped, as the report has always counted it.
TRUNCATED_NO_LOSS = 4


def precut(rendered: Rendered, limit: int | None, overlong: str) -> tuple[Rendered | None, bool]:
    """A text this long cannot fit in max_length tokens: drop it (None), or cut it, before tokenizing,
    so one huge row (a 50 MB line) costs no gigabytes of token offsets. Returns (rendered, cut)."""
    cut = limit is not None and len(rendered.text) > limit
    if cut and overlong == "drop":
        return None, True
    if cut:
        rendered = Rendered(rendered.text[:limit], [(s, min(e, limit)) for s, e in rendered.spans if s < limit],
                            rendered.add_special_tokens)
    return rendered, cut


def fit(rendered: Rendered | None, ids: list[int], labels: list[int], cut: bool, max_length: int | None,
        overlong: str) -> tuple[int, list[int], list[int]]:
    """(status, ids, labels) of a tokenized sequence under max_length and data.overlong."""
    if rendered is None:
        return DROPPED_OVERLONG, [], []
    status = KEPT
    if max_length and (cut or len(ids) > max_length):
        if overlong == "drop":
            return DROPPED_OVERLONG, [], []
        ids, labels, status = ids[:max_length], labels[:max_length], TRUNCATED
    if labels.count(-100) == len(labels):
        return (TRUNCATED_NO_LOSS if status == TRUNCATED else DROPPED_NO_LOSS), [], []
    return status, ids, labels


def _count(report: "DataReport", status: int) -> bool:
    """Count a sequence's fate in the report; True when it was dropped."""
    report.truncated += status in (TRUNCATED, TRUNCATED_NO_LOSS)
    report.dropped_overlong += status == DROPPED_OVERLONG
    report.dropped_no_loss += status in (DROPPED_NO_LOSS, TRUNCATED_NO_LOSS)
    return status in (DROPPED_OVERLONG, DROPPED_NO_LOSS, TRUNCATED_NO_LOSS)


def example_key(ex: dict, part: int = 0) -> int:
    """64 bits of the example's SHA-1 (and which of its sequences): duplicates counted in 8 bytes a row."""
    text = json.dumps(ex, sort_keys=True) + (f"#{part}" if part else "")
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big", signed=True)


def overlong_chars(tokenizer, max_length: int | None) -> int | None:
    """Characters beyond which a text surely has more than max_length tokens (None: no limit).

    No token covers more characters than its longest vocabulary string; doubled for normalizers.
    """
    if not max_length:
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return 2 * max(longest, 1) * max_length


def split_holdout(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split (seeded), used when no eval source is given."""
    held = set(held_out(len(examples), fraction, seed))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def held_out(n: int, fraction: float, seed: int) -> array.array:
    """The indices split_holdout holds out of n examples: the first fraction of a seeded shuffle.

    The shuffle runs on an 8-byte array, not a list of ints, so 3 M rows cost 24 MB, not 100.
    """
    if fraction <= 0:
        return array.array("q")
    order = array.array("q", range(n))
    random.Random(seed).shuffle(order)
    return order[: max(1, round(n * fraction))]


def fingerprint(settings: DataSection, tokenizer, max_length: int | None, seed: int) -> str:
    """Cache key: data file contents, tokenizer (vocab, template, specials), settings and code version."""
    h = hashlib.sha256()
    h.update(f"v{DATA_VERSION}|{max_length}|{seed}|".encode())
    # retention never changes tokens; augment does (an 'example' column) only when enabled. Left out
    # otherwise, so the key, and caches written before these settings existed, stay the same.
    skip = ({"cache", "test", "retention", "retention_eval", "num_proc"} | (set() if settings.augment.enabled else {"augment"})
            | (set() if settings.replay else {"replay"}))
    h.update(settings.model_dump_json(exclude=skip).encode())
    for src in settings.train + settings.eval + replay_sources(settings):
        path = Path(src.path).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            h.update(file_digest(f).encode())
        if not files:
            h.update(f"hub:{src.path}:{src.name}:{src.split}".encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:20]


def replay_sources(settings: DataSection) -> list[DataSource]:
    """data.replay as a training source (weight set later, from the task's row count); [] when off."""
    replay: ReplaySection | None = settings.replay
    if replay is None:
        return []
    return [DataSource(path=str(REPLAY_BUNDLED) if replay.path == "bundled" else replay.path, format=replay.format)]


def with_replay_weight(replay: ReplaySection, src: DataSource, n_task: int, n_rows: int) -> DataSource:
    """The replay source weighted so it yields replay.rows_for(n_task) rows out of its n_rows (repeating when short)."""
    return src.model_copy(update={"weight": replay.rows_for(n_task) / n_rows})


def build_datasets(settings: DataSection, tokenizer, max_length: int | None, seed: int,
                   cache_root: Path | None = None, progress: bool = True):
    """Return (train Dataset, eval Dataset or None, DataReport), from the cache when unchanged.

    Under several processes the main process builds the cache while the others wait, then all read it.
    """
    from accelerate import PartialState

    from peft_pipeline.paths import cache_dir

    key = fingerprint(settings, tokenizer, max_length, seed)
    root = (cache_root or cache_dir() / "data") / key
    state = PartialState()
    with state.main_process_first():
        if settings.cache and (root / "report.json").is_file():
            train, evals, report = _load_cached(root)
            report.cache = f"hit {root}"
            return _augmented(train, settings, tokenizer, max_length, seed), evals, report
        if settings.cache and state.is_main_process:
            train, evals, report = _build_into(root, settings, tokenizer, max_length, seed, progress)
            report.cache = f"written {root}"
        else:  # no cache (or a rank that found none): build into a scratch dir removed at exit
            scratch = _scratch_dir(root.parent)
            train, evals, report = _build_into(scratch / "out", settings, tokenizer, max_length, seed,
                                               progress and state.is_main_process)
            report.cache = "off" if not settings.cache else f"not written by this process ({root})"
        return _augmented(train, settings, tokenizer, max_length, seed), evals, report


def _augmented(train, settings: DataSection, tokenizer, max_length, seed):
    """With data.augment on, the train rows served varied per epoch (augment.AugmentedDataset)."""
    if not settings.augment.enabled:
        return train
    from peft_pipeline.data.augment import AugmentedDataset

    return AugmentedDataset.wrap(train, tokenizer, settings, max_length, seed)


def _build_into(dest: Path, settings: DataSection, tokenizer, max_length, seed, progress):
    """Build the datasets and save them (with report.json) as `dest`, atomically; return them memory-mapped."""
    import shutil
    from dataclasses import asdict

    from peft_pipeline.paths import atomic_dir

    work = _scratch_dir(dest.parent, remove_at_exit=False)
    try:
        with atomic_dir(dest) as tmp, _progress_bars(progress):
            train, evals, report = _build(settings, tokenizer, max_length, seed, work)
            train.save_to_disk(str(tmp / "train"))
            if evals is not None:
                evals.save_to_disk(str(tmp / "eval"))
            (tmp / "report.json").write_text(json.dumps(asdict(report), indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _load_cached(dest)


def _scratch_dir(parent: Path, remove_at_exit: bool = True) -> Path:
    """A private work dir beside the cache (same disk, which holds the big intermediate files)."""
    import atexit
    import shutil
    import tempfile

    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".work-", dir=parent))
    if remove_at_exit:  # the datasets read it memory-mapped until the process ends
        atexit.register(shutil.rmtree, path, True)
    return path


@contextmanager
def _progress_bars(on: bool):
    """datasets' bars on for the tokenizing map only (see _prepare): one bar for the whole preparation."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    _BARS["on"] = on
    try:
        yield
    finally:
        _BARS["on"] = False
        disable_progress_bars() if was_off else enable_progress_bars()


_BARS = {"on": False}


def _build(settings: DataSection, tokenizer, max_length, seed, work: Path):
    """Sources -> raw Arrow table -> mixed and split index arrays -> one batched, multi-process map -> datasets."""
    import numpy as np

    report = DataReport()
    report.tokens["max_length"] = max_length
    train_sources = settings.train + replay_sources(settings)
    raw, specs, offsets = _write_raw(train_sources + settings.eval, work / "raw.arrow", report)
    n_train_src = len(train_sources)
    if settings.replay:  # its weight depends on how many task rows the mixture holds
        n_task = sum(len(mix_indices(src, stop - start, seed))
                     for src, start, stop in zip(settings.train, offsets, offsets[1:]))
        train_sources[-1] = with_replay_weight(settings.replay, train_sources[-1], n_task,
                                               offsets[n_train_src] - offsets[n_train_src - 1])
        report.sources[n_train_src - 1]["replay"] = True
    train_order = _mixed(train_sources, offsets[: n_train_src + 1], seed, report.sources)
    if settings.eval:
        eval_order = _mixed(settings.eval, offsets[n_train_src:], seed, report.sources[n_train_src:])
    else:
        held = np.zeros(len(train_order), dtype=bool)
        held[np.frombuffer(held_out(len(train_order), settings.val_fraction, seed), dtype=np.int64)] = True
        train_order, eval_order = train_order[~held], train_order[held]  # both keep the mixture's order
    prepared = _prepare(raw, train_order, eval_order, specs, tokenizer, settings, max_length, work)
    cols = _tally(prepared, report, tokenizer, max_length)
    columns = ["input_ids", "labels"]
    train = _split(prepared, cols, 0, columns + (["example"] if settings.augment.enabled else []))
    evals = _split(prepared, cols, 1, columns) if len(eval_order) else None
    return train, (evals if evals is not None and len(evals) else None), report


def _write_raw(sources: list[DataSource], path: Path, report: DataReport):
    """Every source's rows, as JSON text with source and line number, into one Arrow file (in 20k-row
    batches: memory stays flat). Returns the memory-mapped table, each source's spec, and row offsets."""
    import pyarrow as pa
    from datasets import Dataset

    schema = pa.schema([("src", pa.int32()), ("n", pa.int64()), ("row", pa.large_string())])
    specs, offsets, total = [], [0], 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for index, src in enumerate(sources):
            raw = raw_source(src)
            first, count = None, 0
            for chunk in _chunks(raw.rows, 20_000):
                first = first if first is not None else chunk[0]
                writer.write_batch(pa.record_batch([pa.array([index] * len(chunk), pa.int32()),
                                                    pa.array([n for n, _ in chunk], pa.int64()),
                                                    pa.array([t for _, t in chunk], pa.large_string())], schema=schema))
                count += len(chunk)
            if first is None:
                raise UserError(f"{src.path}: no rows; the dataset is empty")
            data = _renamed(parse_line(first[1], raw.where(first[0])), src.columns)
            fmt = src.format if src.format != "auto" else detect_format(data.keys(), data)
            specs.append(SourceSpec(raw.label, raw.kind, fmt, dict(src.columns)))
            report.sources.append({"path": src.path, "format": fmt, "rows": count, "used": 0})
            total += count
            offsets.append(total)
    return Dataset.from_file(str(path)), specs, offsets


def _chunks(rows, size: int):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _renamed(data: dict, columns: dict[str, str]) -> dict:
    return {columns.get(k, k): v for k, v in data.items()} if columns else data


def _mixed(sources: list[DataSource], offsets: list[int], seed: int, reported: list[dict]):
    """Rows of the raw table in mixture order (an int64 array): each source's mix_indices, shifted to its place."""
    import numpy as np

    parts = []
    for src, start, stop, rep in zip(sources, offsets, offsets[1:], reported):
        picked = mix_indices(src, stop - start, seed)
        rep["used"] = len(picked)
        parts.append(np.arange(start, stop, dtype=np.int64) if isinstance(picked, range)
                     else start + np.asarray(picked, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class SourceSpec:
    """What a tokenizing process needs to know about a source: how to name its rows, format, renames."""

    label: str
    kind: str
    format: str
    columns: dict[str, str]

    def where(self, n: int) -> str:
        """Row n's file:line (see formats.RawSource)."""
        return RawSource((), self.label, self.kind).where(n)


# Columns of the prepared table: the tokens, and per sequence what the report counts.
# _split 0 train / 1 eval; _status: KEPT, TRUNCATED, DROPPED_*; _tokens: final length; _full: length
# before truncation (-1: too long to tokenize); _trained: tokens with loss; _key: example_key.
def _features():
    from datasets import Features, List, Value

    # int32 tokens: half the disk and page cache of int64 (3 M alpaca rows: 3.6 GB, not 7.3), any vocabulary fits
    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "example": Value("string"),
                     "_split": Value("int8"), "_status": Value("int8"), "_tokens": Value("int32"),
                     "_full": Value("int32"), "_trained": Value("int32"), "_key": Value("int64")})


class Preparer:
    """The tokenizing map's function: a batch of raw rows -> sequences with ids, labels and their counts.

    Runs in data.num_proc processes (pickled with the tokenizer). Each row is parsed, normalized,
    rendered (ChatApply: the tokenizer's template without apply_chat_template's per-call cost) and
    its pieces tokenized in one call per batch (template.tokenize_many); the length rules are
    precut/fit, shared with tokenize_examples. Errors name the row's file:line.
    """

    def __init__(self, specs: list[SourceSpec], tokenizer, settings: DataSection, max_length: int | None, n_train: int):
        self.specs, self.tokenizer, self.max_length, self.n_train = specs, tokenizer, max_length, n_train
        self.system_prompt, self.train_on_prompt = settings.system_prompt, settings.train_on_prompt
        self.overlong, self.augment = settings.overlong, settings.augment.enabled
        self.limit = overlong_chars(tokenizer, max_length)
        self.apply = ChatApply(tokenizer)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        seqs, meta = [], []  # meta: (split, example JSON, key) per sequence
        for src, n, text, index in zip(batch["src"], batch["n"], batch["row"], indices):
            split = 0 if index < self.n_train else 1
            ex, rendered = self._render(self.specs[src], n, text, keep_fields=self.augment and split == 0)
            example = json.dumps(ex, ensure_ascii=False) if self.augment and split == 0 else ""
            for part, r in enumerate(rendered):
                seqs.append(precut(r, self.limit, self.overlong))
                meta.append((split, example, example_key(ex, part)))
        tokens = iter(tokenize_many([r for r, _ in seqs if r is not None], self.tokenizer))
        out: dict[str, list] = {name: [] for name in _features()}
        for (r, cut), (split, example, key) in zip(seqs, meta):
            ids, labels = next(tokens) if r is not None else ([], [])
            full = len(ids) if r is not None and not cut else -1
            status, ids, labels = fit(r, ids, labels, cut, self.max_length, self.overlong)
            for name, value in (("input_ids", ids), ("labels", labels), ("example", example), ("_split", split),
                                ("_status", status), ("_tokens", len(ids)), ("_full", full),
                                ("_trained", len(labels) - labels.count(-100)), ("_key", key)):
                out[name].append(value)
        return out

    def _render(self, spec: SourceSpec, n: int, text: str, keep_fields: bool):
        where = spec.where(n)
        row = Row(_renamed(parse_line(text, where), spec.columns), where)
        ex = normalize(row, spec.format, self.system_prompt, keep_fields)
        try:
            return ex, render_all(ex, self.tokenizer, self.train_on_prompt, self.apply)
        except UserError as e:  # the template's complaint, named by the row it is about
            raise UserError(f"{where}: {e}") from None


def _prepare(raw, train_order, eval_order, specs, tokenizer, settings: DataSection, max_length, work: Path):
    """One map over the selected rows (train, then eval): the whole preparation under one progress bar."""
    import numpy as np
    from datasets.utils import disable_progress_bars, enable_progress_bars

    order = np.concatenate([train_order, eval_order])
    rows = raw if len(order) == len(raw) and (order == np.arange(len(raw))).all() else raw.select(order)
    num_proc = processes(settings, len(rows))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    enable_progress_bars() if _BARS["on"] else None
    try:
        return rows.map(Preparer(specs, tokenizer, settings, max_length, len(train_order)), batched=True,
                        batch_size=500, with_indices=True, num_proc=num_proc if num_proc > 1 else None,
                        remove_columns=rows.column_names, features=_features(),
                        cache_file_name=str(work / "prepared.arrow"), new_fingerprint=work.name,
                        desc=f"Preparing data ({num_proc} process{'es' if num_proc > 1 else ''})")
    finally:
        disable_progress_bars()


def processes(settings: DataSection, rows: int) -> int:
    """Tokenizing processes: data.num_proc, else the cores this process may use (at most 8), with at
    least 5,000 rows each (starting a process costs about a second)."""
    if settings.num_proc:
        return settings.num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8, rows // 5000))


def _tally(prepared, report: DataReport, tokenizer, max_length) -> dict:
    """The report's counts from the prepared table's small columns; returns those columns for _split.

    The columns are read straight from the memory-mapped Arrow table (1-8 bytes a sequence, about 60 MB
    at 3 M rows); the token columns are never read. Going through datasets' numpy formatting instead
    cost five times that at 3 M rows, the build's memory peak.
    """
    import numpy as np

    table = prepared.data  # the map's output: no indices mapping, row i is sequence i
    cols = {name: table.column(name).to_numpy() for name in ("_split", "_status", "_tokens", "_full", "_trained", "_key")}
    status = cols["_status"]
    train = (cols["_split"] == 0) & (status <= TRUNCATED)
    report.truncated = int(((status == TRUNCATED) | (status == TRUNCATED_NO_LOSS)).sum())
    report.dropped_overlong = int((status == DROPPED_OVERLONG).sum())
    report.dropped_no_loss = int(((status == DROPPED_NO_LOSS) | (status == TRUNCATED_NO_LOSS)).sum())
    lengths = np.sort(cols["_tokens"][train])
    if not len(lengths):
        _nothing_left(report, cols["_full"][cols["_split"] == 0], tokenizer, max_length)
    report.duplicates = int(len(lengths) - len(np.unique(cols["_key"][train])))
    report.examples = {"train": len(lengths), "eval": int((status <= TRUNCATED).sum()) - len(lengths)}
    report.tokens.update({
        "train_total": int(lengths.sum()), "train_trained": int(cols["_trained"][train].sum()),
        "length_min": int(lengths[0]), "length_median": int(lengths[len(lengths) // 2]), "length_max": int(lengths[-1]),
    })
    return cols


def _nothing_left(report: DataReport, fulls, tokenizer, max_length) -> None:
    """No training sequence survived max_length: say how short the shortest was, and what to change."""
    limit = overlong_chars(tokenizer, max_length)
    tokenized = fulls[fulls >= 0]
    shortest = int(tokenized.min()) if len(tokenized) else None
    raise UserError(
        f"training.max_length: no training example is left ({report.dropped_overlong} longer than "
        f"max_length={max_length}, {report.dropped_no_loss} with nothing to learn); the shortest example has "
        f"{shortest if shortest is not None else f'over {limit} characters, so over {max_length}'} tokens: "
        "raise training.max_length or set data.overlong: truncate"
    )


def _split(prepared, cols: dict, split: int, columns: list[str]):
    """The kept sequences of one split (0 train, 1 eval), only the columns training reads (an index, no copy)."""
    import numpy as np

    index = np.nonzero((cols["_split"] == split) & (cols["_status"] <= TRUNCATED))[0]
    return prepared.select(index).select_columns(columns)


def _load_cached(root: Path):
    from datasets import load_from_disk

    report = DataReport(**json.loads((root / "report.json").read_text()))
    train = load_from_disk(str(root / "train"))
    evals = load_from_disk(str(root / "eval")) if (root / "eval").exists() else None
    return train, evals, report
