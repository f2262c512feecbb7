"""Adapter scale scan (evaluate/scales.py, eval --adapter-scale): per scale, test score and retention; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from peft_pipeline.errors import UserError
from peft_pipeline.evaluate.scales import parse_scales, scaled

from conftest import make_run, write_jsonl

ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in ["apple", "river", "stone", "cloud"]]


def test_parse_scales_names_the_bad_entry():
    assert parse_scales("1,0.9, 0.5") == [1.0, 0.9, 0.5]
    with pytest.raises(UserError, match=r"--adapter-scale: 'x' is not a number"):
        parse_scales("1,x")
    with pytest.raises(UserError, match=r"--adapter-scale: 1.2 is outside \(0, 1\]"):
        parse_scales("1.2")


def test_scaled_changes_the_output_and_restores_it_exactly(tmp_path, tiny_base, tokenizer):
    from peft_pipeline.model.load import load_model
    from peft_pipeline.rundir import resolve

    model = load_model(resolve(make_run(tmp_path, tiny_base, tokenizer, ROWS)))
    ids = torch.tensor([[1, 300, 301]])
    with torch.no_grad():
        full = model(ids).logits
        with scaled(model, 0.0001):
            near_base = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        again = model(ids).logits
    assert torch.equal(full, again)
    assert torch.allclose(near_base, base, atol=1e-3) and not torch.allclose(full, base, atol=1e-3)


def test_eval_adapter_scale_scans_test_and_retention(tmp_path, tiny_base, tokenizer, capsys):
    from peft_pipeline.cli import main

    tests = [{"instruction": r["instruction"], "output": r["output"]} for r in ROWS]
    run = make_run(tmp_path, tiny_base, tokenizer, ROWS, test_rows=tests)
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": p} for p in ["Say hello.", "Name a colour.", "Count to 3."]])
    assert main(["eval", str(run), "--adapter-scale", "1,0.0001", "--retention", str(mine), "--max-new-tokens", "8",
                 "--no-progress"]) == 0
    report = json.loads((run / "adapter-scales.json").read_text())
    assert [r["scale"] for r in report["scales"]] == [1.0, 0.0001]
    full, tiny = report["scales"]
    # no expected answers: the base's answer is the key, so a near-zero update keeps all three, the random one fewer
    assert tiny["retention"]["kept"] == 3 and tiny["retention"]["same"] == 3
    assert full["retention"]["kept"] < 3
    # every answer is kept: the base's once, each scale's per prompt (the near-zero update says what the base said)
    assert tiny["retention"]["answers"] == report["retention_base_answers"] and len(full["retention"]["answers"]) == 3
    assert full["test"]["n"] == 4
    out = capsys.readouterr().out
    assert "exact_match" in out and "adapter-scales.json" in out

    # at scale 1 the answers are plain eval's
    assert main(["eval", str(run), "--max-new-tokens", "8", "--no-progress"]) == 0
    plain = json.loads((run / "eval.json").read_text())["predictions"]
    assert [p["adapter"] for p in plain] == full["answers"]


def test_eval_adapter_scale_refuses_other_modes_and_bad_scales(tmp_path, tiny_base, tokenizer, capsys):
    from peft_pipeline.cli import main

    run = make_run(tmp_path, tiny_base, tokenizer, ROWS, test_rows=ROWS)
    assert main(["eval", str(run), "--adapter-scale", "0.8", "--compare-base", "--no-progress"]) == 2
    assert "--adapter-scale runs its own scan" in capsys.readouterr().err
    assert main(["eval", str(run), "--adapter-scale", "2", "--no-progress"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert not (run / "adapter-scales.json").exists()
