"""Classification task: a new sequence-classification head on the base, trained in full, LoRA on the body.

`task: classification` in a config makes this the method of train/loop.py (tasks.py chooses it), and
`eval` on its run dir goes to evaluate/classify.py. The base is loaded as AutoModelForSequenceClassification:
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
from pathlib import Path
from typing import Any

from peft_pipeline.config import RunConfig
from peft_pipeline.console import say
from peft_pipeline.errors import UserError
from peft_pipeline.train.prepared import Prepared


class Classification:
    """A new sequence-classification head trained in full, LoRA on the body, transformers' Trainer."""

    name = "classification"
    generates_text = False  # no retention check: the model predicts labels

    def check(self, cfg: RunConfig, path: str, tokenizer, progress: bool = True) -> Prepared:
        """Every data problem (file:line), then lora.* names against the classifier on the meta device."""
        from peft_pipeline.data.labelled import load_data

        data = load_data(cfg, tokenizer)
        validate_against_model(cfg, path, data.labels)
        return Prepared(path, tokenizer, data.train, data.eval, data.lines(), {"labelled": data, "progress": progress})

    def setup(self, cfg: RunConfig, prep: Prepared, run: Path, state):
        """The classifier (new seeded head) with LoRA, Trainer arguments, the Trainer; the untrained head's scores."""
        from transformers import set_seed

        from peft_pipeline.evaluate.classify import score_split
        from peft_pipeline.model.load import load_classifier, parameter_counts

        data = prep.facts["labelled"]
        set_seed(cfg.seed)  # the new head's and LoRA's initial weights
        model = attach_adapter(load_classifier(cfg, prep.path, data.labels, prep.tokenizer.pad_token_id), cfg)
        counts = parameter_counts(model)
        head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
        say(f"model: {prep.path} + new head ({len(data.labels)} labels): {counts['trainable_params']:,} trainable "
            f"of {counts['total_params']:,} parameters ({head:,} in the head, trained in full)", state=state)
        args = make_training_args(cfg, model.dtype, prep.facts["progress"])
        trainer = make_trainer(args, model, prep.tokenizer, data)
        before = score_split(model, data.eval, data.labels, prep.tokenizer.pad_token_id, args.per_device_eval_batch_size) \
            if cfg.classification.eval_before and data.eval else None
        if before:
            say(f"before training (untrained head): accuracy {before['accuracy']:.4f}, macro F1 {before['macro_f1']:.4f}",
                state=state)
        prep.facts["before"] = before
        return trainer, {**counts, "task": "classification", "head_params": head, "labels": data.labels,
                         "data": data.report()}

    def finish(self, trainer, prep: Prepared) -> dict[str, Any]:
        """The trained head's scores on the eval split (and the untrained one's, kept from setup)."""
        from peft_pipeline.evaluate.classify import _compact, score_split

        data = prep.facts["labelled"]
        model = trainer.model
        after = score_split(model, data.eval, data.labels, prep.tokenizer.pad_token_id,
                            trainer.args.per_device_eval_batch_size) if data.eval else None
        prep.facts["after"] = after
        return {"eval_loss": after["loss"] if after else None, "eval": _compact(after),
                "before": _compact(prep.facts["before"])}

    def save(self, trainer, prep: Prepared, cfg: RunConfig, run: Path, weights) -> None:
        """adapter/: LoRA + head + tokenizer + classification.json; the scores printed once saved."""
        from peft_pipeline.evaluate.classify import print_scores

        data = prep.facts["labelled"]
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), prep.tokenizer, cfg.classification, data.labels,
                     run / "adapter")
        if prep.facts["after"]:
            print_scores(prep.facts["after"], f"eval on {data.eval_source} after training", prep.facts["before"])


def validate_against_model(cfg: RunConfig, path: str, labels: list[str]) -> None:
    """lora.* names checked against the classification architecture on the meta device."""
    from transformers import AutoModelForSequenceClassification

    from peft_pipeline.config import ConfigError
    from peft_pipeline.model.adapter import lora_problems
    from peft_pipeline.model.load import meta_model

    try:
        meta = meta_model(cfg.model, path, auto_class=AutoModelForSequenceClassification, num_labels=len(labels))
    except ValueError as e:
        raise UserError(f"model.name: {path} has no sequence-classification head in transformers "
                        f"({str(e).splitlines()[0]})", exit_code=2) from None
    problems = lora_problems(cfg.lora, meta)
    if problems:
        raise ConfigError(cfg.output_dir + "/config", problems)


def attach_adapter(model, cfg: RunConfig):
    """LoRA on the body with task SEQ_CLS: peft adds the head to modules_to_save (trained in full, saved)."""
    import dataclasses

    from peft import get_peft_model, prepare_model_for_kbit_training

    from peft_pipeline.console import library_deprecations_quiet
    from peft_pipeline.model.adapter import lora_config

    with library_deprecations_quiet():
        if cfg.quantization.mode != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, dataclasses.replace(lora_config(cfg.lora), task_type="SEQ_CLS"))


# --------------------------------------------------------------------------- trainer


def make_training_args(cfg: RunConfig, dtype, progress: bool = True):
    """transformers.TrainingArguments from the training section (SFT-only fields have no use here)."""
    import dataclasses

    from transformers import TrainingArguments

    from peft_pipeline.train.hardware import hardware_defaults

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


def make_trainer(args, model, tokenizer, data):
    """transformers.Trainer on padded batches, eval accuracy/macro F1 logged, the pipeline's callbacks."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    def as_dataset(cols):
        return Dataset.from_dict({"input_ids": cols["input_ids"], "labels": cols["labels"]}) if cols else None

    def compute_metrics(pred):
        import numpy as np

        from peft_pipeline.evaluate.metrics import label_metrics

        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        m = label_metrics([data.labels[i] for i in np.argmax(logits, -1)], [data.labels[i] for i in pred.label_ids])
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(data.train), eval_dataset=as_dataset(data.eval),
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics)
    return trainer


def save_adapter(model, tokenizer, c, labels: list[str], target: Path) -> None:
    """LoRA + the head (modules_to_save) + tokenizer + classification.json (label order), written atomically."""
    from peft_pipeline.data.labelled import LABELS_FILE
    from peft_pipeline.paths import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"task": "classification", "labels": labels, "text_column": c.text_column, "label_column": c.label_column}
        (tmp / LABELS_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- scoring
