"""Every model family through the CLI on a tiny random model: train, generate, eval, merge (logit parity), export.

One training run per family, shared by the stages (built on first use); the CLI runs in this process
(cli.main), since starting Python and importing torch again for every stage of 14 families would take
longer than the stages themselves.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from conftest import FAMILIES, REPO, SPM_FAMILIES, write_jsonl
from peft_pipeline import cli

pytestmark = pytest.mark.slow
ORDERS = REPO / "data" / "orders"
_runs: dict[str, Path] = {}


def rows(name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (ORDERS / name).read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("family-data")
    return {"train": write_jsonl(d / "train.jsonl", rows("train.jsonl", 8)),
            "test": write_jsonl(d / "test.jsonl", rows("test.jsonl", 2))}


def trained(model_type: str, tiny_family, data, tmp_path_factory, capsys) -> Path:
    """The family's run dir after `train` (3 steps at a rate that moves LoRA B off zero), built once."""
    if model_type not in _runs:
        run = tmp_path_factory.mktemp(f"run-{model_type}") / "run"
        cfg = {"model": {"name": str(tiny_family(model_type))}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "data": {"train": str(data["train"]), "test": str(data["test"]), "retention": None, "cache": False},
               "training": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                            "save_strategy": "no", "max_length": 256, "logging_steps": 1},
               "output_dir": str(run)}
        path = run.parent / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert cli.main(["train", str(path), "--no-progress"]) == 0
        _runs[model_type] = run
        out = capsys.readouterr().out
        assert ("uses eager attention" in out) == (model_type == "gemma2")
    return _runs[model_type]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_trains_generates_evaluates_and_merges_exactly(model_type, tiny_family, data, tmp_path_factory, capsys,
                                                              one_thread):
    run = trained(model_type, tiny_family, data, tmp_path_factory, capsys)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["global_steps"] == 3
    lora = adapter_weights(run)
    assert lora and any(t.abs().max() > 0 for k, t in lora.items() if "lora_B" in k)  # trained: merging is not a no-op
    assert not [k for k in lora if "vision_tower" in k or "multi_modal_projector" in k]

    out = run.parent / "answers.jsonl"
    assert cli.main(["generate", str(run), "--prompts", str(data["test"]), "--max-new-tokens", "4",
                     "--out", str(out), "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert cli.main(["eval", str(run), "--max-new-tokens", "4", "--limit", "2", "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())["generation"]["metrics"]["adapter"]["n"] == 2

    assert cli.main(["merge", str(run)]) == 0
    report = json.loads((run / "merge_report.json").read_text())
    assert report["status"] == "passed"
    assert report["parity"]["max_abs_diff"] < 1e-5, report["parity"]
    assert cli.main(["export", str(run), "--format", "adapter"]) == 0
    vllm = json.loads((run / "export" / "adapter" / "vllm_check.json").read_text())
    assert vllm["servable"] == (model_type not in ("gpt2", "gpt_neox")), vllm  # no LoRA in vLLM's own gpt2/gpt_neox
    capsys.readouterr()
    print(f"{model_type}: merge max |logit diff| {report['parity']['max_abs_diff']:.2e}")  # -s shows the matrix


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


LLAMACPP = importlib.util.find_spec("peft_pipeline.export.llamacpp") is not None


# Measured with the llama.cpp exporter of wt15e (node-llama-cpp 3.22.1's llama.cpp). Gemma and Phi-3 pass on
# the SentencePiece tokenizer their tiny models get (conftest.SPM_FAMILIES), as real checkpoints ship one.
# qwen2 fails for a reason of the tiny model's borrowed tokenizer, with no honest way round it: transformers 5
# lists qwen2 in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, so a qwen2 config loads Qwen2Tokenizer whatever
# tokenizer_config.json names, and that rebuilds Qwen2's pre-tokenizer over SmolLM2's vocabulary: a token
# hash llama.cpp's converter cannot know (it knows real Qwen2 tokenizers, which the tests do not have offline).
EXPORT_XFAIL = {
    "qwen2": "transformers 5 loads the tiny qwen2 dir's tokenizer as Qwen2Tokenizer, whose pre-tokenizer hash on "
             "SmolLM2's vocabulary llama.cpp does not know",
}


@pytest.mark.skipif(not LLAMACPP, reason="llama.cpp export lands with wt15e")
@pytest.mark.parametrize("model_type", [pytest.param(f, marks=pytest.mark.xfail(reason=EXPORT_XFAIL[f], strict=False))
                                        if f in EXPORT_XFAIL else f for f in FAMILIES])
def test_family_exports_a_gguf_verified_in_llamacpp(model_type, tiny_family, data, tmp_path_factory, capsys,
                                                     one_thread):
    from peft_pipeline.errors import UserError
    from peft_pipeline.export import llamacpp

    try:
        llamacpp.locate()
    except UserError as e:
        pytest.skip(f"llama.cpp not installed: {e}")
    run = trained(model_type, tiny_family, data, tmp_path_factory, capsys)
    if not (run / "merged" / "config.json").is_file():
        assert cli.main(["merge", str(run)]) == 0
    assert cli.main(["export", str(run), "--format", "gguf", "--quant", "q8_0"]) == 0
    report = json.loads((run / "export_report.json").read_text())
    assert report["status"] == "ok" and "llama_cpp" in report, report
    assert [(q["quant"], q["status"]) for q in report["quants"]] == [("q8_0", "ok")], report["quants"]
    if model_type in SPM_FAMILIES:  # its own tokenizer: llama.cpp reads the chat prompts as transformers does
        assert all(q["prompt_tokens_identical"] == q["probes"] for q in report["quants"]), report["quants"]
