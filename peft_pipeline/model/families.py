"""Model families: what the pipeline knows about each architecture, decided from its config alone.

`family_of(path, model)` reads config.json (AutoConfig, no weights) and returns a Family: refused
(with a one-line reason) or supported, the attention kernels it needs or cannot use, and the LoRA
details that differ (gpt2's Conv1D layers, Gemma 3's vision tower). train checks it before any
weight loads (check_family); load_base picks the attention kernel and refuses through it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft_pipeline.config import ConfigError, ModelSection, RunConfig
from peft_pipeline.console import say
from peft_pipeline.errors import UserError

LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SOFTCAP = "Gemma 2 soft-caps its attention logits, which SDPA cannot do"


@dataclass(frozen=True)
class Family:
    """What the pipeline does differently for one model_type (the defaults fit Llama-like decoders)."""

    model_type: str
    targets: tuple[str, ...] = LLAMA_LIKE
    """The layers all-linear puts adapters on (the LM head never)."""
    eager: str | None = None
    """Why the family needs eager attention (or FlashAttention), when it does; sdpa and sdpa_varlen are refused."""
    conv1d: bool = False
    """Projections are transformers' Conv1D (weight stored in x out): LoRA needs fan_in_fan_out=True."""
    vision_tower: bool = False
    """Multimodal: adapters go on the language model only, never on the vision tower or projector."""
    refused: str | None = None
    """Why the pipeline refuses the model (encoders, encoder-decoders), or None."""
    tested: bool = True
    """False for a decoder the pipeline has not been tested on: tried, with a line saying so."""

    def refuse(self, where: str) -> None:
        """Raise the one-line UserError (exit 2) when the family is refused."""
        if self.refused:
            raise UserError(f"model.name: {where} is a {self.model_type} model: {self.refused}", exit_code=2)

    def attention_problem(self, attn: str) -> str | None:
        """Why `model.attn_implementation: attn` cannot work for this family, or None."""
        if self.eager and attn in ("sdpa", "sdpa_varlen"):
            return f"{attn} cannot run {self.model_type}: {self.eager}; use eager (auto picks it) or flash_attention_2"
        return None


# One tiny random model of each is trained, evaluated and merged in tests/integration/test_family_matrix.py.
_FAMILIES = [
    Family("llama"),  # Llama 3.1/3.2, SmolLM2, TinyLlama
    Family("mistral"),  # Mistral 7B, Nemo: sliding window, kept by sdpa_varlen
    Family("qwen2"),  # Qwen2.5
    Family("qwen3"),
    Family("gemma"),
    Family("gemma2", eager=SOFTCAP),
    Family("gemma3_text"),  # Gemma 3 270M / 1B
    Family("gemma3", vision_tower=True),  # Gemma 3 4B+ (image-text)
    Family("phi3", targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),  # Phi-3, Phi-3.5, Phi-4
    Family("phi", targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),  # Phi-1.5, Phi-2
    Family("olmo2"),
    Family("smollm3"),
    Family("gpt2", targets=("c_attn", "c_proj", "c_fc"), conv1d=True),
    Family("gpt_neox", targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),  # Pythia
]
FAMILIES = {f.model_type: f for f in _FAMILIES}

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "modernbert", "camembert", "mpnet"}
ENCODER = ("an encoder, with no causal LM head to generate text; peft-pipeline fine-tunes decoder-only models "
           "(llama, qwen2, gemma, phi3, ...)")
ENCODER_DECODER = ("an encoder-decoder; peft-pipeline fine-tunes decoder-only models (llama, qwen2, gemma, phi3, ...)")


def family_for_config(config) -> Family:
    """The Family for a transformers config (known, refused, or an untested decoder to try)."""
    model_type = getattr(config, "model_type", "") or ""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if getattr(config, "is_encoder_decoder", False):
        return Family(model_type, refused=ENCODER_DECODER, tested=False)
    if model_type in ENCODER_TYPES:
        return Family(model_type, refused=ENCODER, tested=False)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        return Family(model_type, refused="transformers has no causal-LM class for it", tested=False)
    return Family(model_type, tested=False)


def family_of(path: str, model: ModelSection) -> Family:
    """Read the config at `path` (no weights) and return its Family."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read a model config from {path} ({str(e).splitlines()[0]})") from None
    return family_for_config(config)


def check_family(cfg: RunConfig, path: str) -> Family:
    """Before any weight loads: refuse what cannot train, and an attention kernel the family cannot use."""
    family = family_of(path, cfg.model)
    if cfg.task == "classification" and family.refused == ENCODER:
        return family  # a sequence-classification head on an encoder body is what encoders are for
    family.refuse(path)
    problem = family.attention_problem(cfg.model.attn_implementation)
    if problem:
        raise ConfigError(cfg.output_dir + "/config", [f"model.attn_implementation: {problem}"])
    if not family.tested:
        say(f"model: {family.model_type or 'this'} family is not among the tested ones (README: Model families); trying it")
    return family


def attention_for(family: Family, requested: str, flash_available: bool) -> str | None:
    """The kernel a family needs instead of `requested`, saying so; None when `requested` stands.

    Refuses an explicit kernel the family cannot use (a run dir written before this check, a stage's override).
    """
    if not family.eager:
        return None
    if requested == "auto":
        if flash_available:
            return "flash_attention_2"
        say(f"model: {family.model_type} uses eager attention ({family.eager})")
        return "eager"
    problem = family.attention_problem(requested)
    if problem:
        raise UserError(f"model.attn_implementation: {problem}", exit_code=2)
    return None


def lora_kwargs(model) -> dict:
    """fan_in_fan_out for Conv1D families, exclude_modules keeping a vision tower free of adapters."""
    family = family_for_config(model.config)
    out: dict = {}
    if family.conv1d:
        out["fan_in_fan_out"] = True  # Conv1D stores weights (in, out); peft would only warn and flip it
    if family.vision_tower:
        out["exclude_modules"] = r".*(vision_tower|multi_modal_projector).*"
    return out
