"""What follows the machine: CPU or accelerator, mixed precision, logging backend, fused kernels.

Shared by every training method, so that a method's trainer arguments differ only in what the
method itself needs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from peft_pipeline.config import RunConfig


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


def checkpointing_default(args: dict[str, Any], config_class, model=None) -> None:
    """Gradient checkpointing only when memory needs it (TRL's configs default it to on), unless set.

    transformers >= 5.2x renamed the field activation_checkpointing (the old name warns); the
    config's gradient_checkpointing mirrors it. `model`: the loaded base, for the memory estimate.
    """
    import dataclasses

    import torch

    if "gradient_checkpointing" in args or "activation_checkpointing" in args:
        return
    from peft_pipeline.train.preflight import needs_gradient_checkpointing

    fields = {f.name for f in dataclasses.fields(config_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args[name] = torch.cuda.is_available() and model is not None and needs_gradient_checkpointing(args, model)


def method_args(cfg: RunConfig, config_class, dtype, model=None) -> dict[str, Any]:
    """The training section (with our defaults) for a method's TRL config, following the machine where unset.

    TRL's preference and RL configs default bf16 to True even on a CPU and learning_rate to 1e-6;
    ours set precision from the hardware and keep the pipeline's LoRA learning rate (TRAINING_DEFAULTS).
    """
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    args = {k: v for k, v in cfg.sft_args.items() if k in fields}
    hardware_defaults(cfg, args, dtype)
    checkpointing_default(args, config_class, model)
    args.setdefault("include_num_input_tokens_seen", "non_padding")
    return args


def build_config(config_class, args: dict[str, Any]):
    """The TRL config, its own refusals turned into one `training:` line (exit code 2)."""
    from peft_pipeline.errors import UserError

    try:
        return config_class(**args)
    except (ValueError, TypeError) as e:
        raise UserError(f"training: {str(e).splitlines()[0]}", exit_code=2) from None


def liger_available() -> bool:
    """Whether Liger's Triton kernels can be used (liger-kernel installed; the caller checks for a GPU)."""
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()
