"""Preflight: before the first step, estimate peak training memory and refuse what clearly cannot fit.

A rough, documented estimate (bytes), meant to catch the 10x mistakes (a 7B base in fp32 on a
24 GB GPU, batch 64 at 4k tokens), not to predict the allocator to the megabyte:

    weights      every frozen parameter at its storage size (fp32 4 B, bf16/fp16 2 B, int8 1 B,
                 4-bit 0.5 B per weight measured from the loaded tensors), plus the 4-bit
                 quantization constants: 0.5 bit per weight (fp32 absmax per 64-weight block),
                 0.127 bit with double quantization.
    adapter      trainable parameters T: weight + gradient at their dtype, Adam's two fp32
                 moments (8 B), and an fp32 master copy (4 B) when the weights are not fp32.
    activations  B sequences x S tokens (S = min(max_length, longest example): batches are padded
                 to their longest row), L layers, hidden size H, MLP width I, vocabulary V, a bytes
                 per value, and K = 16 H + 6 I values per token and layer: what a llama-style layer
                 keeps for backward with LoRA (norms, q/k/v, attention output, the adapters' dropout
                 copies; gate, up and their product), the same formula train/sft.py's automatic
                 gradient-checkpointing switch uses; attention scores are not materialized (SDPA/flash):
                   without checkpointing  B S L K a
                   with checkpointing     B S L H a + B S K a   (layer inputs, one layer recomputed)
                   plus the logits        B S V (a + 8)   (logits, then fp32 log-softmax and its grad)
    overhead     0.5 GiB for the CUDA context on a GPU; nothing on the CPU.
Under FSDP or ZeRO-3 weights and adapter states are divided by the number of processes (the
model is measured before the trainer shards it); under DDP every process holds everything.

The device is the GPU's total memory, or the system RAM on the CPU. Training is refused when the
estimate exceeds REFUSE_RATIO x the device; PEFT_PIPELINE_SKIP_PREFLIGHT=1 lets it start anyway.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from peft_pipeline.errors import UserError

GIB = 1024**3
REFUSE_RATIO = 1.2
CUDA_CONTEXT_BYTES = GIB // 2
QUANT_CONSTANT_BITS = {"4bit": 0.5, "4bit+double": 0.127, "8bit": 0.0}


@dataclass
class Estimate:
    """Peak memory estimate for one training process, in bytes, and what it was made from."""

    total_params: int
    trainable_params: int
    weights: int
    adapter: int
    activations: int
    activations_other: int  # the same with gradient checkpointing toggled (what turning the knob gives)
    overhead: int
    gradient_checkpointing: bool
    batch_size: int
    seq_len: int
    device: str = ""
    device_bytes: int = 0

    @property
    def total(self) -> int:
        """The estimated peak."""
        return self.weights + self.adapter + self.activations + self.overhead

    def as_dict(self) -> dict[str, Any]:
        """For metrics.json ("preflight")."""
        return {**asdict(self), "total": self.total}


def adapter_bytes(trainable_params: int, param_bytes: int) -> int:
    """Weights + gradients at their dtype, Adam's 2 fp32 moments, an fp32 master copy if not fp32."""
    master = 4 if param_bytes < 4 else 0
    return trainable_params * (2 * param_bytes + 8 + master)


def activation_bytes(batch: int, seq: int, layers: int, hidden: int, intermediate: int, vocab: int,
                     value_bytes: int, checkpointing: bool) -> int:
    """Activations kept for backward (see the module docstring for the formula)."""
    per_layer = (16 * hidden + 6 * intermediate) * value_bytes
    if checkpointing:
        kept = batch * seq * (layers * hidden * value_bytes + per_layer)
    else:
        kept = batch * seq * layers * per_layer
    logits = batch * seq * vocab * (value_bytes + 8)
    return kept + logits


def needs_gradient_checkpointing(args: dict[str, Any], model) -> bool:
    """True when weights + activations of the longest possible micro-batch overflow 90% of this GPU.

    Activations by activation_bytes (the module docstring's formula) without checkpointing. Rough, and
    meant to err on the safe side.
    """
    import torch

    text = model.config.get_text_config()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batch, seq = int(args.get("per_device_train_batch_size", 8)), int(args.get("max_length") or 1024)
    width = 2 if args.get("bf16") or args.get("fp16") or model.dtype in (torch.bfloat16, torch.float16) else 4
    activations = activation_bytes(batch, seq, text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                                   text.vocab_size, width, checkpointing=False)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    needed = weights + activations
    if needed > 0.9 * total:
        print(f"[peft-pipeline] gradient checkpointing on: ~{needed / 2**30:.0f} GiB estimated for "
              f"{batch * seq} tokens per micro-batch, {total / 2**30:.0f} GiB on the GPU "
              "(set training.gradient_checkpointing to decide yourself)", flush=True)
        return True
    return False


def weight_bytes(model, quantization: str = "none", double_quant: bool = True) -> int:
    """Storage of the frozen parameters and buffers as loaded, plus 4-bit quantization constants."""
    total = 0
    quant_weights = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        if type(p).__name__ == "Params4bit":
            quant_weights += p.numel() * p.element_size() * 2  # two 4-bit weights per stored byte
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    if quantization == "4bit":
        bits = QUANT_CONSTANT_BITS["4bit+double" if double_quant else "4bit"]
        total += int(quant_weights * bits / 8)
    return total


def estimate(model, batch_size: int, seq_len: int, gradient_checkpointing: bool, quantization: str = "none",
             double_quant: bool = True, on_gpu: bool = False) -> Estimate:
    """Estimate peak memory for training `model` (a PEFT model, adapter attached) at this batch shape."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    param_bytes = trainable[0].element_size() if trainable else 4
    # Activations come out at the dtype of the float weights (norms and embeddings stay float under 4-bit).
    value_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point() and not p.requires_grad), 4)
    shape = dict(batch=batch_size, seq=seq_len, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                 intermediate=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
                 vocab=cfg.vocab_size, value_bytes=value_bytes)
    from peft_pipeline.model.load import parameter_counts

    total_params = parameter_counts(model)["total_params"]
    return Estimate(
        total_params=total_params, trainable_params=n_trainable,
        weights=weight_bytes(model, quantization, double_quant),
        adapter=adapter_bytes(n_trainable, param_bytes),
        activations=activation_bytes(**shape, checkpointing=gradient_checkpointing),
        activations_other=activation_bytes(**shape, checkpointing=not gradient_checkpointing),
        overhead=CUDA_CONTEXT_BYTES if on_gpu else 0,
        gradient_checkpointing=gradient_checkpointing, batch_size=batch_size, seq_len=seq_len,
    )


def device_memory() -> tuple[str, int]:
    """(name, bytes) of the memory training runs in: this process's GPU, else the system RAM."""
    import torch

    if torch.cuda.is_available():
        from accelerate import PartialState

        idx = PartialState().local_process_index
        props = torch.cuda.get_device_properties(idx)
        return f"GPU {idx} ({props.name})", int(props.total_memory)
    return "system RAM (CPU)", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def total_steps(n_examples: int, per_device: int, accumulation: int, world: int, max_steps: int, epochs: float) -> int:
    """Optimizer steps the trainer will take (max_steps when set, else epochs over the data)."""
    if max_steps and max_steps > 0:
        return max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_examples / (per_device * world)) / accumulation))
    return math.ceil(per_epoch * epochs)


def sharded(args) -> bool:
    """Whether FSDP or DeepSpeed ZeRO-3 will shard parameters across processes (set by accelerate launch)."""
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return True
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def preflight(cfg, model, args, n_examples: int, longest: int | None, world: int = 1,
              sequences_per_row: int = 1) -> tuple[dict, list[str]]:
    """Estimate, compare to the device, and return (record for metrics.json, lines to print).

    `sequences_per_row`: 2 for preference pairs (chosen and rejected run in one batch).
    Raises UserError, naming the numbers and the knobs, when the estimate is over REFUSE_RATIO x the device.
    """
    import torch

    cap = getattr(args, "max_length", None)  # GRPO's config has none (prompt + max_completion_length)
    seq = min(x for x in (cap, longest) if x) if (cap or longest) else 1024
    rows = args.per_device_train_batch_size * sequences_per_row
    est = estimate(model, rows, seq, bool(args.gradient_checkpointing),
                   cfg.quantization.mode, cfg.quantization.double_quant, on_gpu=torch.cuda.is_available())
    if world > 1 and sharded(args):  # FSDP / ZeRO-3 split weights and optimizer states over the processes
        est.weights, est.adapter = est.weights // world, est.adapter // world
    est.device, est.device_bytes = device_memory()
    accumulation = args.gradient_accumulation_steps
    tokens = rows * seq * accumulation * world
    steps = total_steps(n_examples, args.per_device_train_batch_size, accumulation, world, args.max_steps,
                        args.num_train_epochs)
    record = {**est.as_dict(), "tokens_per_step_max": tokens, "total_steps": steps}
    lines = [
        f"preflight: {est.total_params:,} parameters, {est.trainable_params:,} trainable",
        f"preflight: peak memory ~{_gib(est.total)} of {_gib(est.device_bytes)} {est.device}: weights "
        f"{_gib(est.weights)}, adapter+grads+Adam {_gib(est.adapter)}, activations {_gib(est.activations)} "
        f"(batch {est.batch_size} x {seq} tokens; {_gib(est.activations_other)} with gradient checkpointing "
        f"{'off' if est.gradient_checkpointing else 'on'})",
        f"preflight: at most {tokens:,} tokens per optimizer step ({rows} x {seq} x "
        f"{accumulation} accumulation x {world} processes), {steps:,} steps",
    ]
    if est.total > REFUSE_RATIO * est.device_bytes and os.environ.get("PEFT_PIPELINE_SKIP_PREFLIGHT") != "1":
        raise UserError(refusal(est, cfg))
    return record, lines


def refusal(est: Estimate, cfg) -> str:
    """One message: the numbers, then the knobs that shrink each part."""
    knobs = [f"training.per_device_train_batch_size (now {est.batch_size}; raise gradient_accumulation_steps to keep the batch)",
             f"training.max_length (batches are {est.seq_len} tokens long)"]
    if not est.gradient_checkpointing:
        knobs.append(f"training.gradient_checkpointing: true (activations {_gib(est.activations)} -> {_gib(est.activations_other)})")
    if cfg.quantization.mode != "4bit":
        knobs.append(f"quantization.mode: 4bit (weights now {_gib(est.weights)})")
    knobs.append(f"lora.r (now {cfg.lora.r}) or lora.target_modules")
    return (f"preflight: training needs about {_gib(est.total)} (weights {_gib(est.weights)}, adapter+grads+Adam "
            f"{_gib(est.adapter)}, activations {_gib(est.activations)}) but {est.device} has {_gib(est.device_bytes)}; "
            f"lower {'; '.join(knobs)}. Then re-run with --overwrite. To start anyway (the estimate is rough): "
            "PEFT_PIPELINE_SKIP_PREFLIGHT=1")


def peak_memory() -> dict[str, Any]:
    """Measured peak after training: the GPU allocator's peak, else this process's max resident set."""
    import torch

    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "cuda max_memory_allocated"}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": int(rss if sys.platform == "darwin" else rss * 1024), "kind": "cpu max RSS"}


def _gib(n: int | float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"
