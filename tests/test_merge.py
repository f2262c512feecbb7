"""Merge stage: parity with base + adapter, failures caught before anything is written, QLoRA, dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_pipeline.cli import main
import conftest
from conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


ROWS = [
    {"instruction": "Extract the city as JSON.", "input": f"Ship {n} mugs to {city}.", "output": json.dumps({"city": city})}
    for n, city in [(2, "Oslo"), (5, "Lima"), (7, "Accra"), (3, "Perth"), (9, "Quito")]
]


def make_run(tmp_path: Path, base: Path, tokenizer, quantization: str = "none", seed: int = 1) -> Path:
    """A run dir with a random (non-no-op) adapter over the merge test rows."""
    return conftest.make_run(tmp_path, base, tokenizer, ROWS, quantization=quantization, seed=seed)


def reference_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """Base + adapter, unmerged, in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_matches_base_plus_adapter_and_loads_without_peft(tmp_path, tiny_base, tokenizer, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from peft_pipeline.rundir import resolve

    run = make_run(tmp_path, tiny_base, tokenizer)
    assert main(["merge", str(run)]) == 0
    merged = run / "merged"
    report = json.loads((run / "merge_report.json").read_text())
    assert report["status"] == "passed"
    assert report["parity"]["max_abs_diff"] < 1e-3
    assert report["parity"]["greedy_identical"] == report["parity"]["prompts"] == 4
    assert report["samples"]["source"].startswith("eval data")
    assert report["saved_dtype"] == "float32"  # auto: the tiny base is float32
    assert report["reload"]["passed"]
    assert json.loads((merged / "merge_report.json").read_text()) == report

    # A plain model dir: no adapter files, no quantization, stop tokens and chat template kept.
    assert not (merged / "adapter_config.json").exists()
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in GenerationConfig.from_pretrained(merged).eos_token_id
    assert AutoTokenizer.from_pretrained(merged).chat_template == tokenizer.chat_template
    assert resolve(merged).kind == "merged"

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids = torch.tensor([tokenizer("Ship 4 mugs to Rome.")["input_ids"]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    ref = reference_logits(tiny_base, run / "adapter", ids)
    assert (got - ref).abs().max() < 1e-4
    # ...and the adapter did change the model, so the equality above means something.
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - ref).abs().max() > 1e-2
    assert "parity (float32)" in capsys.readouterr().out


def error_line(capsys) -> str:
    """The CLI's error: exactly one line (progress bars from loading may precede it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err
    return errors[0]


def _assert_failed_cleanly(run: Path, capsys, code: int) -> str:
    assert code == 1
    err = error_line(capsys)
    assert err.startswith("error: merge check failed")
    assert not (run / "merged").exists()
    assert not list(run.glob(".merged.tmp-*"))  # no half-written dir either
    assert json.loads((run / "merge_report.json").read_text())["status"] == "failed"
    return err


def test_wrong_merge_is_an_error_and_leaves_no_merged_dir(tmp_path, tiny_base, tokenizer, monkeypatch, capsys):
    from peft.tuners.lora.layer import Linear

    run = make_run(tmp_path, tiny_base, tokenizer)
    # A merge that folds in the wrong update (as a lossy 4-bit round trip would): the unmerged
    # reference is computed with the true adapter, the merged weights with 1.05x its delta.
    delta = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, name: 1.05 * delta(self, name))
    err = _assert_failed_cleanly(run, capsys, main(["merge", str(run)]))
    assert "differs from base + adapter" in err and "max |logit diff|" in err


def test_corrupted_saved_weights_are_caught(tmp_path, tiny_base, tokenizer, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from peft_pipeline import merge as merge_stage

    run = make_run(tmp_path, tiny_base, tokenizer)
    save = merge_stage.save_merged

    def save_then_corrupt(merged, target, tok, stop, out, save_dtype):
        save(merged, target, tok, stop, out, save_dtype)
        path = out / "model.safetensors"
        tensors = load_file(path)
        key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))
        tensors[key] = tensors[key] + 0.05
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(merge_stage, "save_merged", save_then_corrupt)
    err = _assert_failed_cleanly(run, capsys, main(["merge", str(run)]))
    assert "saved model" in err


def test_qlora_run_merges_into_the_full_precision_base(tmp_path, tiny_base, tokenizer):
    from bitsandbytes.nn import Params4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path, tiny_base, tokenizer, quantization="4bit")
    assert main(["merge", str(run)]) == 0
    report = json.loads((run / "merge_report.json").read_text())
    assert report["quantization_mode"] == "4bit"
    assert report["parity"]["max_abs_diff"] < 1e-3
    gap = report["qlora_gap"]
    for key in ("loss_quantized_adapter", "loss_merged", "max_abs_diff", "mean_abs_diff", "greedy_agree"):
        assert key in gap
    assert gap["max_abs_diff"] > 0  # the 4-bit base does compute something else

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype="auto")
    assert "quantization_config" not in json.loads((run / "merged" / "config.json").read_text())
    assert all(p.dtype == torch.float32 and not isinstance(p, Params4bit) for p in merged.parameters())
    # Merged into the float32 weights, not dequantized 4-bit ones: W + scale * B @ A exactly.
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), str(run / "adapter"))
    layer = peft.base_model.model.model.layers[1].mlp.down_proj
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, expected, atol=1e-6)


def test_bf16_saves_bf16_weights(tmp_path, tiny_base, tokenizer):
    from safetensors import safe_open

    run = make_run(tmp_path, tiny_base, tokenizer)
    assert main(["merge", str(run), "--dtype", "bf16", "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    report = json.loads((run / "merge_report.json").read_text())
    assert report["saved_dtype"] == "bfloat16" and report["compare_dtype"] == "float32"
    assert report["parity"]["max_abs_diff"] < 1e-3  # checked in float32 before rounding
    assert report["cast"]["max_abs_diff"] > report["parity"]["max_abs_diff"]  # rounding is reported
    assert "bfloat16" in report["cast"]["note"]
    assert report["reload"]["max_abs_diff"] < 1e-3


def test_run_dir_without_adapter_is_a_one_line_error(tmp_path, tiny_base, tokenizer, capsys):
    run = make_run(tmp_path, tiny_base, tokenizer)
    import shutil

    shutil.rmtree(run / "adapter")
    assert main(["merge", str(run)]) == 1
    assert "no adapter" in error_line(capsys)
    assert not (run / "merged").exists()


def test_out_dir_that_would_replace_the_run_is_refused(tmp_path, tiny_base, tokenizer, capsys):
    run = make_run(tmp_path, tiny_base, tokenizer)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(run)]) == 1
    assert "would replace" in error_line(capsys)
    assert main(["merge", str(run), "--out", str(tmp_path / "notes")]) == 1
    assert "not a merged model" in error_line(capsys)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_data_not_readable_from_here_falls_back_to_builtin_prompts(tmp_path, tiny_base, tokenizer):
    run = make_run(tmp_path, tiny_base, tokenizer)
    # config.yaml paths are relative to where training ran; elsewhere they may not resolve.
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / "data" / name).unlink()
    assert main(["merge", str(run)]) == 0
    report = json.loads((run / "merge_report.json").read_text())
    assert report["samples"]["source"].startswith("built-in prompts")
    assert report["parity"]["max_abs_diff"] < 1e-3 and report["parity"]["loss"] is not None


def test_merge_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from peft_pipeline.cli import main\ntry: main(['merge', '--help'])\nexcept SystemExit: pass\nassert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.slow
def test_merge_of_a_short_real_run_passes_parity(tmp_path):
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = config_from_dict({
        "model": {"name": "smollm2-135m-instruct"},
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {"train": [str(data)], "cache": False},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 128,
                     "save_strategy": "no", "logging_steps": 1},
        "output_dir": str(tmp_path / "run"),
    })
    run = train(cfg, progress=False)
    assert main(["merge", str(run), "--dtype", "bf16"]) == 0
    report = json.loads((run / "merge_report.json").read_text())
    assert report["parity"]["max_abs_diff"] < 1e-3
    assert report["parity"]["greedy_identical"] + report["parity"]["greedy_ties"] == report["parity"]["prompts"]
    assert report["saved_dtype"] == "bfloat16"
