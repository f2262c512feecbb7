"""console.py: our own lines, and bitsandbytes' CPU install hint kept off every command (issue: a fresh
machine with AVX512-BF16 printed it first thing, breaking one-line errors and cluttering LoRA runs).

The hint appears only on processors with AVX512-BF16, so the tests make bitsandbytes believe it runs on
one (a meta-path hook that patches bitsandbytes.functional.has_avx512bf16 as it loads): they then
fail or pass the same on every machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl

HINT = "gemm_4bit_forward"
HOOK = '''
import importlib.abc, importlib.machinery, sys

class _AVX512BF16(importlib.abc.MetaPathFinder):
    """As bitsandbytes.functional loads, make has_avx512bf16() say True (the processors that print the hint)."""
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _AVX512BF16())
'''


@pytest.fixture
def avx512bf16_env(tmp_path):
    """Environment for a subprocess in which bitsandbytes behaves as on an AVX512-BF16 processor."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PEFT_PIPELINE_NO_PROGRESS="1")
    return env


def test_the_hook_reproduces_the_hint(avx512bf16_env):
    # Without this, the tests below could pass because nothing printed the hint in the first place.
    r = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, env=avx512bf16_env)
    assert HINT in r.stderr


def test_a_one_line_error_stays_one_line_after_importing_peft(avx512bf16_env):
    code = ("import peft_pipeline, peft, sys; from peft_pipeline.errors import UserError; "
            "print('error: x', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=avx512bf16_env)
    assert r.stderr.strip().splitlines() == ["error: x"]


@pytest.mark.slow
def test_lora_train_prints_nothing_of_bitsandbytes(tmp_path, tiny_base, avx512bf16_env):
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ["one", "two", "three", "four"]]
    cfg = {"model": {"name": str(tiny_base)}, "lora": {"r": 2},
           "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "cache": False, "retention": None},
           "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "report_to": "none"},
           "output_dir": str(tmp_path / "run")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "peft_pipeline", "train", str(path)], capture_output=True, text=True,
                       env=avx512bf16_env, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert HINT not in out and "pip install kernels" not in out
    assert "4-bit on the CPU" not in out  # nothing is quantized: nothing to say about it


def test_4bit_on_cpu_is_said_once_in_our_words(tiny_base, capsys, monkeypatch):
    import torch

    from peft_pipeline import console
    from peft_pipeline.config import ModelSection, QuantizationSection
    from peft_pipeline.model.load import load_base

    if torch.cuda.is_available():
        pytest.skip("the line is for CPU runs")
    monkeypatch.setattr(console, "_said_cpu_4bit", False)
    for _ in range(2):
        load_base(ModelSection(name=str(tiny_base)), QuantizationSection(mode="4bit"))
    out = capsys.readouterr()
    assert (out.out + out.err).count("4-bit on the CPU runs bitsandbytes' portable CPU kernels") == 1
    assert HINT not in out.out + out.err
