"""Tasks (causal_lm, classification): chosen once, here, from the config or the run dir; no stage re-checks them.

- `method_for(cfg)`: the training method train/loop.py runs for a config (SFT, DPO/KTO/ORPO/CPO, GRPO,
  or a classification head).
- `stage(verb, path)`: the function that serves a later verb on a run dir, adapter dir or merged dir,
  for that run's task, or a one-line usage error where the verb does not apply to it.
Stages are named by import path so that choosing one imports nothing heavy.
"""

from __future__ import annotations

import importlib
import json
from typing import Callable

from peft_pipeline.errors import UserError

CAUSAL_LM = {
    "eval": "peft_pipeline.evaluate.run:evaluate",
    "generate": "peft_pipeline.evaluate.generate:generate_cli",
    "chat": "peft_pipeline.evaluate.generate:chat",
    "merge": "peft_pipeline.merge:merge",
    "export": "peft_pipeline.export.run:export",
}
# For a classification run: the stage, or (what does not apply, what to do instead).
CLASSIFICATION: dict[str, str | tuple[str, str]] = {
    "eval": "peft_pipeline.evaluate.classify:evaluate",
    "generate": ("it predicts labels, not text", "use `peft-pipeline eval {path}` [--data FILE]"),
    "chat": ("it predicts labels, not text", "use `peft-pipeline eval {path}` [--data FILE]"),
    "merge": ("merge is not supported for task: classification (its checks compare generations)",
              "use the adapter (it holds the head) on AutoModelForSequenceClassification"),
    "export": "peft_pipeline.export.run:export",
    "export:gguf": ("GGUF holds language models, not a classification head", "use --format adapter"),
}


def method_for(cfg):
    """The training method for this config's task and method: (train/sft.py, classify.py, preference.py, grpo.py)."""
    if cfg.task == "classification":
        from peft_pipeline.train.classify import Classification

        return Classification()
    if cfg.method == "grpo":
        from peft_pipeline.train.grpo import GRPO

        return GRPO()
    if cfg.method != "sft":
        from peft_pipeline.train.preference import Preference

        return Preference(cfg.method)
    from peft_pipeline.train.sft import SFT

    return SFT()


def stage(verb: str, path, variant: str | None = None) -> Callable:
    """The stage function for `verb` on `path` (variant: e.g. the export format), or a one-line refusal."""
    from peft_pipeline.rundir import resolve

    target = resolve(path)  # a missing or unreadable path is the first error
    table = CLASSIFICATION if is_classification(target) else CAUSAL_LM
    entry = table.get(f"{verb}:{variant}", table[verb]) if variant else table[verb]
    if isinstance(entry, tuple):
        what, instead = entry
        raise UserError(f"{target.path}: a classification run; {what}; {instead.format(path=target.path)}", exit_code=2)
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


def is_classification(target) -> bool:
    """Whether a resolved run/adapter dir holds a classifier (run config, or the adapter's own files)."""
    from peft_pipeline.data.labelled import LABELS_FILE

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


def train(cfg, **kwargs):
    """The training stage for this config's task: train/loop.py with the method chosen here (the Python API)."""
    from peft_pipeline.train.loop import train as run

    return run(cfg, method_for(cfg), **kwargs)
