"""What a method's check hands to its setup: the base's path, the tokenizer, the datasets, facts to record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Prepared:
    """Everything known before any weight loads: a run that gets this far has no data or config problem left."""

    path: str  # the base model's directory or hub id
    tokenizer: Any
    train: Any  # the method's training rows (a datasets.Dataset, or the method's own columns)
    eval: Any  # held-out rows, or None
    lines: list[str] = field(default_factory=list)  # what to tell the user about the data
    facts: dict[str, Any] = field(default_factory=dict)  # the method's own (data report, labels, template)
