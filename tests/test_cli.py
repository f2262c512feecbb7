"""cli.py: verbs as a table; `validate` makes every check `train` makes before any weight loads."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from peft_pipeline import cli

from conftest import write_jsonl

ROWS = [{"instruction": f"Repeat {w}.", "output": w} for w in ["apple", "river", "stone", "cloud"]]


def run_cli(*argv: str):
    return subprocess.run([sys.executable, "-m", "peft_pipeline", *argv], capture_output=True, text=True)


def config(tmp_path, tiny_base, rows=ROWS, **lora) -> str:
    d = {"model": {"name": str(tiny_base)}, "lora": {"r": 4, **lora},
         "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "cache": False},
         "training": {"max_steps": 1, "max_length": 64}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_every_verb_has_a_handler_and_help():
    help_text = cli._parser().format_help()
    for name, verb in cli.VERBS.items():
        assert verb.help and callable(verb.run) and callable(verb.arguments)
        assert re.search(rf"^    {re.escape(name)}\s", help_text, re.M)


def test_validate_prints_the_resolved_config_and_writes_nothing(tmp_path, tiny_base):
    r = run_cli("validate", config(tmp_path, tiny_base), "training.max_steps=7", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["training"]["max_steps"] == 7
    assert not (tmp_path / "run").exists()


def test_validate_checks_names_against_the_model(tmp_path, tiny_base):
    # Before the re-layout `validate` passed this config and `train` refused it.
    r = run_cli("validate", config(tmp_path, tiny_base, target_modules=["q_projj"]), "--no-progress")
    assert r.returncode == 2
    assert "lora.target_modules: 'q_projj' matches no module of LlamaForCausalLM (did you mean q_proj?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_reads_the_data(tmp_path, tiny_base):
    path = config(tmp_path, tiny_base)
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    r = run_cli("validate", path, "--no-progress")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}:2:"), r.stderr
