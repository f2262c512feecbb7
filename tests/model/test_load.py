"""Model stage: base resolution, target-module validation, adapter attach on full-precision and 4-bit bases."""

from __future__ import annotations

import pytest
import torch

from peft_pipeline.config import LoraSection, ModelSection, QuantizationSection
from peft_pipeline.errors import UserError
from peft_pipeline.model.adapter import attach_adapter, linear_module_names, lora_problems
from peft_pipeline.model.load import load_base, meta_model, parameter_counts, resolve_model_path

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(ModelSection(name=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(ModelSection(name=str(tmp_path / "empty")))


def test_target_modules_are_checked_on_the_meta_device_with_hints(tiny_base):
    model = meta_model(ModelSection(name=str(tiny_base)))
    assert next(model.parameters()).device.type == "meta"
    ok = lora_problems(LoraSection(target_modules=["q_proj", "v_proj"]), model)
    assert ok == []
    bad = lora_problems(LoraSection(target_modules=["q_projj", "nothing_like_it"], modules_to_save=["lm_haed"],
                                    layers_to_transform=[0, 7]), model)
    assert "lora.target_modules: 'q_projj' matches no module of LlamaForCausalLM (did you mean q_proj?)" in bad
    assert any("'nothing_like_it'" in p and "linear layers:" in p for p in bad)
    assert any("lm_haed" in p and "did you mean lm_head?" in p for p in bad)
    assert any("layers_to_transform: [7] out of range" in p for p in bad)


def test_lora_freezes_the_base_and_counts_trainable_params(tiny_base):
    base = load_base(ModelSection(name=str(tiny_base)), QuantizationSection(), str(tiny_base))
    model = attach_adapter(base, LoraSection(r=4, target_modules="all-linear"), quantized=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    counts = parameter_counts(model)
    cfg = base.config
    # r x (in + out) for each of the 7 projections in each of the 2 layers
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + i) + (h + i) + (i + h))
    assert counts["trainable_params"] == per_layer * cfg.num_hidden_layers
    assert counts["total_params"] > counts["trainable_params"]


def test_modules_to_save_and_rslora_dora_options_reach_peft(tiny_base):
    base = load_base(ModelSection(name=str(tiny_base)), QuantizationSection(), str(tiny_base))
    model = attach_adapter(base, LoraSection(r=4, target_modules=["q_proj"], use_rslora=True, use_dora=True,
                                             modules_to_save=["lm_head"]), quantized=False)
    pc = model.peft_config["default"]
    assert pc.use_rslora and pc.use_dora and pc.target_modules == {"q_proj"}
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_qlora_4bit_on_cpu_trains_adapter_only(tiny_base):
    import bitsandbytes as bnb

    q = QuantizationSection(mode="4bit", quant_type="nf4", double_quant=True)
    base = load_base(ModelSection(name=str(tiny_base)), q, str(tiny_base))
    linears = [m for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * len(PROJ)  # every projection quantized (lm_head stays full precision)
    model = attach_adapter(base, LoraSection(r=4), quantized=True)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # one optimizer step moves LoRA weights and leaves the 4-bit base untouched
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (2, 12))
    model.train()
    for _ in range(2):  # B starts at zero, so A moves only from the second step
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    moved = [n for n in before if "lora_" in n and not torch.equal(before[n], after[n].detach())]
    assert len(moved) == len([n for n in before if "lora_" in n])
    assert all(torch.equal(before[n], after[n].detach()) for n in before if "lora_" not in n)


def test_linear_module_names_lists_projections(tiny_base):
    names = linear_module_names(meta_model(ModelSection(name=str(tiny_base))))
    assert {n.rsplit(".", 1)[-1] for n in names} == set(PROJ) | {"lm_head"}
