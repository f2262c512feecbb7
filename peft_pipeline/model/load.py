"""Model stage: load the base's (quantized) weights for training, or a run's model for inference.

load_base: the causal LM (or a classifier on its body) as configured; meta_model: the architecture
with no weights, for config checks; load_model: what a run dir, adapter dir or merged dir holds,
ready for generation. Adapters are model/adapter.py, attention kernels model/attention.py.

Placement rule for several processes: each process loads the whole base onto its own device
(`device_map={"": local_rank}` when quantized on GPU; plain CPU otherwise). Never
`device_map="auto"`, which under DDP spreads one copy over all GPUs and silently trains at
world size 1 (trl #921).
"""

from __future__ import annotations

from typing import Any

from peft_pipeline.config import ModelSection, QuantizationSection, RunConfig
from peft_pipeline.console import library_deprecations_quiet, say_cpu_4bit
from peft_pipeline.errors import UserError
from peft_pipeline.paths import resolve_model_path
from peft_pipeline.rundir import Target

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_dtype(name: str):
    """'auto' -> bfloat16 on a GPU that supports it, else float32 (CPU matmuls are fastest in fp32)."""
    import torch

    if name != "auto":
        return getattr(torch, DTYPES[name])
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_attention(model: ModelSection, family=None) -> str:
    """'auto' -> FlashAttention 2 when installed on a GPU, else SDPA split by document (sdpa_varlen).

    `family` (model/families.py): a family that cannot use SDPA (Gemma 2) gets eager instead, with a line saying so.
    """
    import importlib.util

    import torch

    from peft_pipeline.model.attention import register_sdpa_varlen

    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if family is not None:
        from peft_pipeline.model.families import attention_for

        chosen = attention_for(family, model.attn_implementation, flash)
        if chosen is not None:
            return chosen
    if model.attn_implementation == "sdpa_varlen":
        register_sdpa_varlen()
    if model.attn_implementation != "auto":
        return model.attn_implementation
    if flash:
        return "flash_attention_2"
    register_sdpa_varlen()
    return "sdpa_varlen"


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
    (train/classify.py: AutoModelForSequenceClassification with num_labels, id2label, label2id).
    """
    from transformers import AutoModelForCausalLM

    from peft_pipeline.model.families import family_of

    path = path or resolve_model_path(model)
    family = family_of(path, model)  # config only: an encoder is refused before its weights load
    if auto_class is None:
        family.refuse(path)
    dtype = resolve_dtype(model.dtype)
    qconf = quantization_config(q, dtype) if quantize else None
    if qconf is not None and qconf.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            say_cpu_4bit()
    try:
        base = (auto_class or AutoModelForCausalLM).from_pretrained(
            path,
            revision=model.revision,
            dtype=dtype,
            attn_implementation=resolve_attention(model, family),
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


def parameter_counts(model) -> dict[str, int]:
    """Trainable and total parameters (4-bit weights counted as their logical size)."""
    if not hasattr(model, "get_nb_trainable_parameters"):  # a plain model (freeze.method: top_layers)
        params = list(model.parameters())
        return {"trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "total_params": sum(p.numel() for p in params)}
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": int(trainable), "total_params": int(total)}


def load_classifier(cfg: RunConfig, path: str, labels: list[str], pad_id: int | None, quantize: bool = True):
    """The base as AutoModelForSequenceClassification: the base's body, a new seeded head of len(labels) outputs."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized": that is the point; we say so ourselves
    try:
        model = load_base(cfg.model, cfg.quantization, path, quantize, auto_class=AutoModelForSequenceClassification,
                          num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={lab: i for i, lab in enumerate(labels)})
    finally:
        hf_logging.set_verbosity(verbosity)
    # The head pools the last token that is not pad: without a pad id it refuses batches > 1.
    model.config.pad_token_id = pad_id
    model.config.use_cache = False  # no KV cache in the outputs: eval logits stay a plain tensor
    return model


def load_model(target: Target, with_adapter: bool = True, quantized: bool | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, place_on_gpu: bool = False):
    """Base (+ adapter) ready for inference, in eval mode.

    `quantized=None` reproduces training (4-bit base for a QLoRA run); False loads full precision.
    `dtype` / `attn_implementation` override the run's model section (e.g. float32 + eager for merge checks).
    `place_on_gpu` moves an unquantized model to the GPU when there is one (eval, generate, chat).
    """
    from peft_pipeline.config import ModelSection, QuantizationSection

    model_cfg = target.config.model if target.config is not None else ModelSection(name=target.model_path)
    if dtype is not None:
        model_cfg = model_cfg.model_copy(update={"dtype": dtype})
    if attn_implementation is not None:
        model_cfg = model_cfg.model_copy(update={"attn_implementation": attn_implementation})
    qcfg = target.config.quantization if target.config is not None and target.kind != "merged" else QuantizationSection()
    if quantized is None:
        quantized = qcfg.mode != "none"
    model = load_base(model_cfg, qcfg, target.model_path, quantize=quantized)
    if place_on_gpu and not quantized:
        import torch

        if torch.cuda.is_available():
            # load_base leaves unquantized weights on the CPU (the trainer places them when training).
            model = model.to("cuda")
    if with_adapter and target.adapter_dir is not None:
        from peft import PeftModel

        with library_deprecations_quiet():
            model = PeftModel.from_pretrained(model, str(target.adapter_dir))
    model.eval()
    return model
