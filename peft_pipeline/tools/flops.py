"""FLOPs per token and model FLOPs utilisation (MFU) for LoRA training, from a model config alone.

Counting (nothing is instantiated; llama / mistral / qwen2-style decoder configs):

    N       weight-matmul parameters: per layer q, k, v, o (k and v are hidden x kv_heads*head_dim
            under GQA) and gate, up, down (hidden x intermediate each), times L layers, plus the
            LM head (vocab x hidden), counted even when tied to the embedding because its matmul
            still runs. The embedding lookup, norms and biases are not matmuls and are left out.
    N_lora  r x (in + out) for every targeted matrix (the A and B factors).
    L       decoder layers.
    d_attn  heads x head_dim (the width of the attention score/value products).
    S       context per document, i.e. the sequence length one token attends over.

Two conventions for training FLOPs per token (say which one a figure uses):

    ours  F = 4N + 6 N_lora + 6 L d_attn S
          The frozen weights need forward (2N) and the activation gradient (2N) but no weight
          gradient; the adapters need all three (6 N_lora). Attention QK^T and AV cost 4 d_attn S
          per token and layer forward, 12 with backward (PaLM's 12 L d_attn S), halved here
          because the causal mask leaves half the score matrix unused.
    nemo  F = (6N + 6 L d_attn S) x (2 + N_lora / N) / 3
          NeMo Automodel's: full-fine-tune FLOPs scaled by 2/3 plus the adapter share.

    MFU = tokens/s x F / peak, with tokens the real (non-pad) tokens trained on.

Published reference (NeMo Automodel): Llama-3.1-8B, bf16 LoRA r=16 all-linear, seq 4096, one
H100 SXM, 12,473 tok/s. Here N = 7,504,658,432, N_lora = 41,943,040, L d_attn S = 536,870,912.
    nemo: 32.26 GFLOP/token -> 402.3 TFLOP/s -> 40.68% MFU (the published 402 TFLOP/s, 40.7%).
    ours: 33.49 GFLOP/token -> 417.7 TFLOP/s -> 42.24% MFU, 3.8% above the NeMo figure.
The gap: NeMo's formula expands to 4N + 2 N_lora + 4 L d_attn S (1 + N_lora/2N), so it charges
each adapter parameter 2 FLOPs instead of 6 and attention 4 L d_attn S instead of 6.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

H100_SXM_BF16_PEAK = 989e12
"""Dense bf16 tensor-core peak of one H100 SXM, FLOP/s (no sparsity)."""

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The per-layer linear layers of a llama-style decoder; what PEFT's "all-linear" targets."""


def _get(config: Any, name: str, default: Any = None) -> Any:
    """Read a field from a transformers config object or a plain dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _text_config(config: Any) -> Any:
    """The decoder's config: multimodal configs nest it under text_config."""
    if not isinstance(config, dict) and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _shapes(config: Any) -> dict[str, Any]:
    """(in_features, out_features) of each per-layer linear and the LM head, plus L and d_attn."""
    config = _text_config(config)
    hidden = _get(config, "hidden_size")
    heads = _get(config, "num_attention_heads")
    # Configs without GQA leave num_key_value_heads unset; mistral checkpoints may set head_dim: null.
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or hidden // heads
    inter = _get(config, "intermediate_size")
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    linears = {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return {
        "linears": linears,
        "lm_head": (hidden, _get(config, "vocab_size")),
        "L": _get(config, "num_hidden_layers"),
        "d_attn": q_out,
    }


def count_matmul_params(config: Any) -> dict[str, int]:
    """N (weight-matmul params incl. the LM head, tied or not), L and d_attn from a model config."""
    s = _shapes(config)
    per_layer = sum(i * o for i, o in s["linears"].values())
    lm_head = s["lm_head"][0] * s["lm_head"][1]
    return {
        "N": s["L"] * per_layer + lm_head,
        "per_layer": per_layer,
        "lm_head": lm_head,
        "L": s["L"],
        "d_attn": s["d_attn"],
    }


def count_lora_params(config: Any, r: int, target_modules: str | Iterable[str] = "all-linear") -> int:
    """Adapter parameters: r x (in + out) per targeted matrix; "all-linear" excludes lm_head."""
    s = _shapes(config)
    if target_modules == "all-linear":
        names = LINEAR_MODULES
    else:
        # One name passed as a bare string must not be iterated character by character.
        names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    total = 0
    for name in names:
        if name == "lm_head":
            # Targeting the head is legal in PEFT; it is one matrix, not one per layer.
            total += r * sum(s["lm_head"])
        elif name in s["linears"]:
            total += s["L"] * r * sum(s["linears"][name])
        else:
            known = ", ".join(LINEAR_MODULES + ("lm_head",))
            raise ValueError(f"target module {name!r} is not a llama-style linear (known: {known})")
    return total


def lora_flops_per_token(N: int, N_lora: int, L: int, d_attn: int, S: int) -> float:
    """Training FLOPs per token, "ours": 4N + 6 N_lora + 6 L d_attn S."""
    return 4 * N + 6 * N_lora + 6 * L * d_attn * S


def nemo_flops_per_token(N: int, N_lora: int, L: int, d_attn: int, S: int) -> float:
    """Training FLOPs per token, NeMo Automodel's: (6N + 6 L d_attn S) x (2 + N_lora/N) / 3."""
    return (6 * N + 6 * L * d_attn * S) * (2 + N_lora / N) / 3


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float = H100_SXM_BF16_PEAK) -> float:
    """Model FLOPs utilisation as a fraction of peak (0.407 means 40.7%)."""
    return tokens_per_s * flops_per_token / peak_flops
