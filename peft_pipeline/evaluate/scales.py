"""Adapter scale scan (`eval RUN --adapter-scale 1,0.9,0.8`): task score and retention per scale of the update.

A LoRA adapter adds scaling * B(A(x)) to each layer it sits on. Multiplying that scaling by s < 1 moves
the model along the straight line from the trained weights back to the base (the weight-space
interpolation of WiSE-FT): the task fades slowly at first while general answers the training displaced
come back (docs/retention.md measures it on the demo). `lora.final_scale` applies a scale when training
ends; this scan measures the trade-off of a trained run first, one training and several scales, so the
scale can be chosen from numbers. With the same config and seed, training again with `lora.final_scale: s`
saves exactly the adapter scanned here at s (training is unchanged; only the saved alpha differs).

Scales are relative to the adapter as saved. For each one: the test prompts (exact match and the rest of
metrics.score) and the retention set (kept, same, lost, against the base's answers, asked once with the
adapter off). Written to <run>/adapter-scales.json.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError


def parse_scales(text: str) -> list[float]:
    """'1,0.9,0.8' -> [1.0, 0.9, 0.8]; each in (0, 1]; a one-line UserError naming the bad entry otherwise."""
    scales = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--adapter-scale: {part.strip()!r} is not a number; give scales in (0, 1] such as 1,0.9,0.8",
                            exit_code=2) from None
        if not 0 < value <= 1:
            raise UserError(f"--adapter-scale: {value:g} is outside (0, 1]; 1 is the adapter as saved, smaller moves "
                            "toward the base", exit_code=2)
        scales.append(value)
    return scales


@contextmanager
def scaled(model, scale: float):
    """Every active LoRA layer's scaling multiplied by `scale` inside the block, restored exactly after."""
    from peft.tuners.lora import LoraLayer

    saved = [(layer, dict(layer.scaling)) for layer in model.modules() if isinstance(layer, LoraLayer)]
    try:
        for layer, scalings in saved:
            for name in layer.active_adapters:
                layer.scaling[name] = scalings[name] * scale
        yield
    finally:
        for layer, scalings in saved:
            layer.scaling.update(scalings)


# Over 50 lines by choice: the scan's one sequence (inputs checked, the model loaded once, the base's answers,
# each scale, the file and the table), read top to bottom.
def scan(path: str | Path, scales: list[float], prompts: str | None = None, retention: str | None = "auto",
         max_new_tokens: int = 128, batch_size: int = 8, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Score the run's adapter at each scale; print a table, write adapter-scales.json beside the run; return it."""
    from peft_pipeline.data.template import load_tokenizer, stop_token_ids
    from peft_pipeline.evaluate.generate import Sampling, adapter_off, generate
    from peft_pipeline.evaluate.metrics import score
    from peft_pipeline.evaluate.retention import answer, compare
    from peft_pipeline.evaluate.run import load_retention, load_test_prompts
    from peft_pipeline.model.load import load_model
    from peft_pipeline.paths import write_json_atomic
    from peft_pipeline.rundir import resolve

    target = resolve(path)
    if target.adapter_dir is None:
        raise UserError(f"{path}: --adapter-scale scales an adapter, and this model has none (merged or fully "
                        "fine-tuned); run it on the run directory", exit_code=2)
    tokenizer = load_tokenizer(target.tokenizer_dir, padding_side="left")
    test = load_test_prompts(target, prompts, limit)
    if test is None:
        raise UserError(f"{path}: --adapter-scale scores the test prompts, and the run config sets no data.test; "
                        "pass --prompts FILE", exit_code=2)
    file, items, _, config = load_retention(target, retention or "auto", path)
    system = config.data.system_prompt if config is not None else None
    model = load_model(target, place_on_gpu=True)
    stop_ids = stop_token_ids(target, tokenizer)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    refs = [p.expected for p in test["prompts"]]
    with adapter_off(model, True):
        base = answer(model, tokenizer, items, stop_ids, system, batch_size, progress, "base")
    rows = []
    for s in scales:
        with scaled(model, s):
            got = generate(model, tokenizer, test["prompts"], stop_ids, sampling, batch_size, progress,
                           desc=f"Generating (x{s:g})")
            kept = compare(items, base, answer(model, tokenizer, items, stop_ids, system, batch_size, progress, f"x{s:g}"))
        rows.append({"scale": s, "test": score([a.text for a in got], refs),
                     "retention": {**{k: kept[k] for k in ("n", "base", "adapter", "kept", "same", "lost", "gained")},
                                   "answers": [r["adapter"] for r in kept["answers"]]},
                     "answers": [a.text for a in got]})
    report = {"target": str(target.path), "prompts": test["file"], "retention_file": file, "retention_base_answers": base,
              "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit},
              "scales": rows}
    out = target.out_dir / "adapter-scales.json"
    write_json_atomic(out, report)
    print("\n".join(table(report)))
    print(f"[peft-pipeline] adapter scales written to {out}; keep one with lora.final_scale: S (same config and seed)")
    return report


def table(report: dict[str, Any]) -> list[str]:
    """One line per scale: exact match, kept of the base's right answers, answers identical to the base's."""
    lines = [f"{'scale':>6}  {'exact_match':>11}  {'kept':>7}  {'same':>5}  lost"]
    for row in report["scales"]:
        r = row["retention"]
        lost = "; ".join(repr(p) for p in r["lost"][:3]) + (f"; ... ({len(r['lost']) - 3} more)" if len(r["lost"]) > 3 else "")
        lines.append(f"{row['scale']:>6g}  {row['test']['exact_match']:>11.4f}  {r['kept']:>3}/{r['base']:<3}  "
                     f"{r['same']:>5}  {lost or '-'}")
    return lines
