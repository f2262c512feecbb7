"""Attention kernels: `sdpa_varlen`, SDPA that attends within each packed document only.

resolve_attention (model/load.py) picks it by default on machines without FlashAttention.
"""

from __future__ import annotations


def register_sdpa_varlen() -> None:
    """Register `sdpa_varlen` with transformers: SDPA that attends within each packed document only.

    A padding-free batch is one row of several documents told apart by position_ids restarting at 0.
    Stock SDPA handles it with a dense (tokens x tokens) block-diagonal mask, so attention costs the
    square of the whole pack, and the mask keeps the fused kernels from skipping the masked blocks:
    on a CPU, a pack of 8 rows spent about as much time in attention as padding would have saved.
    FlashAttention's varlen kernels avoid that on a GPU; without them, this runs causal SDPA on each
    document's slice (the sum of the squares of the document lengths). Any other batch (padded, with
    a mask, generation with a cache) takes transformers' own SDPA path unchanged.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("sdpa_varlen", sdpa_varlen_attention)
    AttentionMaskInterface.register("sdpa_varlen", sdpa_mask)


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, position_ids=None, **kwargs):
    """Attention for transformers' AttentionInterface; query (1, heads, tokens, dim) for a packed batch."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = document_starts(position_ids, query, key)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = starts + [query.shape[2]]
    # Sliding-window layers (Mistral, Gemma 2/3, Qwen with use_sliding_window, Phi-3): a document longer than the
    # window needs the banded mask; plain causal SDPA would let it see the whole document.
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    outputs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mask = sliding_causal_mask(b - a, window, query.device) if window and b - a > window else None
        outputs.append(sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], mask,
                                              dropout=dropout, scaling=scaling, is_causal=mask is None)[0])
    return torch.cat(outputs, dim=1), None  # (1, tokens, heads, dim), as sdpa_attention_forward returns


def sliding_causal_mask(n: int, window: int, device):
    """(1, 1, n, n) boolean mask: query i sees keys i - window < j <= i, as transformers' sliding_window_overlay."""
    import torch

    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]
    return ((diff >= 0) & (diff < window))[None, None]


def document_starts(position_ids, query, key) -> list[int] | None:
    """Where each document of a packed one-row batch starts, or None when the batch is not packed."""
    tokens = query.shape[2]
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[-1] != tokens or key.shape[2] != tokens:
        return None  # generation with a cache, padded batches, or no positions: not a pack
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None  # one document: plain causal SDPA is already exact and fastest
    return starts
