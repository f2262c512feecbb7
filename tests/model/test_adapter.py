"""Adapters (model/adapter.py): scale_adapter keeps the model in memory and the adapter saved from it equal."""

from __future__ import annotations

import json

import torch


def test_scale_adapter_scales_memory_and_config_alike(tmp_path, tiny_base):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_pipeline.model.adapter import scale_adapter

    torch.manual_seed(0)
    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)  # noqa: E731
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 16},
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base(), config).eval()
    ids = torch.tensor([[1, 300, 301, 302]])
    with torch.no_grad():
        before = model(ids).logits
        assert scale_adapter(model, 0.25) == (8, 2)
        after = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == 2 and saved["alpha_pattern"] == {"v_proj": 4}
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base(), tmp_path / "a").eval()(ids).logits
        base_logits = base().eval()(ids).logits
    assert torch.allclose(after, reloaded, atol=1e-6)
    # between the base and the full adapter, nearer the base: the update is a quarter as large
    assert (after - base_logits).abs().max() < (before - base_logits).abs().max()
