"""FLOP counting against hand arithmetic, real tiny models, and NeMo Automodel's published figure."""

import pytest
from transformers import LlamaConfig, Qwen2Config

from peft_pipeline.tools.flops import H100_SXM_BF16_PEAK, count_lora_params, count_matmul_params, lora_flops_per_token, mfu, nemo_flops_per_token


def tiny_config(**overrides) -> LlamaConfig:
    """A 2-layer llama with GQA and a head_dim that is not hidden/heads."""
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**(kwargs | overrides))


def linear_weight_params(model) -> int:
    """Weights of every nn.Linear in the model (biases are not matmul params)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_tiny_config_by_hand():
    counts = count_matmul_params(tiny_config())
    # q: 64 -> 4*32 = 128: 8192      k, v: 64 -> 2*32 = 64: 4096 each     o: 128 -> 64: 8192
    # gate, up: 64 -> 128: 8192 each  down: 128 -> 64: 8192
    # per layer = 8192 + 4096 + 4096 + 8192 + 3 * 8192 = 49152
    # N = 2 * 49152 + lm_head 100 * 64 = 98304 + 6400 = 104704
    assert counts == {"N": 104704, "per_layer": 49152, "lm_head": 6400, "L": 2, "d_attn": 128}

    # LoRA r=4 all-linear, r x (in + out):
    # q 4*(64+128)=768, k 4*(64+64)=512, v 512, o 768, gate 768, up 768, down 768 -> 4864 per layer
    assert count_lora_params(tiny_config(), 4, "all-linear") == 2 * 4864
    assert count_lora_params(tiny_config(), 4, ["q_proj", "v_proj"]) == 2 * (768 + 512)
    # The head is one matrix, not one per layer: 4 * (64 + 100).
    assert count_lora_params(tiny_config(), 4, ["lm_head"]) == 656

    # Per token at S = 16: 4N + 6 N_lora + 6 L d_attn S = 418816 + 58368 + 24576 = 501760
    assert lora_flops_per_token(104704, 9728, 2, 128, 16) == 501760
    # NeMo: (6N + 6 L d_attn S) (2 + N_lora/N) / 3 = (628224 + 24576) * (2 + 9728/104704) / 3
    assert nemo_flops_per_token(104704, 9728, 2, 128, 16) == pytest.approx(652800 * (2 + 9728 / 104704) / 3)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("head_dim", [16, 32])  # 16 = hidden / heads; 32 widens attention
def test_matmul_params_equal_a_real_models_linear_weights(tied, head_dim):
    from transformers import LlamaForCausalLM

    config = tiny_config(tie_word_embeddings=tied, head_dim=head_dim)
    # A tied head is still a Linear whose matmul runs, so it is counted either way.
    assert linear_weight_params(LlamaForCausalLM(config)) == count_matmul_params(config)["N"]


def test_lora_params_equal_peft_all_linear():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = tiny_config()
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count_lora_params(config, 4, "all-linear")


def test_head_dim_falls_back_to_hidden_over_heads():
    # Mistral checkpoints may carry head_dim: null; a plain dict stands in for one.
    config = tiny_config().to_dict() | {"head_dim": None}
    assert count_matmul_params(config) == count_matmul_params(tiny_config(head_dim=16))


def test_qwen2_config_without_head_dim():
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    # head_dim = 64 / 4 = 16: q, o 64x64 = 4096 each, k, v 64x32 = 2048 each, mlp 3 * 8192
    # per layer 12288 + 24576 = 36864; N = 2 * 36864 + 6400 = 80128
    assert count_matmul_params(config)["N"] == 80128
    assert count_matmul_params(config)["d_attn"] == 64


def test_unknown_target_module_is_named():
    with pytest.raises(ValueError, match="'q_projj'"):
        count_lora_params(tiny_config(), 4, ["q_projj"])


def test_nemo_llama31_8b_reference():
    """NeMo Automodel: Llama-3.1-8B LoRA r16 all-linear, seq 4096, 1xH100: 12,473 tok/s = 40.7% MFU."""
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    c = count_matmul_params(config)
    n_lora = count_lora_params(config, 16, "all-linear")
    # per layer: q, o 4096^2 each, k, v 4096*1024 each, mlp 3*4096*14336 = 218,103,808
    # N = 32 * 218,103,808 + 128256 * 4096 = 6,979,321,856 + 525,336,576
    assert c["N"] == 7_504_658_432
    # per layer: 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432) = 1,310,720; x 32
    assert n_lora == 41_943_040
    args = (c["N"], n_lora, c["L"], c["d_attn"], 4096)
    tok_s = 12_473

    nemo = nemo_flops_per_token(*args)
    assert tok_s * nemo / 1e12 == pytest.approx(402, rel=0.01)  # 402.33 TFLOP/s
    assert mfu(tok_s, nemo, H100_SXM_BF16_PEAK) == pytest.approx(0.407, rel=0.01)  # 40.68%

    # Same run under our convention: 33.49 GFLOP/token -> 417.74 TFLOP/s -> 42.24% MFU, 3.8% higher.
    ours = lora_flops_per_token(*args)
    for name, f in (("ours", ours), ("nemo", nemo)):
        print(f"{name}: {f / 1e9:.2f} GFLOP/token, {tok_s * f / 1e12:.2f} TFLOP/s, MFU {mfu(tok_s, f):.2%}")
    assert 1.02 < ours / nemo < 1.06
    assert mfu(tok_s, ours) == pytest.approx(0.4224, abs=5e-4)
