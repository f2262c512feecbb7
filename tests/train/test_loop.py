"""Train stage on a tiny model: the run dir contract, weights that move (and don't), refusals."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peft_pipeline.config import config_from_dict
from peft_pipeline.errors import UserError
from peft_pipeline.tasks import train

from conftest import write_jsonl

ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in
        ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano"]]


def tiny_cfg(tmp_path, tiny_base, **training):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    evals = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    return {
        "model": {"name": str(tiny_base)},
        "lora": {"r": 4, "target_modules": "all-linear"},
        "data": {"train": str(data), "eval": str(evals), "cache": False},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_steps": 2, "max_length": 128, **training},
        "output_dir": str(tmp_path / "run"),
    }


def test_train_writes_the_run_dir_and_only_lora_weights_move(tmp_path, tiny_base):
    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_base))
    run = train(cfg, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "config.yaml", "log.jsonl", "metrics.json",
                                                      "plots", "report.md", "retention-reference.jsonl"]
    adapter = run / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "generation_config.json").read_text())["eos_token_id"] == [2]  # <|im_end|>

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics["global_steps"] == 4 and metrics["trainable_params"] > 0
    assert metrics["eval_loss"] is not None and metrics["trained_tokens"] > 0
    assert metrics["versions"]["torch"] and metrics["data"]["examples"] == {"train": 8, "eval": 2}

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # the resolved config re-loads and is enough to re-run
    again = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert again.sft_args == cfg.sft_args

    # LoRA B started at zero and moved; the base weights on disk are what we started from
    lora = load_file(adapter / "adapter_model.safetensors")
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)
    base = load_file(tiny_base / "model.safetensors")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter)
    for name, p in reloaded.base_model.model.named_parameters():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base:
            assert torch.equal(p, base[key]), name


def test_finished_run_is_not_overwritten_without_flag(tmp_path, tiny_base):
    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_base, max_steps=1, save_steps=10))
    train(cfg, progress=False)
    with pytest.raises(UserError, match="a finished run is already there; pass --overwrite") as e:
        train(cfg, progress=False)
    assert e.value.exit_code == 2
    run = train(cfg, overwrite=True, progress=False)
    assert json.loads((run / "metrics.json").read_text())["status"] == "complete"


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_base):
    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_base, max_steps=2, save_steps=2))
    train(cfg, progress=False)
    longer = config_from_dict({**tiny_cfg(tmp_path, tiny_base, max_steps=4, save_steps=2)})
    run = train(longer, resume=True, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # steps 1-2 from the first run, 3-4 after resuming; no step trained twice
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "peft_pipeline", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_data_exits_nonzero_with_one_line_and_no_finished_run(tmp_path, tiny_base):
    d = tiny_cfg(tmp_path, tiny_base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    d["data"]["train"] = str(bad)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    r = run_cli("train", str(cfg_path))
    assert r.returncode == 1
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert re.fullmatch(rf"error: {re.escape(str(bad))}:2: malformed JSON \(Expecting value at column \d+\); fix or remove this line", lines[0])
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_config_error_exits_2_before_loading_anything(tmp_path, tiny_base):
    d = tiny_cfg(tmp_path, tiny_base)
    d["lora"]["target_modules"] = ["q_projj"]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    r = run_cli("train", str(cfg_path), "training.max_stepz=3")
    assert r.returncode == 2
    assert "training.max_stepz: not a trl.SFTConfig field (did you mean max_steps?)" in r.stderr
    r = run_cli("train", str(cfg_path))
    assert r.returncode == 2 and "'q_projj' matches no module of LlamaForCausalLM (did you mean q_proj?)" in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_help_does_not_import_torch():
    code = "import sys; from peft_pipeline import cli; cli._parser().format_help(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False"
    assert run_cli("--help").returncode == 0


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_base):
    # lr 1e30 blows the LoRA weights past fp32 range within a few steps: the loss becomes inf/nan
    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_base, max_steps=30, learning_rate=1e30, save_steps=1,
                                    max_grad_norm=0.0, save_total_limit=None))
    with pytest.raises(UserError, match=r"training stopped: (loss|grad_norm) became (nan|inf) at step (\d+); last good checkpoint") as e:
        train(cfg, progress=False)
    bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert saved and max(saved) < bad_step  # nothing saved from the step that went bad
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] != "complete"
    assert not (tmp_path / "run" / "adapter").exists()


def test_final_scale_saves_the_scaled_update_and_checkpoints_keep_the_trained_one(tmp_path, tiny_base, capsys):
    """lora.final_scale 0.5: same training, the saved alpha halved; the saved adapter reloads to the model the
    run held in memory (its final eval loss), and equals the trained adapter with every lora_B halved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = config_from_dict({**tiny_cfg(tmp_path, tiny_base), "lora": {"r": 4, "alpha": 8, "final_scale": 0.5}})
    run = train(cfg, progress=False)
    assert "lora.final_scale 0.5: the adapter's update scaled to 50%" in capsys.readouterr().out
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    trained = json.loads((run / "checkpoints" / "checkpoint-4" / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == 4 and trained["lora_alpha"] == 8
    assert json.loads((run / "metrics.json").read_text())["final_scale"] == {
        "scale": 0.5, "lora_alpha_trained": 8, "lora_alpha_saved": 4}
    assert "| adapter saved at (lora.final_scale) | 0.5 x the trained update |" in (run / "report.md").read_text()
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert torch.equal(weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                       load_file(run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")[
                           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])  # weights as trained

    ids = torch.tensor([[1, 400, 500, 600, 700]])
    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        scaled = PeftModel.from_pretrained(base(), run / "adapter").eval()(ids).logits
        halved = PeftModel.from_pretrained(base(), run / "checkpoints" / "checkpoint-4").eval()
        full = halved(ids).logits
        for name, p in halved.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
        by_weights = halved(ids).logits
    assert torch.allclose(scaled, by_weights, atol=1e-5)
    assert not torch.allclose(scaled, full, atol=1e-3)  # the scale changed the model


def test_final_scale_refusals_name_the_key(tmp_path, tiny_base):
    from peft_pipeline.config import ConfigError

    base = tiny_cfg(tmp_path, tiny_base)
    cases = [({"freeze": {"method": "top_layers", "top_layers": 1}}, "freeze.method: top_layers"),
             ({"lora": {"final_scale": 0.5, "init": "pissa"}}, "lora.init: pissa changes the base weights"),
             ({"lora": {"final_scale": 0.5, "modules_to_save": ["lm_head"]}}, "have no adapter to scale")]
    for extra, message in cases:
        data = {**base, **extra}
        data["lora"] = {**base["lora"], "final_scale": 0.5, **extra.get("lora", {})}
        with pytest.raises(ConfigError, match=r"lora\.final_scale: .*" + re.escape(message)):
            config_from_dict(data)
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match=r"lora\.final_scale"):
            config_from_dict({**base, "lora": {"final_scale": bad}})
