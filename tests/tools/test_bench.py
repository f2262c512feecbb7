"""Bench smoke test: every variant on a tiny model for one or two steps (no warm-up).

The real numbers come from `make bench` (docs/benchmarks.md); this checks that each variant runs,
reports every field, and that the Markdown table and JSON are written and regenerated in place.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from peft_pipeline.tools.bench import BEGIN, BenchSettings, END, MODEL_CONFIGS, VARIANTS, bench, model_config

from conftest import write_jsonl

FIELDS = ("tokens_per_s", "step_time_s", "pad_share", "peak_memory_bytes", "mfu", "final_loss", "model_flops_per_s")


@pytest.fixture
def bench_data(tmp_path):
    # Long-tailed and even lengths, a few rows each: two steps of two rows per variant.
    longtail = [{"instruction": "Echo " + "x " * n, "output": "y " * (1 + n % 3)} for n in (2, 30, 4, 9)]
    orders = [{"instruction": f"Order {i}", "input": "two apples", "output": '{"item": "apples"}'} for i in range(4)]
    return {"longtail": str(write_jsonl(tmp_path / "longtail.jsonl", longtail)),
            "orders": str(write_jsonl(tmp_path / "orders.jsonl", orders))}


@pytest.mark.slow
def test_bench_reports_every_field_for_every_variant(tmp_path, tiny_base, bench_data, monkeypatch):
    monkeypatch.setenv("PEFT_PIPELINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "docs" / "benchmarks.md"
    out.parent.mkdir()
    out.write_text(f"# Benchmarks\n\nAnalysis written by hand.\n\n{BEGIN}\nold table\n{END}\n\nMore prose.\n")
    s = BenchSettings(out=out, model=str(tiny_base), steps=2, warmup=0, short_steps=1, batch_size=2,
                      max_length=256, data=bench_data, progress=False, command="peft-pipeline bench (test)")
    results = bench(s)

    assert [r["variant"] for r in results] == list(VARIANTS)
    for r in results:
        for key in FIELDS:
            assert r[key] is not None and math.isfinite(r[key]), (r["variant"], key, r[key])
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and 0 <= r["pad_share"] < 1
        assert [st["warmup"] for st in r["steps"]] == [False] * r["measured_steps"]
        assert r["measured_steps"] == (1 if VARIANTS[r["variant"]].slow_on_cpu else 2)  # the CPU runs these short
    by = {r["variant"]: r for r in results}
    # Same rows in the same order for every variant: the measured batch holds the same real tokens.
    tokens = {name: [st["real_tokens"] for st in r["steps"]] for name, r in by.items()}
    assert tokens["defaults"] == tokens["padded"] and tokens["qlora"] == tokens["defaults"][:1]
    # TRL tokenizes the same rows itself and gets the same tokens (chat template, EOS, no truncation).
    assert tokens["trl-dtype"] == tokens["trl-dtype-nogc-pf"] == tokens["defaults"]
    assert tokens["defaults-orders"] == tokens["padded-orders"]
    assert by["defaults"]["pad_share"] == 0 < by["padded"]["pad_share"]
    assert by["trl-dtype-nogc-pf"]["pad_share"] == 0 < by["trl-baseline"]["pad_share"]

    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nAnalysis written by hand.") and text.rstrip().endswith("More prose.")
    assert "old table" not in text and text.count(BEGIN) == 1
    table = [line for line in text.splitlines() if " | longtail | " in line or " | orders | " in line]
    for name in VARIANTS:
        assert any(line.startswith(f"| {name} |") for line in table), name
    assert "real tok/s" in text and "MFU" in text and "peft-pipeline bench (test)" in text

    saved = json.loads(out.with_suffix(".json").read_text())
    assert {r["variant"] for r in saved["results"]} == set(VARIANTS)
    assert {c["comparison"] for c in saved["comparisons"]} >= {"padding-free vs padded, longtail",
                                                                "defaults vs plain TRL baseline"}
    assert saved["environment"]["versions"]["trl"]


def test_cli_rejects_an_unknown_variant_with_one_line():
    r = subprocess.run([sys.executable, "-m", "peft_pipeline", "bench", "--variants", "defaults,fastest"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --variants: unknown fastest (known: {', '.join(VARIANTS)})"]


# Parameter counts of the public checkpoints (embeddings, biases and norms included).
PUBLIC_PARAMS = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "qwen2.5-1.5b": 1_543_714_304,
                 "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_configs_match_the_public_architectures(name):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(model_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLIC_PARAMS[name]
