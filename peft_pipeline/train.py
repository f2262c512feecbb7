"""Train stage: config -> data -> model -> TRL SFTTrainer -> a run directory.

The run directory is the contract with every later stage:
  adapter/        PEFT adapter + tokenizer + chat template + generation_config (stop tokens)
  config.yaml     the resolved config (enough to re-run)
  metrics.json    final losses, tokens, runtime, parameter counts, versions; "status": "complete" last
  log.jsonl       one JSON object per logged step
  checkpoints/    trainer checkpoints (resumable)
  report.md       for people: loss/learning-rate plots (plots/*.png), eval table (report.py)
Only the main process writes it. Same code under `peft-pipeline train`, `python -m peft_pipeline
train` and `accelerate launch -m peft_pipeline train`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from peft_pipeline.config import RunConfig
from peft_pipeline.errors import UserError


def train(cfg: RunConfig, overwrite: bool = False, resume: str | bool | None = None, progress: bool = True,
          callbacks: list | None = None) -> Path:
    """Run the whole training stage and return the run directory.

    `callbacks`: extra transformers TrainerCallbacks (a sweep's trial reporter and pruner).
    """
    if cfg.task == "classification":  # a new head on the base: its own stage module, same run dir contract
        from peft_pipeline import classify

        return classify.train(cfg, overwrite=overwrite, resume=resume, progress=progress, callbacks=callbacks)
    from accelerate import PartialState
    from transformers import set_seed

    from peft_pipeline import controls
    from peft_pipeline import data as data_stage
    from peft_pipeline import model as model_stage
    from peft_pipeline.preflight import peak_memory, preflight
    from peft_pipeline.report import refresh_report

    state = PartialState(cpu=runs_on_cpu(cfg))
    run = Path(cfg.output_dir)
    check_run_dir(run, overwrite, resume)
    path = model_stage.resolve_model_path(cfg.model)
    validate_against_model(cfg, path)

    tokenizer = model_stage.load_tokenizer(cfg.model, path)
    template = data_stage.ensure_chat_template(tokenizer, cfg.model.chat_template)
    train_ds, eval_ds, report = data_stage.build_datasets(cfg.data, tokenizer, cfg.max_length, cfg.seed, progress=progress)
    say(state, *report.lines(), f"chat template: {template}; end of turn: {data_stage.end_of_turn(tokenizer)!r}")

    start_run_dir(run, cfg, overwrite, resume, state)
    base = model_stage.load_base(cfg.model, cfg.quantization, path)
    args = make_sft_config(cfg, base.dtype, base)
    # Seeded before the adapter is built: the same LoRA init on every rank (FSDP shards it
    # without broadcasting from rank 0) and from one run to the next.
    set_seed(cfg.seed)
    model, plan = controls.build_model(base, cfg, args.gradient_checkpointing)  # LoRA, or top layers (freeze:)
    counts = model_stage.parameter_counts(model)
    say(state, f"model: {path}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} parameters "
               f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%)")
    preflight_record, lines = preflight(cfg, model, args, len(train_ds), report.tokens.get("length_max"),
                                        state.num_processes)  # refuses (UserError) what clearly cannot fit
    say(state, *lines)

    trainer = make_trainer(args, model, tokenizer, train_ds, eval_ds, run, callbacks)
    controls.install(trainer, cfg, plan, run, state.num_processes)  # early stopping, freezing schedule, NEFTune
    world = state.num_processes
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    say(state, f"batch: {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
               f"x {world} processes = {global_batch} examples per optimizer step")
    started = time.time()
    checkpoint = resolve_resume(run, resume)
    if checkpoint and state.is_main_process:
        trim_log(run / "log.jsonl", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Guard)).raise_if_stopped()
    final_eval = trainer.evaluate() if eval_ds is not None else {}
    metrics = {
        **counts,
        "train_loss": whole_run_loss(trainer) if checkpoint else result.training_loss,
        "final_logged_loss": last_logged(trainer, "loss"),
        "first_logged_loss": first_logged(trainer, "loss"),
        "eval_loss": final_eval.get("eval_loss"),
        "global_steps": trainer.state.global_step,
        "global_batch_size": global_batch,
        "world_size": world,
        "trained_tokens": trainer.state.num_input_tokens_seen,
        "runtime_s": round(time.time() - started, 2),
        "data": data_report_dict(report),
        "chat_template": template,
        "data_files": data_fingerprints(cfg),
        "git_commit": git_commit(),
        "preflight": preflight_record,
        "peak_memory": peak_memory(),
        **controls.summary(trainer),
    }
    weights = gather_sharded_weights(trainer)  # every rank joins; None when not sharded
    if state.is_main_process:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer, run / cfg.freeze.weights_dir, weights)
        from peft_pipeline.retention import after_training

        retention = after_training(cfg, trainer, tokenizer)  # base vs adapter on general prompts: what training cost
        if retention is not None:
            metrics["retention"] = retention
        finish_run_dir(run, metrics)
        refresh_report(run)
    state.wait_for_everyone()
    say(state, f"run complete: {run}")
    return run


# --------------------------------------------------------------------------- helpers


def say(state, *lines: str) -> None:
    """Print on the main process only, prefixed so users can grep the pipeline's own lines."""
    if state.is_main_process:
        for line in lines:
            print(f"[peft-pipeline] {line}", flush=True)


def runs_on_cpu(cfg: RunConfig) -> bool:
    """True when no accelerator is visible (or training.use_cpu is set).

    Accelerate forms a process group on the CPU (gloo) only when told cpu=True; without it every
    process that `accelerate launch` starts on a CPU-only machine trains alone at world size 1
    and writes the run dir as if it were the main process.
    """
    import torch

    if cfg.sft_args.get("use_cpu"):
        return True
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every device type
    return not (acc.is_available() if acc is not None else torch.cuda.is_available())


def validate_against_model(cfg: RunConfig, path: str) -> None:
    """Check lora.* names against the architecture on the meta device (no weights loaded)."""
    from peft_pipeline.config import ConfigError
    from peft_pipeline.controls import model_problems
    from peft_pipeline.model import lora_problems, meta_model

    meta = meta_model(cfg.model, path)
    problems = lora_problems(cfg.lora, meta) + model_problems(cfg, meta)
    if problems:
        raise ConfigError(cfg.output_dir + "/config", problems)


def check_run_dir(run: Path, overwrite: bool, resume) -> None:
    """Refuse to clobber a finished run, or to mix into an unfinished one without --resume."""
    if not run.exists() or overwrite or resume:
        return
    if run_status(run) == "complete":
        raise UserError(f"{run}: a finished run is already there; pass --overwrite or choose another output_dir", exit_code=2)
    if any(run.iterdir()):
        raise UserError(f"{run}: holds an unfinished run; pass --resume to continue it or --overwrite to start over", exit_code=2)


def run_status(run: Path) -> str | None:
    """'complete', 'running', 'failed' or None, from metrics.json."""
    try:
        return json.loads((run / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def start_run_dir(run: Path, cfg: RunConfig, overwrite: bool, resume, state) -> None:
    """Create the run dir (main process), save the resolved config, mark it running."""
    import shutil

    from peft_pipeline.paths import write_json_atomic

    if state.is_main_process:
        if overwrite and run.exists() and not resume:
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(run)
        (run / "config.yaml").write_text(cfg.to_yaml())
        write_json_atomic(run / "metrics.json", {"status": "running", "versions": package_versions()})
        if not resume:
            (run / "log.jsonl").write_text("")
    state.wait_for_everyone()


def resolve_resume(run: Path, resume) -> str | bool | None:
    """--resume (latest checkpoint) or --resume PATH; None to start fresh."""
    if not resume:
        return None
    if resume is True or resume == "auto":
        # trainer_state.json is written last: a checkpoint without it was cut short by a crash
        ckpts = sorted((p for p in (run / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                       key=lambda p: int(p.name.split("-")[-1]))
        return str(ckpts[-1]) if ckpts else None
    return str(resume)


def remove_partial_saves(run: Path) -> None:
    """Delete what a killed run left half-written (atomic_dir / write_json_atomic temporaries)."""
    import shutil

    for stale in run.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


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


def trim_log(log: Path, checkpoint: str) -> None:
    """Drop log.jsonl records past the checkpoint: those steps are trained again after a crash."""
    try:
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return
    log.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))


def make_sft_config(cfg: RunConfig, dtype, model=None):
    """trl.SFTConfig from the training section; precision, kernels and checkpointing follow the hardware unless set.

    `model`: the loaded base, for the memory estimate that decides gradient checkpointing on a GPU.
    """
    import torch
    from trl import SFTConfig

    args: dict[str, Any] = dict(cfg.sft_args)
    on_gpu = torch.cuda.is_available()
    hardware_defaults(cfg, args, dtype)
    args.setdefault("use_liger_kernel", on_gpu and liger_available())
    if "gradient_checkpointing" not in args:  # TRL's default is on; ours is "only when memory needs it"
        args["gradient_checkpointing"] = on_gpu and model is not None and needs_gradient_checkpointing(args, model)
    padding_free = args.get("padding_free") and not args.get("packing")
    if padding_free:
        # The data stage already dropped or cut rows longer than max_length; TRL refuses padding-free
        # without packing while max_length is set, because it would not truncate.
        args["max_length"] = None
    # A padding-free batch holds no pad token, and pad == EOS for many tokenizers (SmolLM2's): count them all.
    no_pads = padding_free and args.get("pad_to_multiple_of") in (None, "auto")
    args.setdefault("include_num_input_tokens_seen", "all" if no_pads else "non_padding")
    if cfg.data.augment.enabled:
        # TRL's preparation maps the dataset, which would bake one variant in; the data stage already
        # tokenized, masked and length-checked every row (augment.py).
        args["dataset_kwargs"] = {"skip_prepare_dataset": True}
    try:
        return SFTConfig(**args)
    except (ValueError, TypeError) as e:
        raise UserError(f"training: {str(e).splitlines()[0]}", exit_code=2) from None


def hardware_defaults(cfg: RunConfig, args: dict[str, Any], dtype) -> None:
    """Unset trainer arguments that follow the machine: logging backend, mixed precision, CPU."""
    import torch

    on_gpu = torch.cuda.is_available()
    if "report_to" not in cfg.training and importlib.util.find_spec("tensorboard") is not None:
        # TensorBoard when installed (never a dependency), logging into <output_dir>/tensorboard
        args["report_to"] = "tensorboard"
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.output_dir) / "tensorboard")
    args.setdefault("bf16", on_gpu and dtype == torch.bfloat16)
    args.setdefault("fp16", on_gpu and dtype == torch.float16)
    args.setdefault("use_cpu", runs_on_cpu(cfg))  # must agree with the PartialState made in train()


def liger_available() -> bool:
    """Whether Liger's Triton kernels can be used (liger-kernel installed; the caller checks for a GPU)."""
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()


def needs_gradient_checkpointing(args: dict[str, Any], model) -> bool:
    """True when weights + activations of the longest possible micro-batch overflow 90% of this GPU.

    Activations are estimated at (16 hidden + 6 intermediate) values per token and layer: what a
    llama-style layer keeps for the backward pass with LoRA (norm, q/k/v, attention output and the
    adapters' dropout copies; gate, up, their product). Rough, and meant to err on the safe side.
    """
    import torch

    text = model.config.get_text_config()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = int(args.get("per_device_train_batch_size", 8)) * int(args.get("max_length") or 1024)
    width = 2 if args.get("bf16") or args.get("fp16") or model.dtype in (torch.bfloat16, torch.float16) else 4
    per_token = text.num_hidden_layers * (16 * text.hidden_size + 6 * text.intermediate_size) * width
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    needed = weights + tokens * per_token
    if needed > 0.9 * total:
        print(f"[peft-pipeline] gradient checkpointing on: ~{needed / 2**30:.0f} GiB estimated for "
              f"{tokens} tokens per micro-batch, {total / 2**30:.0f} GiB on the GPU "
              "(set training.gradient_checkpointing to decide yourself)", flush=True)
        return True
    return False


def make_trainer(args, model, tokenizer, train_ds, eval_ds, run: Path, callbacks: list | None = None):
    """TRL's SFTTrainer on the pre-tokenized data (input_ids + labels), logging to log.jsonl."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    trainer.add_callback(JsonlLogger(run / "log.jsonl"))
    trainer.add_callback(Guard(run))
    if hasattr(train_ds, "set_epoch"):  # data.augment: the dataset serves each epoch's variants
        from peft_pipeline.augment import EpochCallback

        trainer.add_callback(EpochCallback(train_ds))
    for callback in callbacks or ():
        trainer.add_callback(callback)
    return trainer


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class JsonlLogger(_callback_base()):
    """Appends every trainer log (loss, lr, grad norm, eval metrics) as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_log(self.path, state, logs)


def append_log(path: Path, state, record: dict) -> None:
    """One log.jsonl line: the step, epoch and time of the trainer state, then the record."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **record}) + "\n")


class Guard(_callback_base()):
    """Stops on a NaN/inf loss or gradient norm without saving the bad state; checks disk before saves."""

    def __init__(self, run: Path):
        self.run = run
        self.bad: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.bad = f"{key} became {value} at step {state.global_step}"
                control.should_training_stop = True
                control.should_save = False  # never checkpoint non-finite weights
                control.should_evaluate = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and state.is_world_process_zero and model is not None:
            import shutil

            trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            need = 4 * trainable + 50_000_000  # weights + Adam moments (+ margin for RNG/scheduler/tokenizer)
            free = shutil.disk_usage(self.run).free
            if free < need:
                raise DiskFull(f"{self.run}: {free / 1e9:.2f} GB free, a checkpoint needs about {need / 1e9:.2f} GB; "
                               "free space or set output_dir on a larger disk")

    def raise_if_stopped(self) -> None:
        """After training: turn a non-finite stop into a user-facing error naming the last good checkpoint."""
        if self.bad:
            ckpts = sorted((self.run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            last = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was saved before it"
            raise UserError(f"training stopped: {self.bad}; {last}; lower training.learning_rate or set "
                            "training.max_grad_norm, then --resume")


class DiskFull(UserError):
    """Not enough free disk for the next checkpoint."""


def last_logged(trainer, key: str):
    """The last value of `key` in the trainer's log history."""
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[-1] if values else None


def first_logged(trainer, key: str):
    """The first value of `key` in the trainer's log history."""
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[0] if values else None


def data_report_dict(report) -> dict:
    """The data report as plain JSON."""
    from dataclasses import asdict

    return asdict(report)


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

    from peft_pipeline.data import stop_ids
    from peft_pipeline.paths import atomic_dir

    stop = stop_ids(tokenizer)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(tmp)


def finish_run_dir(run: Path, metrics: dict) -> None:
    """Write metrics.json last, with status complete: the marker that the run finished."""
    from peft_pipeline.paths import write_json_atomic

    write_json_atomic(run / "metrics.json", {**metrics, "versions": package_versions(), "status": "complete"})


def data_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """sha256 of every local data file the run read."""
    from peft_pipeline.data import file_digest

    out = {}
    for src in cfg.data.train + cfg.data.eval:
        p = Path(src.path)
        if p.is_file():
            out[src.path] = file_digest(p)
    return out


def git_commit() -> str | None:
    """The commit of this project's checkout (None when not run from a git checkout)."""
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of the stack, for reproducibility and bug reports."""
    import importlib.metadata as md
    import platform

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "peft-pipeline"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
