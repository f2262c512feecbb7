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


def liger_available() -> bool:
    """Whether Liger's Triton kernels can be used (liger-kernel installed; the caller checks for a GPU)."""
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()
