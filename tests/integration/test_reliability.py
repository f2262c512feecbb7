"""Reliability: crashes and resume, atomic outputs, guards, hostile input, safe defaults, reproducibility.

Crashes are real: the CLI's train in a subprocess, killed with SIGKILL from the outside, or killing
itself at a chosen point of a save (the patches in FAULT_WRAPPER, applied before the CLI runs).
Everything else goes through the CLI in-process (`cli.main`), so exit codes and the one-line
messages are what a user sees.

Measured on CPU (tiny llama, dropout 0, 8 steps, one thread):
- two separate runs of one config: adapters bitwise equal (max |diff| 0.0);
- killed after checkpoint-4 (or inside a checkpoint / the adapter save) and resumed: adapter, every
  logged loss and train_loss bitwise equal to the uninterrupted run (max |diff| 0.0).
Asserted within TOL = 1e-6 to leave room for other BLAS builds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from peft_pipeline.cli import main

from conftest import REPO, make_tiny_llama, write_jsonl

ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in
        ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano"]]
TOL = 1e-6  # measured 0.0 (bitwise) for both reproducibility and resume

# Applied inside the training subprocess before the CLI runs (RELIABILITY_FAULT picks one).
FAULT_WRAPPER = r'''
import os, runpy, signal, sys, time
from pathlib import Path

fault = os.environ.get("RELIABILITY_FAULT", "")
if fault == "slow_steps":  # give the test a wide window to kill the run between steps
    from transformers.trainer_callback import DefaultFlowCallback
    def on_step_begin(self, args, state, control, **kw):
        time.sleep(0.3)
    DefaultFlowCallback.on_step_begin = on_step_begin
elif fault == "kill_in_checkpoint":  # die after the checkpoint's weights, before its trainer_state.json
    from transformers import Trainer
    orig_rng = Trainer._save_rng_state
    def _save_rng_state(self, output_dir):
        if self.state.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_rng(self, output_dir)
    Trainer._save_rng_state = _save_rng_state
elif fault == "kill_in_adapter_save":  # die with the final adapter's weights half-saved (no tokenizer yet)
    import peft
    orig_save = peft.PeftModel.save_pretrained
    def save_pretrained(self, save_directory, *a, **k):
        out = orig_save(self, save_directory, *a, **k)
        if Path(save_directory).name.startswith(".adapter.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    peft.PeftModel.save_pretrained = save_pretrained
sys.argv = ["peft_pipeline", *sys.argv[1:]]
runpy.run_module("peft_pipeline", run_name="__main__", alter_sys=True)
'''


def run_config(tmp_path: Path, tiny_base: Path, name: str = "run", **training) -> dict:
    """Tiny deterministic run: dropout 0, 8 steps of 2 over 8 rows (2 epochs), a checkpoint every 2."""
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, ROWS)
    return {
        "model": {"name": str(tiny_base)},
        "lora": {"r": 4, "dropout": 0.0},
        "data": {"train": str(data), "cache": False},
        "training": {"max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_steps": 2, "max_length": 128, **training},
        "output_dir": str(tmp_path / name),
    }


def write_cfg(tmp_path: Path, d: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


def cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def sub_env(fault: str = "", **extra) -> dict:
    # One thread: on 2 shared cores two OpenMP threads made each step ~5x slower (and the same
    # thread count in every run keeps the float reductions in one order).
    return {**os.environ, "PEFT_PIPELINE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "RELIABILITY_FAULT": fault,
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def train_subprocess(tmp_path: Path, cfg: Path, *args, fault: str = "", **env) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "fault_wrapper.py"
    wrapper.write_text(FAULT_WRAPPER)
    return subprocess.run([sys.executable, str(wrapper), "train", str(cfg), *args], capture_output=True, text=True,
                          env=sub_env(fault, **env), cwd=tmp_path, timeout=300)


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def logged_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training on one thread, like the subprocesses


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def uninterrupted(work, tiny_base) -> Path:
    """The reference: the tiny run trained start to finish in its own process."""
    cfg = write_cfg(work, run_config(work, tiny_base, "reference"), "reference.yaml")
    r = train_subprocess(work, cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "reference"


# --------------------------------------------------------------------------- 1. crash and resume


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_the_uninterrupted_run(work, tiny_base, uninterrupted, capsys):
    cfg = write_cfg(work, run_config(work, tiny_base, "killed"), "killed.yaml")
    run = work / "killed"
    wrapper = work / "fault_wrapper.py"
    proc = subprocess.Popen([sys.executable, str(wrapper), "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=sub_env("slow_steps"), cwd=work)
    marker = run / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    assert metrics(run)["status"] == "running"
    assert not (run / "adapter").exists()

    code, _, err = cli(capsys, "train", cfg)  # without --resume the unfinished run is not touched
    assert code == 2 and "holds an unfinished run; pass --resume" in err

    r = train_subprocess(work, cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert metrics(run)["status"] == "complete" and metrics(run)["global_steps"] == 8
    diff = max_diff(adapter(run), adapter(uninterrupted))
    assert diff <= TOL, f"resumed adapter differs by {diff}"
    ref, got = logged_losses(uninterrupted), logged_losses(run)
    assert sorted(got) == list(range(1, 9))
    assert max(abs(ref[s] - got[s]) for s in ref) <= TOL
    for key in ("final_logged_loss", "train_loss"):  # train_loss: the mean over all 8 steps, not just the resumed ones
        assert abs(metrics(run)[key] - metrics(uninterrupted)[key]) <= TOL, key
    # the forgetting check's reference, asked before training without moving the RNG, is read back on resume
    assert (run / "retention-reference.jsonl").read_text() == (uninterrupted / "retention-reference.jsonl").read_text()
    assert metrics(run)["retention"]["answers"] == metrics(uninterrupted)["retention"]["answers"]


@pytest.mark.slow
def test_kills_inside_a_checkpoint_save_and_the_adapter_save_leave_nothing_half_written(work, tiny_base, uninterrupted):
    from peft_pipeline.errors import UserError
    from peft_pipeline.rundir import resolve
    from peft_pipeline.rundir import resolve_resume

    cfg = write_cfg(work, run_config(work, tiny_base, "torn"), "torn.yaml")
    run = work / "torn"
    # 1. killed inside checkpoint-4's save: weights written, trainer_state.json not
    r = train_subprocess(work, cfg, fault="kill_in_checkpoint", KILL_AT="4")
    assert r.returncode == -signal.SIGKILL
    torn = run / "checkpoints" / "checkpoint-4"
    assert (torn / "adapter_model.safetensors").exists() and not (torn / "trainer_state.json").exists()
    assert resolve_resume(run, True) == str(run / "checkpoints" / "checkpoint-2")  # the torn one is skipped

    # 2. resumed, then killed with the final adapter half-saved (weights, no tokenizer yet)
    r = train_subprocess(work, cfg, "--resume", fault="kill_in_adapter_save")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    partial = list(run.glob(".adapter.tmp-*"))
    assert partial and (partial[0] / "adapter_model.safetensors").exists()
    assert not (run / "adapter").exists()
    assert metrics(run)["status"] == "running"
    with pytest.raises(UserError, match="no adapter/"):
        resolve(run)  # eval, merge, export and generate all go through resolve

    # 3. resumed again: finishes with the uninterrupted run's adapter and losses
    r = train_subprocess(work, cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert metrics(run)["status"] == "complete"
    assert not list(run.glob(".*.tmp-*"))  # the half-saved adapter was cleaned up
    assert max_diff(adapter(run), adapter(uninterrupted)) <= TOL
    ref, got = logged_losses(uninterrupted), logged_losses(run)
    assert sorted(got) == list(range(1, 9)) and max(abs(ref[k] - got[k]) for k in ref) <= TOL
    assert abs(metrics(run)["train_loss"] - metrics(uninterrupted)["train_loss"]) <= TOL


# --------------------------------------------------------------------------- 2. atomic outputs


def test_atomic_dir_killed_halfway_never_creates_the_target(tmp_path):
    code = ("import os, signal; from pathlib import Path; from peft_pipeline.paths import atomic_dir\n"
            f"with atomic_dir(Path({str(tmp_path / 'model')!r})) as tmp:\n"
            "    (tmp / 'config.json').write_text('{}')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], env=sub_env())
    assert r.returncode == -signal.SIGKILL
    assert not (tmp_path / "model").exists()
    assert [p.name.startswith(".model.tmp-") for p in tmp_path.iterdir()] == [True]


# --------------------------------------------------------------------------- 3. guarded training


def test_low_disk_stops_before_a_checkpoint_with_one_line_naming_the_run(tmp_path, tiny_base, capsys, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    d = run_config(tmp_path, tiny_base)
    code, _, err = cli(capsys, "train", write_cfg(tmp_path, d))
    assert code == 1
    [line] = error_lines(err)
    assert re.fullmatch(rf"error: {re.escape(d['output_dir'])}: 0\.00 GB free, a checkpoint needs about [\d.]+ GB; "
                        "free space or set output_dir on a larger disk", line)
    assert "Traceback" not in err
    run = Path(d["output_dir"])
    assert metrics(run)["status"] == "running" and not (run / "adapter").exists()
    assert not list((run / "checkpoints").glob("checkpoint-*"))


def test_save_total_limit_keeps_only_the_newest_checkpoints(tmp_path, tiny_base):
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    run = train(config_from_dict(run_config(tmp_path, tiny_base, max_steps=5, save_steps=1, save_total_limit=2)),
                progress=False)
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


# --------------------------------------------------------------------------- 4. hostile input


BAD_DATA = [
    ("wrong_type.jsonl", '{"instruction": "x", "output": 5}\n', ":1: field 'output' must be a string, got int"),
    ("not_utf8.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', ":2: not valid UTF-8 (byte 10)"),
    ("bad.json", '[{"text": "ok"},\n {"text": oops}]', ":2: malformed JSON"),
    ("empty_messages.jsonl", '{"messages": []}\n', ":1: messages must be a non-empty list"),
    ("empty_turn.jsonl", '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}\n',
     ":1: messages[0] (user) is empty"),
    ("unknown_role.jsonl", '{"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     ":1: messages[0]: unknown role 'wizard'"),
    ("ends_with_user.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}\n', ":1: the conversation ends with a user turn"),
    ("content_type.jsonl", '{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}\n',
     ":1: messages[0].content must be a string, got list"),
    ("not_object.jsonl", '["a", "b"]\n', ":1: expected a JSON object per line, got list"),
]


@pytest.mark.parametrize("name, content, message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_one_line_exit_1_and_the_previous_run_survives_overwrite(tmp_path, tiny_base, capsys,
                                                                             name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    d = run_config(tmp_path, tiny_base)
    d["data"]["train"] = str(bad)
    run = Path(d["output_dir"])
    (run / "adapter").mkdir(parents=True)  # a finished run that --overwrite would replace
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "metrics.json").write_text('{"status": "complete"}')
    code, _, err = cli(capsys, "train", write_cfg(tmp_path, d), "--overwrite")
    assert code == 1
    [line] = error_lines(err)
    assert line.startswith(f"error: {bad}") and message in line, line
    assert "Traceback" not in err
    assert metrics(run) == {"status": "complete"}  # nothing lost: the bad data stopped it before the run dir
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"


@pytest.mark.slow
def test_huge_lines_masked_rows_and_duplicates_are_counted_and_reported(tmp_path, tiny_base, capsys):
    rows = ROWS + ROWS[:2] + [{"instruction": "word " * 100, "output": "y"}]  # 2 duplicates; 1 whose answer gets cut off
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(data, "a") as f:  # one 50 MB line: cut to max_length before tokenizing, not a hang or an OOM
        f.write(json.dumps({"instruction": "x", "output": "word " * 10_000_000}) + "\n")
    d = run_config(tmp_path, tiny_base, max_steps=1, max_length=64)
    d["data"].update(train=str(data), overlong="truncate")
    started = time.time()
    code, out, err = cli(capsys, "train", write_cfg(tmp_path, d))
    assert code == 0, err[-2000:]
    assert time.time() - started < 120
    assert "data: 0 dropped and 2 truncated as longer than max_length=64" in out
    assert "data: 1 dropped with no token left to learn from" in out
    assert "data: 2 duplicate examples in train" in out
    report = metrics(Path(d["output_dir"]))["data"]
    assert (report["truncated"], report["dropped_no_loss"], report["duplicates"]) == (2, 1, 2)
    assert report["examples"]["train"] == 11 and report["tokens"]["length_max"] == 64


def test_a_huge_line_is_dropped_as_overlong_without_tokenizing_it(tmp_path, tokenizer):
    import resource

    from peft_pipeline.config import DataSection, DataSource
    from peft_pipeline.data.build import build_datasets

    data = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"instruction": "x", "output": "word " * 10_000_000}])
    started = time.time()
    train, _, report = build_datasets(DataSection(train=[DataSource(path=str(data))], cache=False), tokenizer, 128, 0,
                                      progress=False)
    assert len(train) == 8 and report.dropped_overlong == 1
    assert time.time() - started < 30  # tokenizing it took ~40 s and ~10 GB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 6_000_000  # KiB


def test_config_with_unknown_keys_or_object_tags_exits_2_before_anything_runs(tmp_path, tiny_base, capsys):
    d = run_config(tmp_path, tiny_base)
    d["model"]["nmae"] = "x"
    d["lora"]["rank"] = 8
    code, _, err = cli(capsys, "train", write_cfg(tmp_path, d))
    assert code == 2 and "Traceback" not in err
    assert re.search(r"model\.nmae \(line \d+\): unknown key \(did you mean name\?\)", err)
    assert re.search(r"lora\.rank \(line \d+\): unknown key", err)

    pwned = tmp_path / "pwned"
    cfg = tmp_path / "tag.yaml"
    cfg.write_text(f"model: !!python/object/apply:os.system ['touch {pwned}']\n")
    code, _, err = cli(capsys, "train", cfg)
    assert code == 2 and not pwned.exists()
    [line] = error_lines(err)
    assert "tag.yaml:1:" in line and "tags that build objects are refused" in line
    assert not Path(d["output_dir"]).exists()


# --------------------------------------------------------------------------- 5. safe by default


def test_trust_remote_code_is_off_in_every_load(tmp_path, tiny_base, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peft_pipeline.config import config_from_dict
    from peft_pipeline.model.load import load_model
    from peft_pipeline.rundir import resolve
    from peft_pipeline.tasks import train

    calls = []

    def spy(cls, name):
        real = getattr(cls, name)

        def wrapper(*args, **kwargs):
            calls.append((f"{cls.__name__}.{name}", kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    for cls in (AutoConfig, AutoTokenizer, AutoModelForCausalLM):
        spy(cls, "from_pretrained")
    spy(AutoModelForCausalLM, "from_config")
    run = train(config_from_dict(run_config(tmp_path, tiny_base, max_steps=1)), progress=False)
    names = {n for n, _ in calls}
    assert {"AutoConfig.from_pretrained", "AutoTokenizer.from_pretrained", "AutoModelForCausalLM.from_pretrained",
            "AutoModelForCausalLM.from_config"} <= names
    assert all(kw["trust_remote_code"] is False for _, kw in calls), calls  # passed explicitly, and off
    calls.clear()
    load_model(resolve(run))  # later stages (eval, generate, merge) load the same way
    assert calls and all(kw.get("trust_remote_code", False) is False for _, kw in calls), calls


def test_pickle_weights_are_refused_unless_allow_pickle(tmp_path, tokenizer, capsys):
    import torch
    from safetensors.torch import load_file

    base = make_tiny_llama(tmp_path / "bin_base", tokenizer)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    d = run_config(tmp_path, base, max_steps=1)
    cfg = write_cfg(tmp_path, d)
    code, _, err = cli(capsys, "train", cfg)
    assert code == 1 and "Traceback" not in err
    [line] = error_lines(err)
    assert str(base) in line and "model.allow_pickle: true" in line, line
    assert metrics(Path(d["output_dir"]))["status"] != "complete"

    code, _, err = cli(capsys, "train", cfg, "--overwrite", "model.allow_pickle=true")  # override after an option
    assert code == 0, err[-2000:]
    assert metrics(Path(d["output_dir"]))["status"] == "complete"


def test_yaml_is_read_with_safe_loaders_only(tmp_path):
    import inspect

    from peft_pipeline import config

    from peft_pipeline import rundir

    for module in (config, rundir):
        src = inspect.getsource(module)
        assert not re.search(r"yaml\.(unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b", src), module.__name__
        for name in re.findall(r"yaml\.load\([^)]*Loader=([\w.]+)", src):
            loader = eval(name, vars(module))  # noqa: S307 - a name from our own source
            assert issubclass(loader, yaml.SafeLoader), name
    # an object tag in a command-line override is plain text, never an object
    pwned = tmp_path / "pwned"
    data = config.apply_overrides({}, [f"model.name=!!python/object/apply:os.system ['touch {pwned}']"])
    assert isinstance(data["model"]["name"], str) and not pwned.exists()


# --------------------------------------------------------------------------- 6. reproducible


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_adapter_and_the_run_records_its_provenance(work, tiny_base, uninterrupted):
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    # a second run in another process (this one), on one thread like the reference
    again = train(config_from_dict(run_config(work, tiny_base, "again")), progress=False)
    diff = max_diff(adapter(again), adapter(uninterrupted))
    assert diff <= TOL, f"same config and seed, adapters differ by {diff}"

    m = metrics(uninterrupted)
    assert {"python", "torch", "transformers", "peft", "trl", "accelerate", "datasets"} <= m["versions"].keys()
    assert all(m["versions"][k] for k in ("python", "torch", "transformers", "peft", "trl"))
    data = work / "train.jsonl"
    assert m["data_files"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", m["git_commit"] or "")
    assert list(m)[-1] == "status" and m["status"] == "complete"  # written last


def test_overrides_may_follow_options_and_resume_does_not_swallow_them(tmp_path):
    from peft_pipeline.cli import _parse, _parser

    args = _parse(_parser(), ["train", "c.yaml", "--resume", "training.max_steps=10", "--overwrite", "lora.r=8"])
    assert args.resume is True and args.overwrite and args.overrides == ["training.max_steps=10", "lora.r=8"]
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    args = _parse(_parser(), ["train", "c.yaml", "--resume", str(ckpt), "lora.r=8"])
    assert args.resume == str(ckpt) and args.overrides == ["lora.r=8"]
    with pytest.raises(SystemExit) as e:
        _parse(_parser(), ["train", "c.yaml", "--resume", "--bogus"])
    assert e.value.code == 2
