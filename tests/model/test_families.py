"""model/families.py: per-family decisions from the config alone, refusals before load, LoRA placement per family."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import FAMILIES, REPO, make_tiny_family, write_jsonl
from peft_pipeline.config import ConfigError, LoraSection, ModelSection, QuantizationSection, RunConfig
from peft_pipeline.errors import UserError
from peft_pipeline.model.adapter import attach_adapter, lora_problems
from peft_pipeline.model.families import FAMILIES as KNOWN
from peft_pipeline.model.families import check_family, family_of
from peft_pipeline.model.load import load_base, meta_model


def run_cfg(base, **model) -> RunConfig:
    return RunConfig.model_validate({"model": {"name": str(base), **model}, "data": {"train": []}, "output_dir": "/tmp/x"})


def adapted_leaves(model) -> dict[str, set[str]]:
    """{'language'|'vision'|'all': leaf names of the modules that carry a LoRA}."""
    out: dict[str, set[str]] = {"language": set(), "vision": set(), "all": set()}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and name:
            leaf = name.rsplit(".", 1)[-1]
            out["all"].add(leaf)
            out["vision" if "vision_tower" in name or "multi_modal_projector" in name else "language"].add(leaf)
    return out


def test_every_family_in_the_matrix_is_known_and_the_readme_lists_it():
    readme = (REPO / "README.md").read_text()
    for model_type in FAMILIES:
        assert model_type in KNOWN, model_type
        assert f"| {model_type} " in readme or f"`{model_type}`" in readme, f"README families table lacks {model_type}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_all_linear_puts_adapters_on_the_familys_layers(model_type, tiny_family, one_thread):
    path = tiny_family(model_type)
    family = family_of(str(path), ModelSection(name=str(path)))
    assert family.model_type == model_type and family.refused is None and family.tested
    base = load_base(ModelSection(name=str(path)), QuantizationSection(), str(path))
    model = attach_adapter(base, LoraSection(r=2, target_modules="all-linear"), quantized=False)
    leaves = adapted_leaves(model)
    assert leaves["language"] == set(family.targets)  # the LM head never, every projection always
    assert leaves["vision"] == set()  # Gemma 3's vision tower and projector stay adapter-free
    assert model.peft_config["default"].fan_in_fan_out == family.conv1d


def test_gemma3_list_targets_stay_off_the_vision_tower(tiny_family, one_thread):
    path = tiny_family("gemma3")
    base = load_base(ModelSection(name=str(path)), QuantizationSection(), str(path))
    assert any("vision_tower" in n and n.endswith("q_proj") for n, _ in base.named_modules())  # the tower has q_proj too
    model = attach_adapter(base, LoraSection(r=2, target_modules=["q_proj", "v_proj"]), quantized=False)
    leaves = adapted_leaves(model)
    assert leaves == {"language": {"q_proj", "v_proj"}, "vision": set(), "all": {"q_proj", "v_proj"}}


def test_gpt2_conv1d_lora_matches_the_layer_it_wraps(tiny_family, one_thread):
    """fan_in_fan_out: the LoRA delta has the Conv1D weight's (in, out) layout, so merging adds it where it belongs."""
    path = tiny_family("gpt2")
    base = load_base(ModelSection(name=str(path)), QuantizationSection(), str(path))
    model = attach_adapter(base, LoraSection(r=2, target_modules=["c_attn"]), quantized=False)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out
    assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape
    # Conv1D layers count as linear for the name check too: a typo gets its did-you-mean.
    meta = meta_model(ModelSection(name=str(path)))
    assert lora_problems(LoraSection(target_modules=["c_atn"]), meta) == \
        ["lora.target_modules: 'c_atn' matches no module of GPT2LMHeadModel (did you mean c_attn?)"]


def test_gemma2_gets_eager_attention_with_a_line(tiny_family, capsys):
    path = tiny_family("gemma2")
    base = load_base(ModelSection(name=str(path)), QuantizationSection(), str(path))
    assert base.config._attn_implementation == "eager"
    assert "model: gemma2 uses eager attention (Gemma 2 soft-caps its attention logits" in capsys.readouterr().out
    load_base(ModelSection(name=str(path), attn_implementation="eager"), QuantizationSection(), str(path))
    assert "eager" not in capsys.readouterr().out  # asked for: nothing to say


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen"])
def test_gemma2_with_sdpa_is_refused_before_load(attn, tiny_family):
    path = tiny_family("gemma2")
    with pytest.raises(ConfigError, match=f"model.attn_implementation: {attn} cannot run gemma2: Gemma 2 soft-caps"):
        check_family(run_cfg(path, attn_implementation=attn), str(path))
    with pytest.raises(UserError, match="cannot run gemma2"):  # a run dir written before the check
        load_base(ModelSection(name=str(path), attn_implementation=attn), QuantizationSection(), str(path))


def config_only(tmp_path, config) -> str:
    """A model dir holding config.json and no weights: a refusal that needed the weights would fail differently."""
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def test_encoders_and_encoder_decoders_are_refused_from_the_config(tmp_path):
    from transformers import BertConfig, T5Config

    bert = config_only(tmp_path / "bert", BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64))
    t5 = config_only(tmp_path / "t5", T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64))
    with pytest.raises(UserError, match=r"is a bert model: an encoder, with no causal LM head") as e:
        check_family(run_cfg(bert), bert)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"is a t5 model: an encoder-decoder; peft-pipeline fine-tunes decoder-only"):
        load_base(ModelSection(name=t5), QuantizationSection(), t5)
    # A classification head on an encoder body is what encoders are for: not refused there.
    cls = RunConfig.model_validate({"model": {"name": bert}, "task": "classification", "data": {"train": []},
                                    "output_dir": "/tmp/x"})
    assert check_family(cls, bert).model_type == "bert"


def cli(*argv: str):
    return subprocess.run([sys.executable, "-m", "peft_pipeline", *argv], capture_output=True, text=True, cwd=REPO)


def cli_config(tmp_path, base, **model) -> str:
    rows = [{"instruction": "Say hi.", "output": "hi"}] * 2
    d = {"model": {"name": str(base), **model}, "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", rows)),
                                                      "cache": False},
         "training": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    return str(tmp_path / "cfg.yaml")


def test_cli_refuses_t5_and_gemma2_sdpa_in_one_line_with_exit_2(tmp_path, tiny_family):
    from transformers import T5Config

    t5 = config_only(tmp_path / "t5", T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64))
    r = cli("train", cli_config(tmp_path, t5), "--no-progress")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model.name: {t5} is a t5 model: an encoder-decoder; peft-pipeline fine-tunes "
                      "decoder-only models (llama, qwen2, gemma, phi3, ...)"], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()

    r = cli("validate", cli_config(tmp_path, tiny_family("gemma2"), attn_implementation="sdpa"), "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "  - model.attn_implementation: sdpa cannot run gemma2: Gemma 2 soft-caps its attention logits" in r.stderr


def test_sdpa_varlen_keeps_the_sliding_window_inside_a_packed_document(tmp_path, tokenizer, one_thread):
    """A packed row of two documents longer than a Mistral window of 8 gives the logits of each document alone."""
    from transformers import AutoModelForCausalLM

    from peft_pipeline.model.attention import register_sdpa_varlen

    path = make_tiny_family(tmp_path / "mistral", tokenizer, "mistral", sliding_window=8)
    register_sdpa_varlen()
    varlen = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa_varlen").eval()
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    assert json.loads((path / "config.json").read_text())["sliding_window"] == 8
    docs = [torch.randint(0, 1000, (1, 20)), torch.randint(0, 1000, (1, 13))]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(20), torch.arange(13)])[None]
    with torch.no_grad():
        got = varlen(input_ids=packed, position_ids=positions).logits
        want = torch.cat([eager(input_ids=d).logits for d in docs], dim=1)
        whole = eager(input_ids=docs[0]).logits
        unwindowed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                          sliding_window=None).eval()(input_ids=docs[0]).logits
    assert (got - want).abs().max() < 1e-5
    assert (whole - unwindowed).abs().max() > 1e-3  # the window matters at this length: the test can tell


def test_an_untested_decoder_is_tried_with_a_line_and_a_non_lm_is_refused(tmp_path, capsys):
    from transformers import CLIPVisionConfig, Starcoder2Config

    coder = config_only(tmp_path / "coder", Starcoder2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                             num_key_value_heads=1, intermediate_size=64))
    assert check_family(run_cfg(coder), coder).refused is None
    assert "model: starcoder2 family is not among the tested ones (README: Model families); trying it" in \
        capsys.readouterr().out
    clip = config_only(tmp_path / "clip", CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UserError, match="is a clip_vision_model model: transformers has no causal-LM class for it"):
        check_family(run_cfg(clip), clip)
