"""eval --harness: lm-evaluation-harness on base and adapter, offline, with a tiny local task on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_run

HERE = Path(__file__).resolve().parent / "harness"
ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in ["apple", "river", "stone", "cloud"]]

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'peft-pipeline[harness]')")


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """The tiny task YAML, pointed at the absolute path of its JSONL (the harness reads data_files from the cwd)."""
    out = tmp_path / "tasks"
    out.mkdir()
    text = (HERE / "tiny_facts.yaml").read_text().replace("test: tiny_facts.jsonl", f"test: {HERE / 'tiny_facts.jsonl'}")
    (out / "tiny_facts.yaml").write_text(text)
    return out


def test_harness_scores_base_and_adapter_side_by_side(tmp_path, tiny_base, tokenizer, task_dir, capsys):
    from peft_pipeline.cli import main

    run = make_run(tmp_path, tiny_base, tokenizer, ROWS)  # random LoRA B: the adapter's log-likelihoods differ
    assert main(["eval", str(run), "--harness", "tiny_facts", "--harness-include", str(task_dir), "--no-progress"]) == 0
    saved = json.loads((run / "harness.json").read_text())
    assert saved["tasks"] == ["tiny_facts"] and set(saved["results"]) == {"base", "adapter"}
    for name in ("base", "adapter"):
        acc = saved["results"][name]["tiny_facts"]["acc"]
        assert acc in {i / 6 for i in range(7)}  # 6 questions
    assert json.loads((run / "eval.json").read_text())["harness"] == saved
    out = capsys.readouterr().out
    assert "lm-evaluation-harness:" in out and "tiny_facts" in out and "change" in out


def test_harness_errors_are_one_line_before_the_model_loads(tmp_path, tiny_base, tokenizer, task_dir, capsys):
    from peft_pipeline.cli import main

    run = make_run(tmp_path, tiny_base, tokenizer, ROWS)
    assert main(["eval", str(run), "--harness", "tiny_factz", "--harness-include", str(task_dir), "--no-progress"]) == 2
    assert "unknown task(s) tiny_factz" in capsys.readouterr().err
    assert main(["eval", str(run), "--harness", "tiny_facts", "--harness-include", str(tmp_path / "nope")]) == 2
    assert "--harness-include:" in capsys.readouterr().err
