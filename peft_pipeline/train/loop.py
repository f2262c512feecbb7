"""The training stage: setup -> fit -> save, one sequence for every method (train/sft.py, train/classify.py).

    train(cfg, method)
      check       tokenizer, data and model-name checks: every problem before any weight loads
      start       the run directory (rundir.start): resolved config.yaml, metrics.json "running"
      setup       the method's base, adapter and trainer (with the pipeline's callbacks)
      fit         trainer.train (resuming when asked), then the guard's verdict
      save        the method's weights, the retention check, metrics.json "complete", report.md

Same code under `peft-pipeline train`, `python -m peft_pipeline train` and `accelerate launch -m
peft_pipeline train`; only the main process writes the run directory (rundir.py owns its layout).
"""

from __future__ import annotations

import time
from pathlib import Path

from peft_pipeline import rundir
from peft_pipeline.config import RunConfig
from peft_pipeline.console import library_deprecations_quiet, say
from peft_pipeline.train.prepared import Prepared


def train(cfg: RunConfig, method, overwrite: bool = False, resume: str | bool | None = None, progress: bool = True,
          callbacks: list | None = None) -> Path:
    """Run the training stage with `method` (tasks.method_for chooses it from the config); return the run dir.

    `callbacks`: extra transformers TrainerCallbacks (a sweep's trial reporter and pruner).
    """
    from accelerate import PartialState

    from peft_pipeline.report import refresh_report
    from peft_pipeline.train.hardware import runs_on_cpu

    state = PartialState(cpu=runs_on_cpu(cfg))
    run = Path(cfg.output_dir)
    rundir.check(run, overwrite, resume)
    prep = check(cfg, method, progress)
    say(*prep.lines, state=state)

    rundir.start(run, cfg, overwrite, resume, state)
    trainer, facts = method.setup(cfg, prep, run, state)
    add_callbacks(trainer, run, callbacks)
    retention = start_retention(cfg, trainer, prep, run, method, state)  # the base's answers, before training
    metrics = {**facts, **fit(trainer, run, resume, state)}
    metrics.update(final_scale(cfg, trainer, state))  # before the final eval, the save and the retention check
    metrics.update(method.finish(trainer, prep))
    weights = gather_sharded_weights(trainer)  # every rank joins; None when not sharded
    if state.is_main_process:
        method.save(trainer, prep, cfg, run, weights)
        if retention is not None:
            metrics["retention"] = after_training(retention, trainer)
        rundir.finish(run, {**metrics, "data_files": rundir.data_fingerprints(cfg), "git_commit": rundir.git_commit()})
        refresh_report(run)
    state.wait_for_everyone()
    say(f"run complete: {run}", state=state)
    return run


def check(cfg: RunConfig, method, progress: bool = True) -> Prepared:
    """Every check `train` makes before loading weights (also `peft-pipeline validate`): model, tokenizer, data."""
    from peft_pipeline.data.template import load_tokenizer
    from peft_pipeline.model.families import check_family
    from peft_pipeline.paths import resolve_model_path

    path = resolve_model_path(cfg.model)
    check_family(cfg, path)  # encoders, encoder-decoders, an attention kernel the family cannot run
    tokenizer = load_tokenizer(path, cfg.model)
    return method.check(cfg, path, tokenizer, progress)


def add_callbacks(trainer, run: Path, extra: list | None) -> None:
    """log.jsonl lines and the NaN/disk guard on every trainer, then the caller's own."""
    from peft_pipeline.train.callbacks import Guard, JsonlLogger

    trainer.add_callback(JsonlLogger(run / "log.jsonl"))
    trainer.add_callback(Guard(run))
    for callback in extra or ():
        trainer.add_callback(callback)


def fit(trainer, run: Path, resume, state) -> dict:
    """trainer.train (from the latest or a given checkpoint), then the numbers every run records."""
    from peft_pipeline.train.callbacks import Guard

    args = trainer.args
    world = state.num_processes
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    say(f"batch: {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
        f"x {world} processes = {global_batch} examples per optimizer step", state=state)
    started = time.time()
    checkpoint = rundir.resolve_resume(run, resume)
    if checkpoint and state.is_main_process:
        rundir.trim_log(run / "log.jsonl", checkpoint)
    with library_deprecations_quiet():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Guard)).raise_if_stopped()
    return {
        "train_loss": whole_run_loss(trainer) if checkpoint else result.training_loss,
        "final_logged_loss": last_logged(trainer, "loss"),
        "first_logged_loss": first_logged(trainer, "loss"),
        "global_steps": trainer.state.global_step,
        "global_batch_size": global_batch,
        "world_size": world,
        "trained_tokens": trainer.state.num_input_tokens_seen,
        "runtime_s": round(time.time() - started, 2),
    }


def final_scale(cfg: RunConfig, trainer, state) -> dict:
    """lora.final_scale: the trained update scaled toward the base, on every process (a float per layer, so
    sharded weights need nothing gathered); {} at 1. checkpoints/ were written before and keep it as trained."""
    from peft_pipeline.model.adapter import scale_adapter

    scale = cfg.lora.final_scale
    if scale == 1:
        return {}
    before, after = scale_adapter(trainer.accelerator.unwrap_model(trainer.model), scale)
    say(f"lora.final_scale {scale:g}: the adapter's update scaled to {scale:.0%} of the trained one "
        f"(lora_alpha {before:g} -> {after:g}); checkpoints/ keep it as trained", state=state)
    return {"final_scale": {"scale": scale, "lora_alpha_trained": before, "lora_alpha_saved": after}}


def start_retention(cfg: RunConfig, trainer, prep: Prepared, run: Path, method, state):
    """The forgetting check's reference: the base's answers to the retention set, asked (or read back on resume)
    on the main process before training; with data.retention_eval, scored again at every evaluation."""
    from peft_pipeline.errors import UserError
    from peft_pipeline.evaluate.retention import tracker

    if not method.generates_text or cfg.data.retention is None:
        return None
    if cfg.data.retention_eval and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise UserError("data.retention_eval: a sharded model (FSDP, DeepSpeed) generates only with every process "
                        "taking part, and the check asks on one; set it to false and run `peft-pipeline eval "
                        f"{cfg.output_dir} --retention` after training", exit_code=2)
    t = tracker(cfg, trainer, prep.tokenizer, run) if state.is_main_process else None
    if cfg.data.retention_eval:  # on every process: the others receive the main process's scores
        from peft_pipeline.train.callbacks import RetentionEval

        RetentionEval.install(trainer, t, run / "log.jsonl")
    return t


def after_training(retention, trainer) -> dict | None:
    """The forgetting check on the model still in memory, against the reference asked before training."""
    from peft_pipeline.evaluate.retention import after_training as retention_check

    return retention_check(retention, trainer)


# --------------------------------------------------------------------------- helpers


def whole_run_loss(trainer) -> float | None:
    """Mean training loss over every step of a resumed run (the trainer's own covers only the steps since).

    From the log history restored with the checkpoint: each logged loss averages the steps since the last log.
    """
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h]
    if not logged:
        return None
    total, previous = 0.0, 0
    for step, loss in logged:
        total, previous = total + loss * (step - previous), step
    return total / previous


def last_logged(trainer, key: str):
    """The last value of `key` in the trainer's log history."""
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[-1] if values else None


def first_logged(trainer, key: str):
    """The first value of `key` in the trainer's log history."""
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[0] if values else None


def gather_sharded_weights(trainer) -> dict | None:
    """Whole weights of a model sharded by FSDP or DeepSpeed ZeRO-3, for the main process to save.

    A collective: every rank must call it, or the gather hangs. Sharded, each rank holds only a
    slice of every LoRA matrix, so the main process saving alone would write its slice (ZeRO-3:
    empty tensors) or hang. None under DDP, ZeRO-1/2 or one process: every rank holds it whole.
    """
    acc = trainer.accelerator
    if trainer.is_fsdp_enabled:
        return acc.get_state_dict(trainer.model)  # the whole model, to the main process's CPU
    if trainer.is_deepspeed_enabled and acc.deepspeed_config["zero_optimization"].get("stage") == 3:
        # The frozen base stays partitioned; only the adapter is gathered (as Trainer.save_model does).
        return trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    return None


def save_adapter(model, tokenizer, target: Path, state_dict: dict | None = None) -> None:
    """Adapter + tokenizer + chat template + stop tokens, written atomically.

    A plain model (freeze.method: top_layers) is saved whole the same way, into model/ (see runs.resolve).
    `state_dict`: the gathered weights of a sharded model (see gather_sharded_weights).
    """
    from transformers import GenerationConfig

    from peft_pipeline.data.template import stop_ids
    from peft_pipeline.paths import atomic_dir

    stop = stop_ids(tokenizer)
    kwargs = {}
    if len(getattr(model, "peft_config", {})) > 1:
        # TRL's DPO/KTO (and GRPO with beta > 0) add a frozen "ref" adapter, a copy of the starting one,
        # as the reference model; only the trained "default" is the run's adapter.
        kwargs["selected_adapters"] = ["default"]
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, **kwargs)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(tmp)
