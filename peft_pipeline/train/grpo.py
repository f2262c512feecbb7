"""GRPO: prompts, rewards from the config (evaluate/rewards.py), TRL's GRPOTrainer; a Method for train/loop.py.

`method: grpo` with a `rewards:` list; `training:` maps one to one onto trl.GRPOConfig (num_generations,
max_completion_length, beta, temperature, ...). Rows are prompts rendered through the chat template
(data/preference.py) with their reference answer in an `answer` column, which TRL passes to every reward.

Generation is what makes GRPO slow (on a CPU most of each step). TRL times it only for wandb/mlflow,
so GenerationClock wraps the trainer's generate call and adds to each log line (log.jsonl):
  generation/seconds        generation time in the logging interval
  generation/tokens_per_s   completion tokens generated per second of it
  generation/time_share     its share of the interval's wall-clock time
and the whole run's figures to metrics.json. Each reward's mean is TRL's own `rewards/<name>/mean`.
With beta = 0 (TRL's default) there is no reference at all; with beta > 0, TRL adds a frozen "ref" copy
of the starting adapter, as for DPO.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peft_pipeline.config import RunConfig
from peft_pipeline.console import library_deprecations_quiet
from peft_pipeline.train.prepared import Prepared


class GenerationClock(TrainerCallback):
    """Times the trainer's generation and counts its tokens; adds the interval's figures to each log line."""

    def __init__(self):
        self.seconds = self.tokens = 0.0
        self.total_seconds = self.total_tokens = 0.0
        self.since = self.started = time.perf_counter()

    def wrap(self, trainer) -> None:
        """Time trainer._generate (TRL 1.x: returns prompt_ids, completion_ids, ...)."""
        original = trainer._generate

        def timed(prompts):
            t0 = time.perf_counter()
            out = original(prompts)
            took = time.perf_counter() - t0
            tokens = sum(len(ids) for ids in out[1])
            self.seconds += took
            self.tokens += tokens
            self.total_seconds += took
            self.total_tokens += tokens
            return out

        trainer._generate = timed

    def on_train_begin(self, args, state, control, **kwargs):
        self.since = self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        wall = max(now - self.since, 1e-9)
        logs["generation/seconds"] = round(self.seconds, 3)
        logs["generation/tokens_per_s"] = round(self.tokens / self.seconds, 2) if self.seconds else None
        logs["generation/time_share"] = round(self.seconds / wall, 4)
        self.seconds = self.tokens = 0.0
        self.since = now

    def summary(self) -> dict[str, Any]:
        """The whole run's generation time, tokens/s and share of the training time."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        return {"seconds": round(self.total_seconds, 2), "tokens": int(self.total_tokens),
                "tokens_per_s": round(self.total_tokens / self.total_seconds, 2) if self.total_seconds else None,
                "time_share": round(self.total_seconds / wall, 4)}


class GRPO:
    """Group-relative policy optimization with verifiable rewards, on the LoRA the pipeline builds."""

    name = "grpo"
    generates_text = True

    def check(self, cfg: RunConfig, path: str, tokenizer, progress: bool = True) -> Prepared:
        """Model names, template, every prompt row, and every reward (user functions imported) before weights."""
        from peft_pipeline.data.preference import as_dataset
        from peft_pipeline.evaluate.rewards import build_all
        from peft_pipeline.train.preference import check_data

        data, lines, template = check_data(cfg, path, tokenizer)
        rewards = build_all(cfg.rewards)
        lines.append("rewards: " + ", ".join(f"{r.label} (x{r.weight:g})" for r in cfg.rewards))
        return Prepared(path, tokenizer, as_dataset(data.train), as_dataset(data.eval), lines,
                        {"data": data, "chat_template": template, "progress": progress, "rewards": rewards})

    def setup(self, cfg: RunConfig, prep: Prepared, run: Path, state):
        """The starting model, GRPOTrainer with the rewards and their weights, the generation clock."""
        from trl import GRPOConfig, GRPOTrainer

        from peft_pipeline.train import controls
        from peft_pipeline.train.preference import starting_model

        model, args, facts = starting_model(cfg, prep, GRPOConfig, state,
                                            extra={"reward_weights": [r.weight for r in cfg.rewards],
                                                   # GRPO batches hold no input_ids: transformers would warn each step
                                                   "include_num_input_tokens_seen": cfg.training.get(
                                                       "include_num_input_tokens_seen", "no")})
        with library_deprecations_quiet():
            trainer = GRPOTrainer(model=model, reward_funcs=prep.facts["rewards"], args=args,
                                  train_dataset=prep.train, eval_dataset=prep.eval, processing_class=prep.tokenizer)
        clock = GenerationClock()
        clock.wrap(trainer)
        trainer.add_callback(clock)  # before the loop's JsonlLogger: its figures reach log.jsonl
        prep.facts["clock"] = clock
        controls.install(trainer, cfg, None, run, state.num_processes)
        return trainer, {**facts, "method": "grpo", "init_from": cfg.init_from,
                         "rewards": [r.model_dump(exclude_none=True) for r in cfg.rewards],
                         "data": prep.facts["data"].report(), "chat_template": prep.facts["chat_template"]}

    def finish(self, trainer, prep: Prepared) -> dict[str, Any]:
        """Generation figures, the last logged reward means, peak memory."""
        from peft_pipeline.train.preflight import peak_memory

        history = [h for h in trainer.state.log_history if "reward" in h]
        last = history[-1] if history else {}
        first = history[0] if history else {}
        rewards = {k: {"first": first.get(k), "last": v} for k, v in last.items()
                   if k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))}
        return {"generation": prep.facts["clock"].summary(), "rewards": rewards, "peak_memory": peak_memory()}

    def save(self, trainer, prep: Prepared, cfg: RunConfig, run: Path, weights) -> None:
        """adapter/ ("default" only) with tokenizer, template and stop tokens, as SFT's."""
        from peft_pipeline.train.loop import save_adapter

        save_adapter(trainer.accelerator.unwrap_model(trainer.model), prep.tokenizer, run / "adapter", weights)

