"""Forgetting check: does the adapter still answer the general prompts its base answered?

A retention set is JSONL, one `{"prompt": str, "expected": str | [str, ...]}` per line (other
keys, such as the `base_answer` recorded by data/make_retention.py, are ignored). Each prompt is
asked as one user turn (after the run's data.system_prompt, if any), greedy, with the run's
chat template and stop tokens, once with the adapter switched off (the base) and once with it on.
An answer is correct when an expected string occurs in it as a whole word or phrase, compared
after metrics.normalize (case, spacing, surrounding punctuation).

The report says, per prompt, whether specialization cost it:
  retained: right before and after;  lost: right with the base, wrong with the adapter;
  gained:   wrong before, right after;  the rest were wrong both times.

The bundled set (peft_pipeline/resources/retention-general.jsonl) holds only prompts the embedded base
(SmolLM2-135M-Instruct) answers right, so with that base `lost` is exactly what training cost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError
from peft_pipeline.report import summary_line

BUNDLED = Path(__file__).resolve().parents[1] / "resources" / "retention-general.jsonl"  # package data: in every install
MAX_NEW_TOKENS = 32  # the expected answers are a word or two; 32 tokens leave room for a sentence around them


@dataclass
class Item:
    """One retention prompt and the strings any of which makes an answer correct."""

    prompt: str
    expected: list[str]
    where: str


def resolve(setting: str | None, model_name: str) -> Path | None:
    """The retention file a run uses: 'auto' = the bundled set for the embedded base (else none), 'bundled', a path."""
    from peft_pipeline.config import EMBEDDED_BASE

    if setting is None:
        return None
    if setting == "auto":
        return BUNDLED if model_name == EMBEDDED_BASE and BUNDLED.is_file() else None
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
        prompt, expected = (row.get("prompt"), row.get("expected")) if isinstance(row, dict) else (None, None)
        expected = [expected] if isinstance(expected, str) else expected
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: needs a non-empty string 'prompt'")
        if not isinstance(expected, list) or not expected or not all(isinstance(e, str) and e.strip() for e in expected):
            raise UserError(f"{where}: 'expected' must be a non-empty string or list of strings")
        items.append(Item(prompt, expected, where))
    if not items:
        raise UserError(f"{path}: no retention prompts in the file")
    return items


def is_correct(answer: str, expected: list[str]) -> bool:
    """True when one expected string occurs in the answer as a whole word/phrase (normalized)."""
    from peft_pipeline.evaluate.metrics import normalize

    text = " ".join(answer.casefold().split())
    for e in expected:
        # Word boundaries: "4" must not match inside "14", "cold" not inside "scolded", "3" not in "3.09", "0" not in "-18.0".
        if re.search(r"(?<![\w.])" + re.escape(normalize(e)) + r"(?![\w]|[.,]\d)", text):
            return True
    return False


def compare(items: list[Item], base_answers: list[str], adapter_answers: list[str]) -> dict[str, Any]:
    """The retention report from both models' answers: counts, and which prompts were retained, lost, gained."""
    base_ok = [is_correct(a, it.expected) for a, it in zip(base_answers, items)]
    adapter_ok = [is_correct(a, it.expected) for a, it in zip(adapter_answers, items)]
    pick = lambda want_b, want_a: [it.prompt for it, b, a in zip(items, base_ok, adapter_ok)  # noqa: E731
                                   if b == want_b and a == want_a]
    n = len(items)
    return {
        "n": n,
        "base": sum(base_ok), "adapter": sum(adapter_ok),
        "base_rate": sum(base_ok) / n if n else 0.0, "adapter_rate": sum(adapter_ok) / n if n else 0.0,
        "retained": pick(True, True), "lost": pick(True, False), "gained": pick(False, True),
        "answers": [{"prompt": it.prompt, "expected": it.expected, "base": b, "adapter": a,
                     "base_correct": bo, "adapter_correct": ao}
                    for it, b, a, bo, ao in zip(items, base_answers, adapter_answers, base_ok, adapter_ok)],
    }


def check(model, tokenizer, items: list[Item], stop_ids: list[int], system_prompt: str | None = None,
          batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Ask every prompt with the adapter off (base) and on; the comparison report (needs a PEFT model)."""
    from peft_pipeline.evaluate.generate import adapter_off
    from peft_pipeline.evaluate.generate import Prompt, Sampling, generate

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompts = [Prompt(messages=system + [{"role": "user", "content": it.prompt}], where=it.where) for it in items]
    sampling = Sampling(max_new_tokens=MAX_NEW_TOKENS)
    answers = {}
    was_training = model.training
    model.eval()  # no LoRA dropout while generating
    try:
        for name in ("base", "adapter"):
            with adapter_off(model, name == "base"):
                got = generate(model, tokenizer, prompts, stop_ids, sampling, batch_size, progress,
                               desc=f"Retention ({name})")
            answers[name] = [a.text for a in got]
    finally:
        model.train(was_training)
    return compare(items, answers["base"], answers["adapter"])


def after_training(cfg, trainer, tokenizer) -> dict[str, Any] | None:
    """The end-of-training check on the trained model in memory (main process); None when off or not possible."""
    path = resolve(cfg.data.retention, cfg.model.name)
    if path is None:
        return None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # A sharded model can only generate with every rank taking part; eval does it on one process.
        print(f"[peft-pipeline] retention: skipped under sharded training; run `peft-pipeline eval "
              f"{cfg.output_dir} --retention`", flush=True)
        return None
    from peft_pipeline.data.template import stop_ids

    model = trainer.accelerator.unwrap_model(trainer.model)
    result = {"file": str(path), **check(model, tokenizer, load(path), stop_ids(tokenizer), cfg.data.system_prompt,
                                         batch_size=int(cfg.sft_args.get("per_device_eval_batch_size", 8)))}
    print(f"[peft-pipeline] {summary_line(result)}", flush=True)
    return result
