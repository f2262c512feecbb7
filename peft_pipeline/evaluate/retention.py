"""Forgetting check: does the trained model still answer the general prompts its base answered?

A retention set is JSONL, one `{"prompt": str, "expected"?: str | [str, ...]}` per line (other keys,
such as the `base_answer` recorded by data/make_retention.py, are ignored). Each prompt is asked as
one user turn (after the run's data.system_prompt, if any), greedy, MAX_NEW_TOKENS new tokens, with
the run's chat template and stop tokens.

Any base, offline: before training the model as it starts (the base: a new adapter is a no-op) answers
every prompt; the answers are saved in the run as retention-reference.jsonl (REFERENCE) and, on resume,
read back instead of asked again. After training (and, with data.retention_eval, at every evaluation)
the trained model answers the same prompts and is scored against that reference:
  - a prompt with `expected` strings is right when one occurs in the answer as a whole word or phrase,
    compared after metrics.normalize (case, spacing, surrounding punctuation);
  - a prompt without them is right when the answer equals the base's (normalized): a user's own prompts
    need no answer key, the base's answer is the key.
`same` counts answers identical to the base's (normalized), whatever the key says.

The report says, per prompt, whether specialization cost it:
  retained: right before and after;  lost: right with the base, wrong after;
  gained:   wrong before, right after;  the rest were wrong both times.
`kept` = len(retained) is the number sweeps and early stopping use (`retention.kept`, `eval_retention`).

The bundled set (peft_pipeline/resources/retention-general.jsonl) holds only prompts the embedded base
(SmolLM2-135M-Instruct) answers right, so with that base `lost` is exactly what training cost; with
another base the `base` count says how many it knew to begin with.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError
from peft_pipeline.report import summary_line

BUNDLED = Path(__file__).resolve().parents[1] / "resources" / "retention-general.jsonl"  # package data: in every install
MAX_NEW_TOKENS = 32  # the expected answers are a word or two; 32 tokens leave room for a sentence around them
REFERENCE = "retention-reference.jsonl"  # in the run dir: the base's answers, asked before training


@dataclass
class Item:
    """One retention prompt and the strings any of which makes an answer correct ([]: the base's answer is the key)."""

    prompt: str
    expected: list[str]
    where: str


def resolve(setting: str | None, model_name: str) -> Path | None:
    """The retention file a run uses: 'auto' = the bundled set when installed, 'bundled', a path; None when off."""
    if setting is None:
        return None
    if setting == "auto":  # any base: the reference is the base's own answers, asked before training
        return BUNDLED if BUNDLED.is_file() else None
    if setting == "bundled":
        if not BUNDLED.is_file():
            raise UserError(f"data.retention: the bundled set {BUNDLED} is missing from this install; pass a file path")
        return BUNDLED
    return Path(setting).expanduser()


def load(path: str | Path) -> list[Item]:
    """Read a retention JSONL file; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: retention file not found")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        prompt, expected = (row.get("prompt"), row.get("expected", [])) if isinstance(row, dict) else (None, None)
        expected = [expected] if isinstance(expected, str) else expected
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: needs a non-empty string 'prompt'")
        if not isinstance(expected, list) or not all(isinstance(e, str) and e.strip() for e in expected):
            raise UserError(f"{where}: 'expected' must be a non-empty string or list of strings (or left out)")
        items.append(Item(prompt, expected, where))
    if not items:
        raise UserError(f"{path}: no retention prompts in the file")
    return items


def is_correct(answer: str, expected: list[str]) -> bool:
    """True when one expected string occurs in the answer as a whole word/phrase (normalized)."""
    from peft_pipeline.evaluate.metrics import normalize

    text = " ".join(answer.casefold().split())
    for e in expected:
        # Word boundaries: "4" must not match inside "14", "cold" not inside "scolded", "3" not in "3.09", "0" not in
        # "-18.0"; a number written with zero decimals is that number ("100" in "100.0 degrees").
        if re.search(r"(?<![\w.])" + re.escape(normalize(e)) + r"(?!\w|,\d|\.(?!0+(?!\d))\d)", text):
            return True
    return False


def same(a: str, b: str) -> bool:
    """The two answers are equal after metrics.normalize."""
    from peft_pipeline.evaluate.metrics import normalize

    return normalize(a) == normalize(b)


def compare(items: list[Item], base_answers: list[str], adapter_answers: list[str]) -> dict[str, Any]:
    """The retention report from both models' answers: counts, and which prompts were retained, lost, gained."""
    base_ok = [is_correct(b, it.expected) if it.expected else True for b, it in zip(base_answers, items)]
    adapter_ok = [is_correct(a, it.expected) if it.expected else same(a, b)
                  for a, b, it in zip(adapter_answers, base_answers, items)]
    identical = [same(a, b) for a, b in zip(adapter_answers, base_answers)]
    pick = lambda want_b, want_a: [it.prompt for it, b, a in zip(items, base_ok, adapter_ok)  # noqa: E731
                                   if b == want_b and a == want_a]
    n = len(items)
    return {
        "n": n,
        "base": sum(base_ok), "adapter": sum(adapter_ok),
        "base_rate": sum(base_ok) / n if n else 0.0, "adapter_rate": sum(adapter_ok) / n if n else 0.0,
        "kept": sum(b and a for b, a in zip(base_ok, adapter_ok)), "same": sum(identical),
        "retained": pick(True, True), "lost": pick(True, False), "gained": pick(False, True),
        "answers": [{"prompt": it.prompt, "expected": it.expected, "base": b, "adapter": a,
                     "base_correct": bo, "adapter_correct": ao, "same": sm}
                    for it, b, a, bo, ao, sm in zip(items, base_answers, adapter_answers, base_ok, adapter_ok, identical)],
    }


def answer(model, tokenizer, items: list[Item], stop_ids: list[int], system_prompt: str | None = None,
           batch_size: int = 8, progress: bool = False, name: str = "adapter") -> list[str]:
    """Every prompt asked once, greedy, in eval mode; the training RNG streams are left as they were."""
    from peft_pipeline.evaluate.generate import Prompt, Sampling, generate

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompts = [Prompt(messages=system + [{"role": "user", "content": it.prompt}], where=it.where) for it in items]
    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        with rng_kept():
            got = generate(model, tokenizer, prompts, stop_ids, Sampling(max_new_tokens=MAX_NEW_TOKENS), batch_size,
                           progress, desc=f"Retention ({name})")
    finally:
        model.train(was_training)
    return [a.text for a in got]


@contextmanager
def rng_kept():
    """Python, NumPy and torch (CPU and CUDA) random states restored on exit.

    Asking the reference before training must not move the generators the trainer draws dropout and
    data order from: a resumed run (which reads the reference back instead) would diverge from an
    uninterrupted one.
    """
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def check(model, tokenizer, items: list[Item], stop_ids: list[int], system_prompt: str | None = None,
          batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Ask every prompt with the adapter off (base) and on; the comparison report (needs a PEFT model)."""
    from peft_pipeline.evaluate.generate import adapter_off

    answers = {}
    for name in ("base", "adapter"):
        with adapter_off(model, name == "base"):
            answers[name] = answer(model, tokenizer, items, stop_ids, system_prompt, batch_size, progress, name)
    return compare(items, answers["base"], answers["adapter"])


def write_reference(path: Path, items: list[Item], answers: list[str]) -> None:
    """The base's answers, one JSON line per prompt with its expected strings."""
    from peft_pipeline.paths import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps({"prompt": it.prompt, "expected": it.expected, "base": a}, ensure_ascii=False)
                               + "\n" for it, a in zip(items, answers)), encoding="utf-8")


def read_reference(path: Path) -> tuple[list[Item], list[str]]:
    """(items, base answers) from a run's retention-reference.jsonl."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Item(r["prompt"], r["expected"], f"{path}:{i}") for i, r in enumerate(rows, 1)], [r["base"] for r in rows]


class Tracker:
    """A run's retention set and reference: asked of the model before training, scored against after.

    `start` writes (or, when resuming, reads back) <run>/retention-reference.jsonl; `score` asks the
    model as it is now and compares. One object serves the end-of-training check and the
    evaluation-time metric (train/callbacks.py RetentionEval).
    """

    def __init__(self, file: Path, run: Path, tokenizer, stop_ids: list[int], system_prompt: str | None, batch_size: int):
        self.file, self.reference = file, run / REFERENCE
        self.tokenizer, self.stop_ids, self.system, self.batch_size = tokenizer, stop_ids, system_prompt, batch_size
        self.items: list[Item] = []
        self.base: list[str] = []

    def start(self, model) -> None:
        """The base's answers: read back from the run (resume), else asked of `model` before it trains."""
        if self.reference.is_file():
            self.items, self.base = read_reference(self.reference)
            return
        self.items = load(self.file)
        self.base = answer(model, self.tokenizer, self.items, self.stop_ids, self.system, self.batch_size, name="base")
        write_reference(self.reference, self.items, self.base)

    def score(self, model) -> dict[str, Any]:
        """The retention report of `model` as it is now against the reference."""
        now = answer(model, self.tokenizer, self.items, self.stop_ids, self.system, self.batch_size, name="trained")
        return {"file": str(self.file), "reference": str(self.reference), **compare(self.items, self.base, now)}


def tracker(cfg, trainer, tokenizer, run: Path) -> Tracker | None:
    """The run's Tracker, started on the model before training (main process); None when off or not possible."""
    path = resolve(cfg.data.retention, cfg.model.name)
    if path is None:
        return None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # A sharded model can only generate with every rank taking part; eval does it on one process.
        print(f"[peft-pipeline] retention: skipped under sharded training; run `peft-pipeline eval "
              f"{cfg.output_dir} --retention`", flush=True)
        return None
    from peft_pipeline.data.template import stop_ids

    t = Tracker(path, run, tokenizer, stop_ids(tokenizer), cfg.data.system_prompt,
                int(cfg.sft_args.get("per_device_eval_batch_size", 8)))
    t.start(trainer.accelerator.unwrap_model(trainer.model))
    return t


def after_training(t: Tracker | None, trainer) -> dict[str, Any] | None:
    """The end-of-training check on the trained model in memory; None when off."""
    if t is None:
        return None
    result = t.score(trainer.accelerator.unwrap_model(trainer.model))
    print(f"[peft-pipeline] {summary_line(result)}", flush=True)
    return result
