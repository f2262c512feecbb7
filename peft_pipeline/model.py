"""Model stage: resolve the base, load tokenizer and (quantized) weights, attach the LoRA adapter.

Placement rule for several processes: each process loads the whole base onto its own device
(`device_map={"": local_rank}` when quantized on GPU; plain CPU otherwise). Never
`device_map="auto"`, which under DDP spreads one copy over all GPUs and silently trains at
world size 1 (trl #921).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from peft_pipeline.config import EMBEDDED_BASE, LoraSection, ModelSection, QuantizationSection
from peft_pipeline.errors import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model_path(model: ModelSection) -> str:
    """Local directory for the embedded base, else the user's name (hub id or directory)."""
    if model.name == EMBEDDED_BASE:
        from peft_pipeline.paths import embedded_base_dir

        return str(embedded_base_dir())
    path = Path(model.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: {path} exists but has no config.json; point it at a Hugging Face model directory")
        return str(path)
    if model.name.startswith((".", "/", "~")) or model.name.count("/") > 1:
        raise UserError(f"model.name: {model.name} does not exist; give a model directory, a hub id, or {EMBEDDED_BASE}")
    return model.name


def resolve_dtype(name: str):
    """'auto' -> bfloat16 on a GPU that supports it, else float32 (CPU matmuls are fastest in fp32)."""
    import torch

    if name != "auto":
        return getattr(torch, DTYPES[name])
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_attention(model: ModelSection) -> str:
    """'auto' -> FlashAttention 2 when installed on a GPU, else SDPA split by document (sdpa_varlen)."""
    if model.attn_implementation == "sdpa_varlen":
        register_sdpa_varlen()
    if model.attn_implementation != "auto":
        return model.attn_implementation
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    register_sdpa_varlen()
    return "sdpa_varlen"


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
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                      dropout=dropout, scaling=scaling, is_causal=True)[0]
               for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs, dim=1), None  # (1, tokens, heads, dim), as sdpa_attention_forward returns


def document_starts(position_ids, query, key) -> list[int] | None:
    """Where each document of a packed one-row batch starts, or None when the batch is not packed."""
    tokens = query.shape[2]
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[-1] != tokens or key.shape[2] != tokens:
        return None  # generation with a cache, padded batches, or no positions: not a pack
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None  # one document: plain causal SDPA is already exact and fastest
    return starts


def load_tokenizer(model: ModelSection, path: str | None = None):
    """The base's tokenizer, with a pad token (EOS when it has none) and right padding for training."""
    from transformers import AutoTokenizer

    path = path or resolve_model_path(model)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except OSError as e:
        raise UserError(f"model.name: cannot load a tokenizer from {path} ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # training; generation switches to left
    return tok


def quantization_config(q: QuantizationSection, dtype):
    """A transformers BitsAndBytesConfig for 8/4-bit, or None."""
    if q.mode == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    kwargs: dict[str, Any] = {}
    if q.storage_dtype != "auto":
        kwargs["bnb_4bit_quant_storage"] = getattr(torch, q.storage_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        **kwargs,
    )


def device_map_for(quantized: bool):
    """This process's own device for quantized weights on GPU (never 'auto'); None otherwise."""
    import torch

    if not quantized or not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_base(model: ModelSection, q: QuantizationSection, path: str | None = None, quantize: bool = True,
              auto_class=None, **extra):
    """Load the base causal LM (quantized when configured and `quantize`).

    `auto_class` / `extra`: another head on the same body and its from_pretrained arguments
    (classify.py: AutoModelForSequenceClassification with num_labels, id2label, label2id).
    """
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(model)
    dtype = resolve_dtype(model.dtype)
    qconf = quantization_config(q, dtype) if quantize else None
    try:
        base = (auto_class or AutoModelForCausalLM).from_pretrained(
            path,
            revision=model.revision,
            dtype=dtype,
            attn_implementation=resolve_attention(model),
            trust_remote_code=model.trust_remote_code,
            use_safetensors=None if model.allow_pickle else True,
            quantization_config=qconf,
            device_map=device_map_for(qconf is not None),
            **extra,
        )
    except OSError as e:
        first = str(e).splitlines()[0]
        hint = " (only .bin weights? set model.allow_pickle: true if you trust them)" if "safetensors" in first.lower() else ""
        raise UserError(f"model.name: cannot load weights from {path}: {first}{hint}") from None
    return base


def linear_module_names(model) -> list[str]:
    """Qualified names of the nn.Linear-like layers (including bitsandbytes layers)."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def meta_model(model: ModelSection, path: str | None = None, auto_class=None, **config_kwargs):
    """The architecture on the meta device: module names for validation, no weights loaded.

    `auto_class` / `config_kwargs`: another head on the body (as in load_base), e.g. num_labels.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path or resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code,
                                            **config_kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read a model config from {path} ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        return (auto_class or AutoModelForCausalLM).from_config(config, trust_remote_code=model.trust_remote_code)


def lora_problems(lora: LoraSection, model) -> list[str]:
    """Target/save module names that match nothing in this architecture, with a did-you-mean."""
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
    all_leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    problems = []
    arch = type(model).__name__
    if isinstance(lora.target_modules, list):
        for t in lora.target_modules:
            if not any(n == t or n.endswith("." + t) for n in names):
                close = difflib.get_close_matches(t, leaves, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f" (linear layers: {', '.join(leaves)})"
                problems.append(f"lora.target_modules: '{t}' matches no module of {arch}{hint}")
    elif lora.target_modules != "all-linear":
        import re

        if not any(re.fullmatch(lora.target_modules, n) for n in names):
            problems.append(f"lora.target_modules: regex '{lora.target_modules}' matches no module of {arch} (or use all-linear)")
    for t in lora.modules_to_save:
        if not any(n == t or n.endswith("." + t) for n in names):
            close = difflib.get_close_matches(t, all_leaves, n=1)
            problems.append(f"lora.modules_to_save: '{t}' matches no module of {arch}" + (f" (did you mean {close[0]}?)" if close else ""))
    if lora.layer_indices:
        n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        bad = [i for i in lora.layer_indices if n_layers is not None and not 0 <= i < n_layers]
        if bad:
            problems.append(f"lora.layers_to_transform: {bad} out of range; {arch} has layers 0..{n_layers - 1}")
    return problems


def lora_config(lora: LoraSection, model=None):
    """The peft.LoraConfig for this section (`model`: the base, to spell out all-linear for chosen layers)."""
    from peft import LoraConfig

    targets = lora.target_modules
    if targets == "all-linear" and lora.layer_indices is not None and model is not None:
        # peft refuses layers_to_transform with the all-linear shorthand: name every linear leaf but the head.
        head, linear = model.get_output_embeddings(), set(linear_module_names(model))
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n in linear and m is not head})

    init: Any = True if lora.init == "default" else lora.init
    kwargs: dict[str, Any] = {}
    if lora.init == "loftq":
        from peft import LoftQConfig

        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=lora.modules_to_save or None,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=init,
        bias=lora.bias,
        layers_to_transform=lora.layer_indices,  # ranges expanded
        task_type="CAUSAL_LM",
        **kwargs,
    )


def attach_adapter(base, lora: LoraSection, quantized: bool, gradient_checkpointing: bool = False):
    """Freeze the base and add LoRA; for k-bit bases, prepare norms/inputs for stable training first."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        base.enable_input_require_grads()
    return get_peft_model(base, lora_config(lora, base))


def parameter_counts(model) -> dict[str, int]:
    """Trainable and total parameters (4-bit weights counted as their logical size)."""
    if not hasattr(model, "get_nb_trainable_parameters"):  # a plain model (freeze.method: top_layers)
        params = list(model.parameters())
        return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "total_params": sum(p.numel() for p in params)}
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": int(trainable), "total_params": int(total)}
