"""report.md and its plots from a run dir's files; `peft-pipeline report` and `env`; the report after training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from peft_pipeline.cli import main
from peft_pipeline.report import write_report

from conftest import write_jsonl

PNG = b"\x89PNG"


def synthetic_run(run):
    """A run dir written by hand: 10 logged steps, 2 evaluations, metrics and an eval with base vs adapter."""
    run.mkdir(parents=True)
    log = [{"step": s, "epoch": s / 10, "loss": round(2.0 - 0.1 * s, 4), "learning_rate": 1e-3 * (1 - s / 10),
            "grad_norm": 0.5} for s in range(1, 11)]
    log.insert(5, {"step": 5, "eval_loss": 1.7321})
    log.append({"step": 10, "eval_loss": 1.2345})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"step": 11, "lo')  # torn last line
    (run / "config.yaml").write_text("model:\n  name: tiny-test-base\nquantization:\n  mode: none\n")
    (run / "metrics.json").write_text(json.dumps({
        "status": "complete", "trainable_params": 8192, "total_params": 3227968, "global_steps": 10,
        "first_logged_loss": 1.9, "final_logged_loss": 1.0, "eval_loss": 1.2345, "trained_tokens": 5000,
        "runtime_s": 10.0, "peak_memory": {"bytes": 3 * 1024**3, "kind": "cuda max_memory_allocated"},
        "preflight": {"total": 2 * 1024**3, "device_bytes": 80 * 1024**3, "device": "GPU 0 (test)"},
    }))
    (run / "eval.json").write_text(json.dumps({
        "models": ["base", "adapter"],
        "loss": {"data": "val.jsonl", "base": {"loss": 2.5, "perplexity": 12.18, "tokens": 40, "examples": 4},
                 "adapter": {"loss": 1.25, "perplexity": 3.49, "tokens": 40, "examples": 4}},
        "generation": {"prompts": "test.jsonl", "metrics": {
            "base": {"n": 2, "kind": "text", "exact_match": 0.0, "rouge_l": 0.31},
            "adapter": {"n": 2, "kind": "text", "exact_match": 0.5, "rouge_l": 0.875}}},
        "predictions": [{"where": "test.jsonl:1", "prompt": [{"role": "user", "content": "Say | hi\nplease"}],
                         "expected": "hi", "base": "Hello there!", "adapter": "hi",
                         "stopped": {"base": True, "adapter": True}}],
    }))
    return run


def test_report_has_plots_numbers_eval_table_and_examples(tmp_path):
    run = synthetic_run(tmp_path / "run")
    out = write_report(run)
    md = out.read_text()
    assert out == run / "report.md"
    for png in ("loss.png", "lr.png"):
        assert (run / "plots" / png).read_bytes()[:4] == PNG
        assert f"](plots/{png})" in md  # relative links: renders on GitHub
    assert "| status | complete |" in md and "tiny-test-base" in md
    assert "| throughput | 500 tokens/s |" in md
    assert "3.00 GiB (cuda max_memory_allocated)" in md and "2.00 GiB of 80.00 GiB GPU 0 (test)" in md
    assert "1.9000 -> 1.0000" in md
    # the log table: train loss per step and validation loss where it was computed
    assert re.search(r"\| 5 \| 1\.5000 \| 1\.7321 \| 5\.00e-04 \| 0\.5000? \|", md)
    assert re.search(r"\| 10 \| 1\.0000 \| 1\.2345 \|", md)
    # eval table: base vs adapter columns
    assert "| metric | base | adapter |" in md
    assert "| val loss | 2.5000 | 1.2500 |" in md and "| rouge_l | 0.3100 | 0.8750 |" in md
    # an example generation, with the table-breaking characters escaped
    assert "| prompt | Say \\| hi<br>please |" in md and "| adapter | hi |" in md and "| base | Hello there! |" in md


def test_report_without_matplotlib_still_has_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    run = synthetic_run(tmp_path / "run")
    md = write_report(run).read_text()
    assert "plots/" not in md and not (run / "plots").exists()
    assert "| 10 | 1.0000 | 1.2345 |" in md


def test_report_verb_and_its_errors(tmp_path, capsys):
    run = synthetic_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    assert main(["report", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no log.jsonl, metrics.json or eval.json" in capsys.readouterr().err


def test_env_lists_the_stack_and_devices():
    r = subprocess.run([sys.executable, "-m", "peft_pipeline", "env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("python:", "torch:", "transformers:", "peft:", "trl:", "accelerate:", "bitsandbytes:",
                 "torch build:", "bitsandbytes backend:"):
        assert name in r.stdout, name
    assert re.search(r"^  torch: \d", r.stdout, flags=re.M)


def test_training_writes_preflight_peak_memory_and_the_report(tmp_path, tiny_base):
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    rows = [{"instruction": f"Repeat {w}.", "output": w} for w in ["apple", "river", "stone", "cloud"]]
    cfg = config_from_dict({
        "model": {"name": str(tiny_base)}, "lora": {"r": 4},
        "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "eval": str(write_jsonl(tmp_path / "e.jsonl", rows[:2])),
                 "cache": False},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 10,
                     "eval_strategy": "steps", "eval_steps": 2, "max_length": 64},
        "output_dir": str(tmp_path / "run"),
    })
    run = train(cfg, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["preflight"]["trainable_params"] == metrics["trainable_params"]
    assert metrics["preflight"]["total_steps"] == 2 and metrics["peak_memory"]["bytes"] > 0
    md = (run / "report.md").read_text()
    assert "](plots/loss.png)" in md and (run / "plots" / "loss.png").is_file()
    assert "| optimizer steps | 2 |" in md


def test_tensorboard_is_the_default_logger_only_when_installed(tmp_path, monkeypatch):
    import importlib.util

    import torch

    from peft_pipeline.train.sft import make_sft_config
    from peft_pipeline.config import config_from_dict

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    cfg = config_from_dict({"data": {"train": str(data)}, "output_dir": str(tmp_path / "run")})
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    real = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (installed or None) and real("json") if name == "tensorboard" else real(name, *a))
        args = make_sft_config(cfg, torch.float32)
        assert args.report_to == (["tensorboard"] if installed else [])
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "run" / "tensorboard")
    mine = config_from_dict({"data": {"train": str(data)}, "training": {"report_to": "none"}})
    assert make_sft_config(mine, torch.float32).report_to == []  # the user's choice stands


def test_refresh_after_eval_finds_the_run_dir_behind_an_adapter_dir(tmp_path, capsys):
    from peft_pipeline.report import refresh_report

    run = synthetic_run(tmp_path / "run")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny-test-base"}))
    assert refresh_report(run / "adapter") == run / "report.md"
    assert "| adapter | hi |" in (run / "report.md").read_text()
    assert refresh_report(tmp_path / "missing") is None  # never fails the stage
    assert "report not written" in capsys.readouterr().err
