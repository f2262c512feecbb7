"""GGUF export: written with llama.cpp's names and layouts, read back by transformers' GGUF loader.

The tiny models use initializer_range=0.2 rather than the default 0.02 so that attention is far from
uniform: then a q/k row permutation that is missing or wrong moves the logits by ~10 (measured),
while f16 rounding moves them by ~0.01 on logits of magnitude ~8. Tolerances below sit between.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_llama
from peft_pipeline.errors import UserError

F16_ATOL = 0.03  # max |logit diff|, f16 file vs fp32 model; logits here reach ~8, so ~0.4% of the range
Q8_ATOL = 1.0  # q8_0 (8-bit blocks of 32, f16 scale each): measured 0.51 here, ~40x the f16 error
TEXT = "The quick brown fox jumps over the lazy dog in 2024. " * 3
PROBES = (TEXT, "  spaces,\ttabs\nnewlines  ", "naïve café 我想在apple工作 🦙", "<|im_start|>user\nhi<|im_end|>\n")


def _tiny(path: Path, tokenizer, **overrides) -> Path:
    return make_tiny_llama(path, tokenizer, initializer_range=0.2, **overrides)


def _fields(gguf_file: Path, reader=None) -> tuple[dict, dict]:
    """(metadata key -> value for scalars/strings, tensor name -> ggml type name)."""
    from gguf import GGUFReader, GGUFValueType

    reader = reader or GGUFReader(gguf_file)
    meta = {k: f.contents() for k, f in reader.fields.items() if f.types and f.types[0] != GGUFValueType.ARRAY}
    return meta, {t.name: t.tensor_type.name for t in reader.tensors}


def _tensor_bytes(gguf_file: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(gguf_file).tensors)


def _logits(model_dir: Path, ids, gguf_name: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_name} if gguf_name else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tokenizer):
    """A tiny tied-embedding llama exported as f16 and q8_0 beside its safetensors."""
    from peft_pipeline.export.gguf import write_gguf

    d = _tiny(tmp_path_factory.mktemp("export") / "tied", tokenizer)
    write_gguf(d, d / "model-f16.gguf", "f16", progress=False)
    write_gguf(d, d / "model-q8_0.gguf", "q8_0", progress=False)
    return d


def test_f16_round_trip_matches_the_hf_model(tied, tokenizer):
    from peft_pipeline.export.gguf import verify_gguf

    report = verify_gguf(tied, tied / "model-f16.gguf", prompts=[TEXT, *PROBES[1:]], max_new_tokens=8)
    assert report["max_abs_logit_diff"] <= F16_ATOL, report
    assert report["top1_agreement"] == 1.0
    assert report["greedy_identical"]
    assert report["tokenizer_identical"]  # probe texts, the prompts and a chat-templated prompt
    assert report["chat_template_identical"]


@pytest.fixture(scope="module")
def tied_f16(tied):
    """The tied f16 file's metadata, tensor types and token types, parsed once (GGUFReader is slow on 49k tokens)."""
    from gguf import GGUFReader

    reader = GGUFReader(tied / "model-f16.gguf")
    meta, types = _fields(tied / "model-f16.gguf", reader)
    field = reader.fields["tokenizer.ggml.token_type"]
    return meta, types, [int(field.parts[i][0]) for i in field.data]


def test_f16_file_has_llama_cpp_metadata_and_types(tied_f16, tokenizer):
    meta, types, _ = tied_f16
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.feed_forward_length"] == 128 and meta["llama.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # SmolLM2's tokenizer.json: ByteLevel with GPT-2's regex
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False  # SmolLM2 adds no BOS when encoding
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == "F16" and types["blk.1.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"


def test_f16_control_tokens_are_marked(tied_f16, tokenizer):
    types = tied_f16[2]
    assert len(types) == len(tokenizer)
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3  # CONTROL
    assert types[tokenizer.convert_tokens_to_ids("Hello")] == 1  # NORMAL


def test_q8_0_is_quantized_smaller_and_close(tied, tokenizer):
    meta, types = _fields(tied / "model-q8_0.gguf")
    assert meta["general.file_type"] == 7  # MOSTLY_Q8_0
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_norm.weight"] == "F32"
    # Tensor bytes, not file size: this tiny model's file is mostly its 49k-token vocabulary.
    assert _tensor_bytes(tied / "model-q8_0.gguf") < 0.55 * _tensor_bytes(tied / "model-f16.gguf")  # 34/64

    ids = tokenizer(TEXT)["input_ids"]
    diff = (_logits(tied, ids) - _logits(tied, ids, "model-q8_0.gguf")).abs().max().item()
    assert diff <= Q8_ATOL


def test_untied_embeddings_write_an_output_tensor(tmp_path, tokenizer):
    from peft_pipeline.export.gguf import write_gguf

    d = _tiny(tmp_path / "untied", tokenizer, tie_word_embeddings=False)
    write_gguf(d, d / "m.gguf", "f16", progress=False)
    assert _fields(d / "m.gguf")[1]["output.weight"] == "F16"
    ids = tokenizer(TEXT)["input_ids"]
    assert (_logits(d, ids) - _logits(d, ids, "m.gguf")).abs().max().item() <= F16_ATOL


def test_llama_qk_biases_get_the_weight_permutation(tmp_path, tokenizer):
    """llama with attention_bias: q/k biases are permuted like their weights, which transformers' reader
    undoes. (Its loader then drops them, as no GGUF key says attention_bias, so this reads the tensors.)"""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors.torch import load_file, save_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from peft_pipeline.export.gguf import write_gguf

    d = _tiny(tmp_path / "bias", tokenizer, attention_bias=True)
    weights = load_file(d / "model.safetensors")
    torch.manual_seed(1)
    for k in weights:
        if k.endswith("_proj.bias"):  # they start at zero, where any layout looks right
            weights[k] = torch.randn_like(weights[k])
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})

    write_gguf(d, d / "m.gguf", "f16", progress=False)
    stored = {t.name: np.array(t.data) for t in GGUFReader(d / "m.gguf").tensors}
    unpermute = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for gguf_name, hf_name, permuted in (("attn_q", "q_proj", True), ("attn_k", "k_proj", True), ("attn_v", "v_proj", False)):
        name, original = f"blk.1.{gguf_name}.bias", weights[f"model.layers.1.self_attn.{hf_name}.bias"].numpy()
        assert np.array_equal(stored[name], original) is not permuted
        np.testing.assert_array_equal(unpermute.process(stored[name], name).weights, original)


def test_qwen2_round_trip(tmp_path, tokenizer):
    """qwen2: no q/k permutation (llama.cpp's qwen2 rope rotates halves, as HF does), biases on q/k/v."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from peft_pipeline.export.gguf import write_gguf

    torch.manual_seed(0)
    config = Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         initializer_range=0.2, max_position_embeddings=1024)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    d = tmp_path / "qwen2"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)

    write_gguf(d, d / "m.gguf", "f16", progress=False)
    meta, types = _fields(d / "m.gguf")
    assert meta["general.architecture"] == "qwen2" and "blk.1.attn_v.bias" in types
    ids = tokenizer(TEXT)["input_ids"]
    assert (_logits(d, ids) - _logits(d, ids, "m.gguf")).abs().max().item() <= F16_ATOL


def test_split_regex_pre_tokenizer_is_labelled_and_reads_back(tied, tmp_path, tokenizer):
    """A Llama 3 / Qwen2 style tokenizer.json (Split regex + ByteLevel) gets its llama.cpp name, and the
    tokenizer transformers rebuilds from the GGUF splits text the same way."""
    import shutil

    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from peft_pipeline.export.gguf import write_gguf

    d = tmp_path / "qwen-style"
    shutil.copytree(tied, d, ignore=shutil.ignore_patterns("*.gguf"))
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}
    (d / "tokenizer.json").write_text(json.dumps(spec))

    write_gguf(d, d / "m.gguf", "f16", progress=False)
    assert _fields(d / "m.gguf")[0]["tokenizer.ggml.pre"] == "qwen2"
    hf, gg = AutoTokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d, gguf_file="m.gguf")
    assert hf("a\n\n  b")["input_ids"] != tokenizer("a\n\n  b")["input_ids"]  # the edit took effect
    for text in PROBES + ("a\n\n  b", "hello!!!\n\n\nworld"):
        assert gg(text)["input_ids"] == hf(text)["input_ids"], text


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, tokenizer):
    """Llama 3.1+ rope scaling goes in as llama.cpp's rope_freqs: 1 for high frequencies, `factor` for low."""
    from gguf import GGUFReader

    from peft_pipeline.export.gguf import write_gguf

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    d = _tiny(tmp_path / "llama3", tokenizer, rope_parameters=rope, max_position_embeddings=2048)
    write_gguf(d, d / "m.gguf", "f16", progress=False)
    freqs = next(t for t in GGUFReader(d / "m.gguf").tensors if t.name == "rope_freqs.weight")
    values = [float(v) for v in freqs.data]
    assert freqs.tensor_type.name == "F32" and len(values) == 16 // 2
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(8.0)
    assert values == sorted(values)


def test_unsupported_architecture_is_a_one_line_user_error(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from peft_pipeline.export.gguf import write_gguf

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(d)
    with pytest.raises(UserError) as err:
        write_gguf(d, tmp_path / "out.gguf")
    message = str(err.value)
    assert "\n" not in message
    assert "'gpt2'" in message and "llama" in message and "qwen2" in message
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_quant_is_a_usage_error(tied, tmp_path):
    from peft_pipeline.export.gguf import write_gguf

    with pytest.raises(UserError) as err:
        write_gguf(tied, tmp_path / "x.gguf", quant="q4_k")
    assert err.value.exit_code == 2 and "f16, q8_0" in str(err.value)


def test_failed_write_keeps_the_previous_file_and_no_temp(tied, tmp_path, monkeypatch):
    import gguf

    from peft_pipeline.export.gguf import write_gguf

    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    calls = {"n": 0}
    real = gguf.quants.quantize

    def failing(data, qtype):
        calls["n"] += 1
        if calls["n"] == 5:  # halfway through the tensors, after the header is on disk
            raise OSError("disk full")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError):
        write_gguf(tied, out, "f16", progress=False)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.slow
def test_embedded_base_f16_round_trip(base_dir, tmp_path):
    """SmolLM2-135M-Instruct: the f16 file reads back with the same greedy continuation and tokenizer."""
    from peft_pipeline.export.gguf import verify_gguf, write_gguf

    out = write_gguf(base_dir, tmp_path / "smollm2-f16.gguf", "f16", progress=False)
    report = verify_gguf(base_dir, out, max_new_tokens=16)
    assert report["greedy_identical"], report
    assert report["tokenizer_identical"] and report["chat_template_identical"], report
    assert report["top1_agreement"] == 1.0, report
    assert report["max_abs_logit_diff"] < 0.1, report  # measured 0.04 on logits of magnitude ~20


# --------------------------------------------------------------------------- the export verb


EXPORT_ROWS = [{"instruction": "Name the city.", "input": f"Ship to {c}.", "output": c} for c in ("Oslo", "Lima", "Accra")]


def test_export_verb_writes_a_verified_gguf_from_the_merged_model(tmp_path, tokenizer, capsys):
    import conftest
    from peft_pipeline.cli import main

    base = conftest.make_tiny_llama(tmp_path / "base", tokenizer, initializer_range=0.2, tie_word_embeddings=False)
    run = conftest.make_run(tmp_path, base, tokenizer, EXPORT_ROWS, test_rows=EXPORT_ROWS)
    # no merged model yet: export says what to run first
    assert main(["export", str(run)]) == 1
    assert f"run `peft-pipeline merge {run}` first" in capsys.readouterr().err
    assert main(["merge", str(run)]) == 0
    assert main(["export", str(run), "--format", "gguf", "--quant", "f16"]) == 0
    report = json.loads((run / "export_report.json").read_text())
    assert report["status"] == "ok" and Path(report["file"]) == run / "export" / "run-f16.gguf"
    assert report["check"]["greedy_identical"] and report["check"]["tokenizer_identical"]
    assert report["test_scores"]["n"] == len(EXPORT_ROWS)  # scored on the run's test prompts like the adapter


def test_export_adapter_writes_a_model_card(tmp_path, tiny_base, tokenizer):
    import conftest
    from peft_pipeline.cli import main

    run = conftest.make_run(tmp_path, tiny_base, tokenizer, EXPORT_ROWS)
    assert main(["export", str(run), "--format", "adapter"]) == 0
    out = run / "export" / "adapter"
    card = (out / "README.md").read_text()
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert f"base_model: {tiny_base}" in card and "LoRA: r=16" in card and "AutoPeftModelForCausalLM" in card


def test_export_rejects_a_format_it_does_not_have(tmp_path, tiny_base, tokenizer):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "peft_pipeline", "export", str(tmp_path), "--format", "onnx"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'onnx'" in r.stderr
