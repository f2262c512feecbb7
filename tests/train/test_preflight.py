"""Preflight: the memory estimate against hand arithmetic, and the refusal when it cannot fit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peft_pipeline.train.preflight import GIB, activation_bytes, adapter_bytes, estimate, preflight, total_steps
from peft_pipeline.config import LoraSection
from peft_pipeline.errors import UserError
from peft_pipeline.train import preflight as pf

# The tiny llama of conftest: vocab 49152, hidden 64, intermediate 128, 2 layers, 4 heads of 16,
# 2 KV heads (k/v project to 32), tied embeddings.
EMBED = 49152 * 64                                    # 3,145,728
PER_LAYER = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64    # q, k, v, o
             + 3 * 64 * 128                           # gate, up, down
             + 2 * 64)                                # two RMSNorms
TOTAL = EMBED + 2 * PER_LAYER + 64                    # + final norm; lm_head is the embedding
# LoRA r=4 on all 7 linear layers: r * (in + out) each.
LORA = 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) + (64 + 128) + (128 + 64))


@pytest.fixture(scope="module")
def tiny_peft(tiny_base):
    from transformers import AutoModelForCausalLM

    from peft_pipeline.model.adapter import attach_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_base)  # float32
    return attach_adapter(base, LoraSection(r=4, target_modules="all-linear"), quantized=False)


def test_hand_counts_match_the_model(tiny_peft):
    assert (TOTAL, LORA) == (3_219_776, 8_192)
    est = estimate(tiny_peft, batch_size=2, seq_len=128, gradient_checkpointing=False)
    assert est.total_params == TOTAL + LORA and est.trainable_params == LORA


def test_estimate_equals_hand_arithmetic(tiny_peft):
    est = estimate(tiny_peft, batch_size=2, seq_len=128, gradient_checkpointing=False)
    buffers = sum(b.numel() * b.element_size() for b in tiny_peft.buffers())  # rotary frequencies
    assert buffers < 1024
    assert est.weights == TOTAL * 4 + buffers                  # fp32 frozen weights
    assert est.adapter == LORA * (4 + 4 + 8)                   # fp32 weight + grad + 2 Adam moments, no master copy
    # activations: 2 x 128 tokens; 2 layers x (16 x 64 + 6 x 128 = 1792 values) x 4 B; logits 49152 x (4 + 8) B
    layers = 2 * 128 * 2 * 1792 * 4                            # 3,670,016
    logits = 2 * 128 * 49152 * 12                              # 150,994,944
    assert est.activations == layers + logits
    # with checkpointing: layer inputs (2 x 64 x 4 B per token) + one layer recomputed (1792 x 4 B)
    assert est.activations_other == 2 * 128 * (2 * 64 * 4 + 1792 * 4) + logits
    assert est.overhead == 0 and est.total == est.weights + est.adapter + est.activations


def test_adapter_bytes_adds_an_fp32_master_copy_for_16_bit_weights():
    assert adapter_bytes(1000, 2) == 1000 * (2 + 2 + 8 + 4)
    assert adapter_bytes(1000, 4) == 1000 * (4 + 4 + 8)


def test_checkpointing_shrinks_activations_of_a_deep_model():
    # Llama-3.1-8B shapes, bf16, batch 8 x 2048
    on = activation_bytes(8, 2048, 32, 4096, 14336, 128256, 2, checkpointing=True)
    off = activation_bytes(8, 2048, 32, 4096, 14336, 128256, 2, checkpointing=False)
    assert on < off / 5  # the layers shrink ~20x; the logits (B S V x 10 B, 21 GB here) stay


def test_total_steps():
    assert total_steps(100, 8, 2, 1, max_steps=7, epochs=3) == 7
    assert total_steps(100, 8, 2, 1, max_steps=-1, epochs=3) == 7 * 3   # ceil(ceil(100/8)/2) = 7 per epoch
    assert total_steps(100, 8, 1, 2, max_steps=0, epochs=1.5) == 11      # ceil(100/16) = 7 -> 10.5 -> 11


def _setup(tmp_path, tiny_base, **training):
    """Only the fields preflight reads from the config and trl.SFTConfig."""
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=4, gradient_checkpointing=False,
                           max_length=128, max_steps=-1, num_train_epochs=1, **training)
    cfg = SimpleNamespace(quantization=SimpleNamespace(mode="none", double_quant=True), lora=SimpleNamespace(r=4))
    return cfg, args


def test_preflight_reports_the_numbers_and_records_them(tiny_peft, monkeypatch, tmp_path, tiny_base):
    monkeypatch.setattr(pf, "device_memory", lambda: ("test RAM", 64 * GIB))
    cfg, args = _setup(tmp_path, tiny_base)
    record, lines = preflight(cfg, tiny_peft, args, n_examples=100, longest=90)
    assert record["seq_len"] == 90  # batches are padded to the longest example, not max_length
    assert record["tokens_per_step_max"] == 2 * 90 * 4 and record["total_steps"] == 13  # ceil(50 / 4)
    assert record["device_bytes"] == 64 * GIB and record["total"] > 0
    assert "8,192 trainable" in lines[0] and "of 64.00 GiB test RAM" in lines[1] and "13 steps" in lines[2]


def test_preflight_refuses_what_clearly_does_not_fit(tiny_peft, monkeypatch, tmp_path, tiny_base):
    cfg, args = _setup(tmp_path, tiny_base)
    monkeypatch.setattr(pf, "device_memory", lambda: ("test GPU", 64 * 1024**2))  # 64 MiB
    with pytest.raises(UserError) as e:
        preflight(cfg, tiny_peft, args, n_examples=100, longest=128)
    msg = str(e.value)
    assert msg.startswith("preflight: training needs about") and "test GPU has 64.0 MiB" in msg
    for knob in ("per_device_train_batch_size (now 2", "training.max_length", "gradient_checkpointing: true",
                 "quantization.mode: 4bit", "lora.r (now 4)", "PEFT_PIPELINE_SKIP_PREFLIGHT=1"):
        assert knob in msg, knob
    monkeypatch.setenv("PEFT_PIPELINE_SKIP_PREFLIGHT", "1")
    record, _ = preflight(cfg, tiny_peft, args, n_examples=100, longest=128)
    assert record["total"] > record["device_bytes"]


def test_estimate_just_under_the_ratio_passes(tiny_peft, monkeypatch, tmp_path, tiny_base):
    cfg, args = _setup(tmp_path, tiny_base)
    need = estimate(tiny_peft, 2, 128, False).total
    monkeypatch.setattr(pf, "device_memory", lambda: ("test GPU", int(need / 1.19)))
    preflight(cfg, tiny_peft, args, n_examples=100, longest=128)
    monkeypatch.setattr(pf, "device_memory", lambda: ("test GPU", int(need / 1.21)))
    with pytest.raises(UserError):
        preflight(cfg, tiny_peft, args, n_examples=100, longest=128)


def test_sharded_training_divides_weights_over_the_processes(tiny_peft, monkeypatch, tmp_path, tiny_base):
    monkeypatch.setattr(pf, "device_memory", lambda: ("test GPU", 64 * GIB))
    cfg, args = _setup(tmp_path, tiny_base)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    ddp, _ = preflight(cfg, tiny_peft, args, n_examples=100, longest=128, world=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp, _ = preflight(cfg, tiny_peft, args, n_examples=100, longest=128, world=2)
    assert fsdp["weights"] == ddp["weights"] // 2 and fsdp["activations"] == ddp["activations"]
