"""Scoring a classifier: predictions, label metrics and the `eval` verb on a classification run.

`peft-pipeline eval` on a classification run comes here (tasks.py chooses by the run's config):
accuracy and macro precision/recall/F1 with a confusion matrix on the run's eval split or --data FILE.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from peft_pipeline.config import DataSource, RunConfig
from peft_pipeline.data.labelled import LABELS_FILE
from peft_pipeline.errors import UserError


def predict(model, input_ids: list[list[int]], pad_id: int | None, batch_size: int = 8) -> tuple[list[int], list[list[float]]]:
    """Argmax class and logits per row; right-padded batches, longest first."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = 0 if pad_id is None else pad_id
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    logits: list[list[float]] = [[] for _ in input_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(input_ids[i]) for i in idx)
        x = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(input_ids[i])] = torch.tensor(input_ids[i])
            mask[r, :len(input_ids[i])] = 1
        with torch.inference_mode():
            out = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        for r, i in enumerate(idx):
            logits[i] = out[r].tolist()
    model.train(was_training)
    return [max(range(len(row)), key=row.__getitem__) for row in logits], logits


def score_split(model, cols: dict[str, list], labels: list[str], pad_id: int | None, batch_size: int = 8) -> dict[str, Any]:
    """label_metrics on one split, plus its mean cross-entropy, from the model's predictions."""
    import torch
    import torch.nn.functional as F

    from peft_pipeline.evaluate.metrics import label_metrics

    preds, logits = predict(model, cols["input_ids"], pad_id, batch_size)
    loss = F.cross_entropy(torch.tensor(logits), torch.tensor(cols["labels"])).item()
    metrics = label_metrics([labels[p] for p in preds], [labels[y] for y in cols["labels"]])
    return {"n": len(preds), "loss": loss, **metrics, "predicted": [labels[p] for p in preds]}


def print_scores(m: dict, title: str, before: dict | None = None, out=None) -> None:
    """Accuracy, macro P/R/F1 (and the untrained head's, when given) and the confusion matrix."""
    from peft_pipeline.evaluate.metrics import format_confusion_matrix

    out = out or sys.stdout
    print(f"\n{title}: {m['n']} rows", file=out)
    head = f"{'metric':<16}" + (f"{'before':>10}{'after':>10}" if before else f"{'adapter':>10}")
    print(head, file=out)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "loss"):
        print(f"{key:<16}" + (f"{before[key]:>10.4f}" if before else "") + f"{m[key]:>10.4f}", file=out)
    print(f"\nconfusion matrix:\n{format_confusion_matrix(m['confusion_matrix'])}", file=out)


# --------------------------------------------------------------------------- later stages on a classification run


def evaluate(path, data: str | None = None, prompts: str | None = None, compare_base: bool = False,
             batch_size: int = 8, limit: int | None = None, progress: bool = True, **_generation) -> dict[str, Any]:
    """`peft-pipeline eval` on a classification run: label metrics on its eval split or --data FILE -> eval.json.

    `_generation`: the causal-LM eval's sampling and retention settings, which do not apply to a head.
    """
    from peft import PeftModel

    from peft_pipeline.console import library_deprecations_quiet
    from peft_pipeline.data.template import load_tokenizer
    from peft_pipeline.model.load import load_classifier
    from peft_pipeline.paths import write_json_atomic
    from peft_pipeline.rundir import resolve

    target = resolve(path)
    check_settings(target, compare_base, prompts, batch_size, limit)
    cfg, labels = run_config(target)
    tokenizer = load_tokenizer(target.tokenizer_dir, padding_side="right")
    cols, source = rows_to_score(target, cfg, labels, tokenizer, data, limit)
    with library_deprecations_quiet():
        model = PeftModel.from_pretrained(load_classifier(cfg, target.model_path, labels, tokenizer.pad_token_id),
                                          str(target.adapter_dir))
    if cfg.quantization.mode == "none":
        import torch

        if torch.cuda.is_available():
            model = model.to("cuda")
    m = score_split(model, cols, labels, tokenizer.pad_token_id, batch_size)
    report = {
        "target": {"kind": target.kind, "path": str(target.path), "base_model": target.model_path,
                   "adapter": str(target.adapter_dir)},
        "task": "classification", "models": ["adapter"], "settings": {"batch_size": batch_size, "limit": limit},
        "classification": {"data": source, "labels": labels, "adapter": {k: v for k, v in m.items() if k != "predicted"}},
        "predictions": [{"where": w, "prompt": t, "expected": labels[y], "adapter": p}
                        for w, t, y, p in zip(cols["where"], cols["text"], cols["labels"], m["predicted"])],
    }
    out = target.out_dir / "eval.json"
    write_json_atomic(out, report)
    print_scores(m, f"eval on {source}")
    print(f"[peft-pipeline] eval written to {out}")
    return report


def check_settings(target, compare_base: bool, prompts: str | None, batch_size: int, limit: int | None) -> None:
    """The eval options that do not apply to a head, or cannot work, as one-line usage errors."""
    if compare_base:
        raise UserError(f"{target.path}: --compare-base does not apply to a classification run: the base has no trained "
                        "head (metrics.json 'before' holds the untrained head's scores)", exit_code=2)
    if prompts:
        raise UserError(f"{target.path}: --prompts does not apply to a classification run (no generation); "
                        "pass --data FILE with text and label columns", exit_code=2)
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError("--batch-size and --limit must be at least 1", exit_code=2)


def run_config(target) -> tuple[RunConfig, list[str]]:
    """The run's config with the columns and label order the adapter was trained with (classification.json)."""
    info = json.loads((target.adapter_dir / LABELS_FILE).read_text())
    labels = info["labels"]
    cfg = target.config or RunConfig.model_validate({"task": "classification", "model": {"name": target.model_path}})
    cfg = cfg.model_copy(update={"classification": cfg.classification.model_copy(
        update={"text_column": info["text_column"], "label_column": info["label_column"], "labels": labels})})
    return cfg, labels


def rows_to_score(target, cfg: RunConfig, labels: list[str], tokenizer, data: str | None, limit: int | None):
    """(columns, source): --data FILE, else the run's eval split exactly as training saw it."""
    from peft_pipeline.data.labelled import load_data, read_labelled, tokenize_rows

    if data is not None:
        rows = read_labelled(DataSource(path=data), cfg.classification)
        counts = {"dropped_overlong": 0, "truncated": 0}
        cols, source = tokenize_rows(rows, labels, tokenizer, cfg.max_length, cfg.data.overlong, counts), data
    elif cfg.data.eval or cfg.data.val_fraction > 0:
        loaded = load_data(cfg, tokenizer)  # the same split and tokens training saw
        cols, source = loaded.eval, loaded.eval_source
    else:
        raise UserError(f"{target.path}: the run has no eval split (data.eval or data.val_fraction); pass --data FILE",
                        exit_code=2)
    if not cols or not cols["input_ids"]:
        raise UserError(f"{source}: no row left to score (all longer than max_length?)")
    return ({k: v[:limit] for k, v in cols.items()} if limit else cols), source


def _compact(m: dict | None) -> dict | None:
    """Scores without the per-row predictions (metrics.json stays small; eval.json has them)."""
    return {k: v for k, v in m.items() if k != "predicted"} if m else None
