"""Lines for people: every stage prints its progress through `say`, prefixed so users can grep them."""

from __future__ import annotations

import contextlib

PREFIX = "[peft-pipeline]"


def say(*lines: str, state=None, prefix: str = PREFIX) -> None:
    """Print each line with the prefix; with an accelerate `state`, on the main process only."""
    if state is not None and not state.is_main_process:
        return
    for line in lines:
        print(f"{prefix} {line}", flush=True)


# bitsandbytes 0.50's CPU backend, on processors with AVX512-BF16 only, tries to fetch a fused 4-bit
# kernel from the hub through the optional `kernels` package at import time, and logs an install
# hint when it cannot (always, offline or without `kernels`). With `kernels` installed (transformers
# 5.24 requires it) and the hub offline, `kernels` itself first logs that it skips the publisher
# check. peft imports bitsandbytes whenever it is installed, so these lines would open every command,
# quantized or not, on those machines alone. Logger -> start of the message dropped.
BNB_KERNEL_HINT = "Failed to load CPU gemm_4bit_forward"
BNB_IMPORT_NOISE = {
    "bitsandbytes.backends.cpu.ops": BNB_KERNEL_HINT,
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}
_said_cpu_4bit = False


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' fused-kernel lines at import (logging only: imports nothing); idempotent."""
    import logging

    for name, start in BNB_IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(getattr(f, "peft_pipeline", False) for f in logger.filters):
            def keep(record: logging.LogRecord, start: str = start) -> bool:
                return not str(record.msg).startswith(start)

            keep.peft_pipeline = True  # type: ignore[attr-defined]
            logger.addFilter(keep)


def say_cpu_4bit() -> None:
    """Once per process, when 4-bit weights are loaded without a GPU: what that means, in our words."""
    global _said_cpu_4bit
    if not _said_cpu_4bit:
        _said_cpu_4bit = True
        say("quantization: 4-bit on the CPU runs bitsandbytes' portable CPU kernels (no fused kernel): "
            "several times slower than on a GPU, fine for tests and small models")


@contextlib.contextmanager
def library_deprecations_quiet():
    """Silence transformers 5's renames as peft and TRL still trip over them (`is_gradient_checkpointing`,
    `gradient_checkpointing_enable`): FutureWarnings from inside the libraries that a user can do nothing about."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated",
                                category=FutureWarning)
        yield
