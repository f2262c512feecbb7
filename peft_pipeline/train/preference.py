"""Preference methods (DPO, KTO, ORPO, CPO): one Method for train/loop.py, parameterized by TRL's trainer.

`method: dpo | kto | orpo | cpo` makes this the method of the one training loop (tasks.method_for);
`training:` maps one to one onto the trainer's own config (trl.DPOConfig, trl.KTOConfig,
trl.experimental.orpo.ORPOConfig, trl.experimental.cpo.CPOConfig).

Choices, and why:
- The data stage (data/preference.py) hands TRL rendered strings: prompts through the run's chat
  template, completions closed by the end-of-turn token. TRL tokenizes them (prompt, then the
  completion where prompt and prompt+completion diverge); inspect and eval score the same ids.
- The pipeline builds the adapter (model/adapter.py: QLoRA preparation, layer choice, or init_from)
  and hands TRL the PeftModel. DPO and KTO then add a frozen "ref" adapter, a copy of the starting
  one, and compute the reference with it: for a fresh adapter (B = 0) that is exactly the base, and
  after `init_from: RUN` it is that run's policy. Either way one copy of the base weights is in memory
  (trainer.ref_model is None); save_adapter writes only "default". ORPO and CPO have no reference.
- Hardware defaults as for SFT: TRL's configs default bf16 to True (also on a CPU), gradient
  checkpointing to on and learning_rate to 1e-6; hardware.method_args sets precision from the
  machine, checkpointing only when memory needs it, and keeps the pipeline's LoRA learning rate.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from peft_pipeline.config import RunConfig
from peft_pipeline.console import library_deprecations_quiet, say
from peft_pipeline.train.prepared import Prepared

TRAINERS = {
    "dpo": "trl:DPOTrainer",
    "kto": "trl:KTOTrainer",
    "orpo": "trl.experimental.orpo:ORPOTrainer",
    "cpo": "trl.experimental.cpo:CPOTrainer",
}
# What metrics.json keeps of the final evaluation (eval_ prefix added by the trainer).
EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
             "eval_rewards/rejected", "eval_kl")


def trainer_class(method: str):
    """TRL's trainer class for a method (ORPO and CPO from trl.experimental, warning silenced)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    module, name = TRAINERS[method].split(":")
    return getattr(importlib.import_module(module), name)


def check_data(cfg: RunConfig, path: str, tokenizer) -> tuple[Any, list[str], str]:
    """lora.* names on the meta device, the chat template, then every row (file:line): shared with GRPO."""
    from peft_pipeline.data import preference
    from peft_pipeline.data.template import end_of_turn, ensure_chat_template
    from peft_pipeline.train.sft import validate_against_model

    validate_against_model(cfg, path)
    template = ensure_chat_template(tokenizer, cfg.model.chat_template)
    data = preference.load(cfg, tokenizer)
    lines = [*data.lines(), f"chat template: {template}; end of turn: {end_of_turn(tokenizer)!r}"]
    if cfg.init_from:
        lines.append(f"starting from {cfg.init_from}/adapter (its rank and targets; the lora: section does not apply)")
    return data, lines, template


def starting_model(cfg: RunConfig, prep: Prepared, config_class, state, rows_per_example: int = 1,
                   extra: dict | None = None):
    """Base, the method's TRL config, the adapter (fresh or init_from), the preflight; shared with GRPO.

    `extra`: config values the pipeline sets from other sections (GRPO's reward_weights from rewards:).
    """
    from transformers import set_seed

    from peft_pipeline.model.load import load_base, parameter_counts
    from peft_pipeline.train import controls
    from peft_pipeline.train.hardware import build_config, method_args
    from peft_pipeline.train.preflight import preflight

    base = load_base(cfg.model, cfg.quantization, prep.path)
    args = method_args(cfg, config_class, base.dtype, base)
    args.setdefault("disable_tqdm", not prep.facts.get("progress", True))
    args = build_config(config_class, {**args, **(extra or {})})
    set_seed(cfg.seed)  # the same LoRA init on every rank and from one run to the next
    model, _ = controls.build_model(base, cfg, bool(args.gradient_checkpointing))
    counts = parameter_counts(model)
    say(f"model: {prep.path}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
        f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%)", state=state)
    tokens = prep.facts["data"].tokens
    longest = tokens.get("prompt_max", 0) + (tokens.get("completion_max") or getattr(args, "max_completion_length", 0) or 0)
    record, lines = preflight(cfg, model, args, len(prep.train), longest or None, state.num_processes, rows_per_example)
    say(*lines, state=state)
    return model, args, {**counts, "preflight": record}


class Preference:
    """DPO, KTO, ORPO or CPO on rendered preference rows, with the LoRA the pipeline builds."""

    generates_text = True  # the retention check runs after training

    def __init__(self, method: str):
        self.name = method

    def check(self, cfg: RunConfig, path: str, tokenizer, progress: bool = True) -> Prepared:
        """Model names, template and every row before any weight loads."""
        from peft_pipeline.data.preference import as_dataset

        data, lines, template = check_data(cfg, path, tokenizer)
        return Prepared(path, tokenizer, as_dataset(data.train), as_dataset(data.eval), lines,
                        {"data": data, "chat_template": template, "progress": progress})

    def setup(self, cfg: RunConfig, prep: Prepared, run: Path, state):
        """The starting model and TRL's trainer, with early stopping as for SFT."""
        from peft_pipeline.config import method_config_class
        from peft_pipeline.train import controls

        # DPO, ORPO and CPO run chosen and rejected in one batch; KTO one completion per row.
        model, args, facts = starting_model(cfg, prep, method_config_class(self.name), state,
                                            1 if self.name == "kto" else 2)
        with library_deprecations_quiet():
            trainer = trainer_class(self.name)(model=model, args=args, train_dataset=prep.train,
                                               eval_dataset=prep.eval, processing_class=prep.tokenizer)
        controls.install(trainer, cfg, None, run, state.num_processes)  # early stopping
        reference = None if self.name in ("orpo", "cpo") else \
            f"{cfg.init_from}/adapter (frozen copy)" if cfg.init_from else "the base (adapter off)"
        return trainer, {**facts, "method": self.name, "init_from": cfg.init_from, "reference": reference,
                         "data": prep.facts["data"].report(), "chat_template": prep.facts["chat_template"]}

    def finish(self, trainer, prep: Prepared) -> dict[str, Any]:
        """The final evaluation's loss and preference numbers, peak memory, what early stopping did."""
        from peft_pipeline.train import controls
        from peft_pipeline.train.preflight import peak_memory

        final = trainer.evaluate() if prep.eval is not None else {}
        return {**{k: final.get(k) for k in EVAL_KEYS if k in final or k == "eval_loss"},
                "peak_memory": peak_memory(), **controls.summary(trainer)}

    def save(self, trainer, prep: Prepared, cfg: RunConfig, run: Path, weights) -> None:
        """adapter/ ("default" only) with tokenizer, template and stop tokens, as SFT's."""
        from peft_pipeline.train.loop import save_adapter

        save_adapter(trainer.accelerator.unwrap_model(trainer.model), prep.tokenizer, run / "adapter", weights)
