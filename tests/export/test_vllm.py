"""export/vllm.py: what vLLM's LoRA loader would refuse or need a flag for, from the adapter dir alone."""

from __future__ import annotations

import json

import pytest

from conftest import make_run
from peft_pipeline.cli import main
from peft_pipeline.errors import UserError
from peft_pipeline.export.vllm import check_adapter, write_vllm_check

ROWS = [{"instruction": f"Repeat {w}.", "output": w} for w in ["apple", "river", "stone"]]


def adapter(tmp_path, **config):
    """An adapter dir: adapter_config.json (peft's keys) and a safetensors file with LoRA tensor names."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir(parents=True)
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False,
           "modules_to_save": None, "peft_type": "LORA", "base_model_name_or_path": None, **config}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    names = [f"base_model.model.model.layers.0.self_attn.{t}.lora_{ab}.weight" for t in ["q_proj", "v_proj"] for ab in "AB"]
    save_file({n: torch.zeros(2, 2) for n in names}, str(d / "adapter_model.safetensors"))
    return d


def levels(findings) -> dict[str, str]:
    return {f["key"]: f["level"] for f in findings}


def test_a_plain_adapter_loads_as_is(tmp_path):
    assert check_adapter(adapter(tmp_path)) == []


def test_modules_to_save_dora_and_bias_are_refused_with_a_fix(tmp_path):
    d = adapter(tmp_path, modules_to_save=["lm_head", "embed_tokens"], use_dora=True, bias="lora_only")
    findings = check_adapter(d)
    assert levels(findings) == {"modules_to_save": "refused", "use_dora": "refused", "bias": "refused"}
    saved = next(f for f in findings if f["key"] == "modules_to_save")["message"]
    assert "['lm_head', 'embed_tokens'] trained in full" in saved and "peft-pipeline merge RUN" in saved


@pytest.mark.parametrize("r, flag", [(16, None), (24, 32), (64, 64), (300, 320)])
def test_a_rank_above_16_names_the_max_lora_rank_to_pass(tmp_path, r, flag):
    findings = check_adapter(adapter(tmp_path, r=r))
    if flag is None:
        assert findings == []
    else:
        assert findings == [{"level": "flag", "key": "r", "message": f"rank {r} is above vLLM's default "
                             f"--max-lora-rank 16: start the server with --max-lora-rank {flag}"}]


def test_a_rank_vllm_cannot_take_and_a_rank_pattern_count(tmp_path):
    assert levels(check_adapter(adapter(tmp_path / "a", r=1024))) == {"r": "refused"}
    assert "--max-lora-rank 128" in check_adapter(adapter(tmp_path / "b", rank_pattern={"q_proj": 128}))[0]["message"]


def test_embedding_targets_warn_and_gpt2_bases_are_refused(tmp_path):
    d = adapter(tmp_path, target_modules=["q_proj", "lm_head"])
    assert levels(check_adapter(d)) == {"target_modules": "warning"}
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    assert levels(check_adapter(d))["base_model"] == "refused"  # found through base_model_name_or_path


def test_not_an_adapter_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json"):
        check_adapter(tmp_path)


def test_vllm_check_json_and_console_lines(tmp_path, capsys):
    d = adapter(tmp_path, r=32, modules_to_save=["lm_head"])
    record = write_vllm_check(d)
    assert record == json.loads((d / "vllm_check.json").read_text())
    assert record["servable"] is False and record["serve"] is None
    out = capsys.readouterr().out
    assert "[peft-pipeline] vllm: refused: modules_to_save: ['lm_head'] trained in full" in out
    assert "[peft-pipeline] vllm: flag: r: rank 32 is above vLLM's default --max-lora-rank 16" in out
    assert "this adapter will not load in vLLM" in out


def test_export_adapter_writes_the_vllm_check(tmp_path, tiny_base, tokenizer, capsys):
    run = make_run(tmp_path, tiny_base, tokenizer, ROWS)  # r=4, all-linear, nothing vLLM refuses
    assert main(["export", str(run), "--format", "adapter"]) == 0
    out = run / "export" / "adapter"
    record = json.loads((out / "vllm_check.json").read_text())
    assert record["servable"] and record["findings"] == []
    assert record["serve"] == f"vllm serve BASE --enable-lora --lora-modules adapter={out}"
    assert f"[peft-pipeline] vllm: loads with: vllm serve BASE --enable-lora --lora-modules adapter={out}" in \
        capsys.readouterr().out
