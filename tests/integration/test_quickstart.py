"""End to end through the CLI on the embedded base: the README's first command, shortened."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_quickstart_trains_through_the_cli_and_loss_falls(tmp_path):
    run = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "peft_pipeline", "train", "configs/quickstart.yaml",
           "training.max_steps=12", "training.logging_steps=2", "training.eval_steps=12",
           "training.save_steps=12", f"output_dir={run}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[peft-pipeline] run complete" in r.stdout
    # counts reported, nothing silent: the task rows, the replay rows mixed in (data.replay: 0.3), the total
    assert "data/orders/train.jsonl (alpaca): 400 rows -> 400 used" in r.stdout
    assert "replay-general.jsonl (alpaca): 346 rows -> 171 used" in r.stdout
    assert "571 train / 40 eval examples" in r.stdout

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["global_steps"] == 12
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 6
    assert losses[-1] < 0.6 * losses[0], losses  # the answer format is learned within a few steps
    assert metrics["eval_loss"] < losses[0]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "checkpoint-12").is_dir()
