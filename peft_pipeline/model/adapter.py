"""Adapters: LoRA settings checked against the architecture, built as a peft.LoraConfig and attached.

The checks run on the meta device (model/load.py meta_model), so a typo in lora.target_modules
is a one-line error with a did-you-mean before any weight loads.
"""

from __future__ import annotations

import difflib
from typing import Any

from peft_pipeline.config import LoraSection
from peft_pipeline.console import library_deprecations_quiet


def linear_module_names(model) -> list[str]:
    """Qualified names of the nn.Linear-like layers (bitsandbytes layers, and gpt2's Conv1D, which peft targets too)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


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
    if model is not None:
        from peft_pipeline.model.families import lora_kwargs

        kwargs.update(lora_kwargs(model))  # gpt2's Conv1D, Gemma 3's vision tower
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

    with library_deprecations_quiet():
        if quantized:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            base.enable_input_require_grads()
        return get_peft_model(base, lora_config(lora, base))


def scale_adapter(model, scale: float, adapter: str = "default") -> tuple[float, float]:
    """Multiply `adapter`'s update by `scale` in memory and in its config; return lora_alpha (before, after).

    Every LoRA layer's output is scaling * B(A(x)) with scaling = alpha / r (alpha / sqrt(r) with rsLoRA), so
    multiplying each layer's scaling and the config's lora_alpha (and alpha_pattern) by `scale` is the same
    change: the model in memory and the adapter saved from it (then merged, exported, served) agree.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]
    if not layers:
        raise ValueError(f"no LoRA layer holds adapter {adapter!r}")
    for layer in layers:  # lora_alpha too: peft's set_scale/unscale_layer recompute scaling from it
        layer.scaling[adapter] *= scale
        layer.lora_alpha[adapter] *= scale
    config = model.peft_config[adapter]
    before = config.lora_alpha
    config.lora_alpha = before * scale
    config.alpha_pattern = {k: v * scale for k, v in (config.alpha_pattern or {}).items()}
    return before, config.lora_alpha


def resume_adapter(base, run_dir: str, quantized: bool, gradient_checkpointing: bool = False):
    """A finished run's adapter (`init_from`) on the base, trainable, under the name "default".

    TRL's DPO/KTO find the adapter to train by that name and copy it into a frozen "ref" adapter: the
    reference model is then the starting adapter (e.g. the SFT policy), not the bare base. The run's
    lora: section does not apply: rank and targets are the saved adapter's.
    """
    from pathlib import Path

    from peft import PeftModel, prepare_model_for_kbit_training

    with library_deprecations_quiet():
        if quantized:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            base.enable_input_require_grads()
        return PeftModel.from_pretrained(base, str(Path(run_dir).expanduser() / "adapter"), is_trainable=True)
