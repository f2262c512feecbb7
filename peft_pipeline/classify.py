"""Classification task: a new sequence-classification head on the base, trained in full, LoRA on the body.

`task: classification` in a config routes `train` here (train.train dispatches) and `eval` on its
run dir (evaluate.evaluate dispatches). The base is loaded as AutoModelForSequenceClassification:
the body's weights are the base's, the head (`score`, hidden size x number of labels) is new and
seeded. peft's SEQ_CLS task puts the head in modules_to_save, so it is trained in full and saved
inside the adapter; LoRA adapts the frozen body.

Choices, and why:
- Raw text, no chat template. The head reads the hidden state of the last real token; a template
  would add a constant prefix and suffix carrying no information, and the raw text is what a
  classifier is fed at inference (no conversation to render).
- Right padding with the pad id: llama-style heads pick "the rightmost token that is not pad", so
  the pad id must be set on the model config (it is, from the tokenizer) and must not end the
  text; SmolLM2's pad is <|im_end|>, which raw text never contains.
- Labels are strings (integers in the data become "0", "1", ...); their order is the head's order:
  classification.labels, else the sorted distinct training labels. adapter/classification.json
  holds it, and the base config's id2label/label2id are set from it whenever the head is loaded.
- Metrics: accuracy and macro precision/recall/F1 with a confusion matrix (metrics.label_metrics)
  on the eval split, before training (base + untrained head = chance) and after.

The run dir is the train stage's: adapter/ (LoRA + head + tokenizer + classification.json),
config.yaml, metrics.json ("status": "complete" last), log.jsonl, checkpoints/.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_pipeline.config import ClassificationSection, DataSource, RunConfig
from peft_pipeline.errors import UserError

LABELS_FILE = "classification.json"


# --------------------------------------------------------------------------- the run


def train(cfg: RunConfig, overwrite: bool = False, resume: str | bool | None = None, progress: bool = True,
          callbacks: list | None = None) -> Path:
    """Train a classification head + LoRA and write the run directory; return it.

    `callbacks`: extra transformers TrainerCallbacks, as train.train takes them.
    """
    from accelerate import PartialState
    from transformers import set_seed

    from peft_pipeline import model as model_stage
    from peft_pipeline import train as sft
    from peft_pipeline.report import refresh_report

    state = PartialState(cpu=sft.runs_on_cpu(cfg))
    run = Path(cfg.output_dir)
    sft.check_run_dir(run, overwrite, resume)
    path = model_stage.resolve_model_path(cfg.model)
    tokenizer = model_stage.load_tokenizer(cfg.model, path)
    data = load_data(cfg, tokenizer)  # every data problem (file:line) before any weights load
    validate_against_model(cfg, path, data.labels)
    sft.say(state, *data.lines())

    sft.start_run_dir(run, cfg, overwrite, resume, state)
    set_seed(cfg.seed)  # the new head's and LoRA's initial weights
    model = attach_adapter(load_classifier(cfg, path, data.labels, tokenizer.pad_token_id), cfg)
    counts = model_stage.parameter_counts(model)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    sft.say(state, f"model: {path} + new head ({len(data.labels)} labels): {counts['trainable_params']:,} trainable "
                   f"of {counts['total_params']:,} parameters ({head:,} in the head, trained in full)")
    args = make_training_args(cfg, model.dtype, progress)
    trainer = make_trainer(args, model, tokenizer, data, run, callbacks)

    before = score_split(model, data.eval, data.labels, tokenizer.pad_token_id, args.per_device_eval_batch_size) \
        if cfg.classification.eval_before and data.eval else None
    if before:
        sft.say(state, f"before training (untrained head): accuracy {before['accuracy']:.4f}, macro F1 {before['macro_f1']:.4f}")
    started = time.time()
    checkpoint = sft.resolve_resume(run, resume)
    if checkpoint and state.is_main_process:
        sft.trim_log(run / "log.jsonl", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, sft.Guard)).raise_if_stopped()
    after = score_split(model, data.eval, data.labels, tokenizer.pad_token_id, args.per_device_eval_batch_size) \
        if data.eval else None
    metrics = {
        **counts, "task": "classification", "head_params": head, "labels": data.labels,
        "train_loss": sft.whole_run_loss(trainer) if checkpoint else result.training_loss,
        "first_logged_loss": sft.first_logged(trainer, "loss"), "final_logged_loss": sft.last_logged(trainer, "loss"),
        "eval_loss": after["loss"] if after else None,
        "eval": _compact(after), "before": _compact(before),
        "global_steps": trainer.state.global_step, "global_batch_size":
            args.per_device_train_batch_size * args.gradient_accumulation_steps * state.num_processes,
        "world_size": state.num_processes, "trained_tokens": trainer.state.num_input_tokens_seen,
        "runtime_s": round(time.time() - started, 2), "data": data.report(),
        "data_files": sft.data_fingerprints(cfg), "git_commit": sft.git_commit(),
    }
    if state.is_main_process:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer, cfg.classification, data.labels,
                     run / "adapter")
        sft.finish_run_dir(run, metrics)
        refresh_report(run)
        if after:
            print_scores(after, f"eval on {data.eval_source} after training", before)
    state.wait_for_everyone()
    sft.say(state, f"run complete: {run}")
    return run


# --------------------------------------------------------------------------- data


@dataclass
class LabelledData:
    """Tokenized rows with label ids, the label order, and counts for the report."""

    labels: list[str]
    train: dict[str, list] = field(default_factory=dict)  # input_ids, labels (ids), where
    eval: dict[str, list] | None = None
    eval_source: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One fact per line, for the start of a run."""
        per = {lab: self.train["labels"].count(i) for i, lab in enumerate(self.labels)}
        out = [f"data: {len(self.train['input_ids'])} train / {len(self.eval['input_ids']) if self.eval else 0} eval rows; "
               f"labels (head order): " + ", ".join(f"{lab} ({n})" for lab, n in per.items())]
        if self.counts.get("dropped_overlong") or self.counts.get("truncated"):
            out.append(f"data: {self.counts['dropped_overlong']} dropped and {self.counts['truncated']} truncated "
                       f"as longer than max_length={self.counts['max_length']}")
        return out

    def report(self) -> dict[str, Any]:
        """Counts for metrics.json."""
        return {"examples": {"train": len(self.train["input_ids"]), "eval": len(self.eval["input_ids"]) if self.eval else 0},
                "eval_source": self.eval_source, **self.counts}


def read_labelled(src: DataSource, c: ClassificationSection) -> list[tuple[str, str, str]]:
    """(text, label, where) per row of one source; a missing or wrong-typed field names file:line."""
    from peft_pipeline.data import read_source

    rows = read_source(src)
    if not rows:
        raise UserError(f"{src.path}: no rows; the dataset is empty")
    out = []
    for r in rows:
        for col, key in ((c.text_column, "text_column"), (c.label_column, "label_column")):
            if r.data.get(col) is None:
                have = ", ".join(sorted(r.data)) or "none"
                raise UserError(f"{r.where}: missing column '{col}' (classification.{key}; columns here: {have}); "
                                f"set classification.{key} or rename with data.train[].columns", exit_code=2)
        text, label = r.data[c.text_column], r.data[c.label_column]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{r.where}: '{c.text_column}' must be a non-empty string, got {text!r}"[:300])
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise UserError(f"{r.where}: label '{c.label_column}' must be a non-empty string or an integer, got {label!r}"[:300])
        out.append((text, str(label).strip(), r.where))
    return out


def resolve_labels(c: ClassificationSection, train_rows: list[tuple[str, str, str]]) -> list[str]:
    """The head's classes in order; every training label must be one of them."""
    if c.labels is None:
        labels = sorted({lab for _, lab, _ in train_rows})
        if len(labels) < 2:
            raise UserError(f"classification.labels: the training data has only the label {labels}; "
                            "a classifier needs at least 2 classes", exit_code=2)
        return labels
    for _, lab, where in train_rows:
        if lab not in c.labels:
            raise UserError(f"{where}: label '{lab}' is not one of classification.labels {c.labels}; "
                            "add it there or fix the row", exit_code=2)
    return list(c.labels)


def label_ids(rows: list[tuple[str, str, str]], labels: list[str]) -> list[int]:
    """Label strings to head indices; a label the head has no class for names its row."""
    index = {lab: i for i, lab in enumerate(labels)}
    out = []
    for _, lab, where in rows:
        if lab not in index:
            raise UserError(f"{where}: label '{lab}' is not a class of this classifier ({', '.join(labels)}); "
                            "it never appears in the training data", exit_code=2)
        out.append(index[lab])
    return out


def tokenize_rows(rows: list[tuple[str, str, str]], labels: list[str], tokenizer, max_length: int | None,
                  overlong: str, counts: dict[str, int]) -> dict[str, list]:
    """input_ids (raw text, the tokenizer's special tokens), label ids, where, text; over-long rows dropped or cut."""
    ids_of = label_ids(rows, labels)
    out: dict[str, list] = {"input_ids": [], "labels": [], "where": [], "text": []}
    for (text, _, where), y in zip(rows, ids_of):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if max_length and len(ids) > max_length:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids = ids[:max_length]
            counts["truncated"] += 1
        out["input_ids"].append(ids)
        out["labels"].append(y)
        out["where"].append(where)
        out["text"].append(text)
    return out


def load_data(cfg: RunConfig, tokenizer) -> LabelledData:
    """Read, mix, split, map labels and tokenize the run's train and eval data."""
    from peft_pipeline.data import mix, split_holdout

    c, d = cfg.classification, cfg.data
    train_rows = [row for src in d.train for row in mix(src, read_labelled(src, c), cfg.seed)]
    if d.eval:
        eval_rows = [row for src in d.eval for row in mix(src, read_labelled(src, c), cfg.seed)]
        source = ", ".join(s.path for s in d.eval)
    else:
        train_rows, eval_rows = split_holdout(train_rows, d.val_fraction, cfg.seed)
        source = f"val_fraction={d.val_fraction} of train"
    labels = resolve_labels(c, train_rows)
    counts = {"dropped_overlong": 0, "truncated": 0, "max_length": cfg.max_length}
    train = tokenize_rows(train_rows, labels, tokenizer, cfg.max_length, d.overlong, counts)
    evals = tokenize_rows(eval_rows, labels, tokenizer, cfg.max_length, d.overlong, counts) if eval_rows else None
    if not train["input_ids"]:
        raise UserError(f"training.max_length: every training row is longer than max_length={cfg.max_length}; "
                        "raise it or set data.overlong: truncate", exit_code=2)
    return LabelledData(labels, train, evals if evals and evals["input_ids"] else None, source, counts)


# --------------------------------------------------------------------------- model


def validate_against_model(cfg: RunConfig, path: str, labels: list[str]) -> None:
    """lora.* names checked against the classification architecture on the meta device."""
    from transformers import AutoModelForSequenceClassification

    from peft_pipeline.config import ConfigError
    from peft_pipeline.model import lora_problems, meta_model

    try:
        meta = meta_model(cfg.model, path, auto_class=AutoModelForSequenceClassification, num_labels=len(labels))
    except ValueError as e:
        raise UserError(f"model.name: {path} has no sequence-classification head in transformers "
                        f"({str(e).splitlines()[0]})", exit_code=2) from None
    problems = lora_problems(cfg.lora, meta)
    if problems:
        raise ConfigError(cfg.output_dir + "/config", problems)


def load_classifier(cfg: RunConfig, path: str, labels: list[str], pad_id: int | None, quantize: bool = True):
    """The base as AutoModelForSequenceClassification: the base's body, a new seeded head of len(labels) outputs."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from peft_pipeline.model import load_base

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized": that is the point; we say so ourselves
    try:
        model = load_base(cfg.model, cfg.quantization, path, quantize, auto_class=AutoModelForSequenceClassification,
                          num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={lab: i for i, lab in enumerate(labels)})
    finally:
        hf_logging.set_verbosity(verbosity)
    # The head pools the last token that is not pad: without a pad id it refuses batches > 1.
    model.config.pad_token_id = pad_id
    model.config.use_cache = False  # no KV cache in the outputs: eval logits stay a plain tensor
    return model


def attach_adapter(model, cfg: RunConfig):
    """LoRA on the body with task SEQ_CLS: peft adds the head to modules_to_save (trained in full, saved)."""
    import dataclasses

    from peft import get_peft_model, prepare_model_for_kbit_training

    from peft_pipeline.model import lora_config

    if cfg.quantization.mode != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, dataclasses.replace(lora_config(cfg.lora), task_type="SEQ_CLS"))


# --------------------------------------------------------------------------- trainer


def make_training_args(cfg: RunConfig, dtype, progress: bool = True):
    """transformers.TrainingArguments from the training section (SFT-only fields have no use here)."""
    import dataclasses

    from transformers import TrainingArguments

    from peft_pipeline.train import hardware_defaults

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    args = {k: v for k, v in cfg.sft_args.items() if k in fields}
    hardware_defaults(cfg, args, dtype)
    args.setdefault("label_names", ["labels"])
    args.setdefault("remove_unused_columns", False)  # the dataset holds exactly what the model takes
    args.setdefault("include_num_input_tokens_seen", "non_padding")
    args.setdefault("disable_tqdm", not progress)
    try:
        return TrainingArguments(**args)
    except (ValueError, TypeError) as e:
        raise UserError(f"training: {str(e).splitlines()[0]}", exit_code=2) from None


def make_trainer(args, model, tokenizer, data: LabelledData, run: Path, callbacks: list | None = None):
    """transformers.Trainer on padded batches, eval accuracy/macro F1 logged, the pipeline's callbacks."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    from peft_pipeline.train import Guard, JsonlLogger

    def as_dataset(cols):
        return Dataset.from_dict({"input_ids": cols["input_ids"], "labels": cols["labels"]}) if cols else None

    def compute_metrics(pred):
        import numpy as np

        from peft_pipeline.metrics import label_metrics

        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        m = label_metrics([data.labels[i] for i in np.argmax(logits, -1)], [data.labels[i] for i in pred.label_ids])
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(data.train), eval_dataset=as_dataset(data.eval),
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics)
    trainer.add_callback(JsonlLogger(run / "log.jsonl"))
    trainer.add_callback(Guard(run))
    for cb in callbacks or ():
        trainer.add_callback(cb)
    return trainer


def save_adapter(model, tokenizer, c: ClassificationSection, labels: list[str], target: Path) -> None:
    """LoRA + the head (modules_to_save) + tokenizer + classification.json (label order), written atomically."""
    from peft_pipeline.paths import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"task": "classification", "labels": labels, "text_column": c.text_column, "label_column": c.label_column}
        (tmp / LABELS_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- scoring


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

    from peft_pipeline.metrics import label_metrics

    preds, logits = predict(model, cols["input_ids"], pad_id, batch_size)
    loss = F.cross_entropy(torch.tensor(logits), torch.tensor(cols["labels"])).item()
    metrics = label_metrics([labels[p] for p in preds], [labels[y] for y in cols["labels"]])
    return {"n": len(preds), "loss": loss, **metrics, "predicted": [labels[p] for p in preds]}


def print_scores(m: dict, title: str, before: dict | None = None, out=None) -> None:
    """Accuracy, macro P/R/F1 (and the untrained head's, when given) and the confusion matrix."""
    from peft_pipeline.metrics import format_confusion_matrix

    out = out or sys.stdout
    print(f"\n{title}: {m['n']} rows", file=out)
    head = f"{'metric':<16}" + (f"{'before':>10}{'after':>10}" if before else f"{'adapter':>10}")
    print(head, file=out)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "loss"):
        print(f"{key:<16}" + (f"{before[key]:>10.4f}" if before else "") + f"{m[key]:>10.4f}", file=out)
    print(f"\nconfusion matrix:\n{format_confusion_matrix(m['confusion_matrix'])}", file=out)


# --------------------------------------------------------------------------- later stages on a classification run


def is_classification(target) -> bool:
    """Whether a resolved run/adapter dir holds a classifier (run config, or the adapter's own files)."""
    if target.config is not None and getattr(target.config, "task", "causal_lm") == "classification":
        return True
    adapter = target.adapter_dir
    if adapter is None:
        return False
    if (adapter / LABELS_FILE).is_file():
        return True
    try:
        return json.loads((adapter / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    except (OSError, ValueError):
        return False


def refuse(target, what: str, instead: str) -> None:
    """One-line usage error for a stage that does not apply to a classification run."""
    if is_classification(target):
        raise UserError(f"{target.path}: a classification run; {what}; {instead}", exit_code=2)


def evaluate(target, data: str | None = None, prompts: str | None = None, compare_base: bool = False,
             batch_size: int = 8, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """`peft-pipeline eval` on a classification run: label metrics on its eval split or --data FILE -> eval.json."""
    from peft import PeftModel

    from peft_pipeline import runs
    from peft_pipeline.paths import write_json_atomic

    if compare_base:
        raise UserError(f"{target.path}: --compare-base does not apply to a classification run: the base has no trained "
                        "head (metrics.json 'before' holds the untrained head's scores)", exit_code=2)
    if prompts:
        raise UserError(f"{target.path}: --prompts does not apply to a classification run (no generation); "
                        "pass --data FILE with text and label columns", exit_code=2)
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError("--batch-size and --limit must be at least 1", exit_code=2)
    info = json.loads((target.adapter_dir / LABELS_FILE).read_text())
    labels = info["labels"]
    cfg = target.config or RunConfig.model_validate({"task": "classification", "model": {"name": target.model_path}})
    cfg = cfg.model_copy(update={"classification": cfg.classification.model_copy(
        update={"text_column": info["text_column"], "label_column": info["label_column"], "labels": labels})})
    tokenizer = runs.load_tokenizer(target, padding_side="right")
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
    if limit:
        cols = {k: v[:limit] for k, v in cols.items()}
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


def _compact(m: dict | None) -> dict | None:
    """Scores without the per-row predictions (metrics.json stays small; eval.json has them)."""
    return {k: v for k, v in m.items() if k != "predicted"} if m else None
