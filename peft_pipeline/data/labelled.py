"""Labelled rows for the classification task: text + label columns -> token ids + the head's label ids.

Labels are strings (integers in the data become "0", "1", ...); their order is the head's order:
classification.labels, else the sorted distinct training labels. Raw text, no chat template: the
head reads the hidden state of the last real token, and raw text is what a classifier is fed at
inference. Every bad row is a one-line error naming file:line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft_pipeline.config import ClassificationSection, DataSource, RunConfig
from peft_pipeline.errors import UserError

LABELS_FILE = "classification.json"  # in adapter/: the label order, text and label columns


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
    from peft_pipeline.data.formats import read_source

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
    from peft_pipeline.data.build import mix, split_holdout

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
