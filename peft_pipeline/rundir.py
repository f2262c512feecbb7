"""The run-directory contract: one owner for writing it (train) and reading it (every later stage).

A run directory, as `train` writes it:
  adapter/        PEFT adapter + tokenizer + chat template + generation_config (stop tokens)
  config.yaml     the resolved config (enough to re-run)
  metrics.json    final losses, tokens, runtime, parameter counts, versions; "status": "complete" last
  log.jsonl       one JSON object per logged step
  checkpoints/    trainer checkpoints (resumable)
  report.md       for people: loss/learning-rate plots, eval tables (report.py)
  retention-reference.jsonl  the base's answers to the retention prompts, asked before training (evaluate/retention.py)
Later stages write beside it: eval.json, harness.json, merged/ + merge_report.json, export/ + export_report.json.
merge_report.json records where the merged model went (`merge --out DIR` included): see merged_dir.
Only the main process writes. Later stages (eval, generate, chat, merge, export) take a run dir,
a bare adapter dir or a merged model dir; `resolve` says which, and what each holds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from peft_pipeline.config import RunConfig
from peft_pipeline.errors import UserError
from peft_pipeline.paths import file_digest, write_json_atomic

STACK = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "peft-pipeline")


# --------------------------------------------------------------------------- writing (the train stage)


def check(run: Path, overwrite: bool, resume) -> None:
    """Refuse to clobber a finished run, or to mix into an unfinished one without --resume."""
    if not run.exists() or overwrite or resume:
        return
    if status(run) == "complete":
        raise UserError(f"{run}: a finished run is already there; pass --overwrite or choose another output_dir", exit_code=2)
    if any(run.iterdir()):
        raise UserError(f"{run}: holds an unfinished run; pass --resume to continue it or --overwrite to start over", exit_code=2)


def status(run: Path) -> str | None:
    """'complete', 'running', 'failed' or None, from metrics.json."""
    try:
        return json.loads((run / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def start(run: Path, cfg: RunConfig, overwrite: bool, resume, state) -> None:
    """Create the run dir (main process), save the resolved config, mark it running."""
    import shutil

    if state.is_main_process:
        if overwrite and run.exists() and not resume:
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(run)
        (run / "config.yaml").write_text(cfg.to_yaml())
        write_json_atomic(run / "metrics.json", {"status": "running", "versions": package_versions()})
        if not resume:
            (run / "log.jsonl").write_text("")
    state.wait_for_everyone()


def resolve_resume(run: Path, resume) -> str | bool | None:
    """--resume (latest checkpoint) or --resume PATH; None to start fresh."""
    if not resume:
        return None
    if resume is True or resume == "auto":
        # trainer_state.json is written last: a checkpoint without it was cut short by a crash
        ckpts = sorted((p for p in (run / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                       key=lambda p: int(p.name.split("-")[-1]))
        return str(ckpts[-1]) if ckpts else None
    return str(resume)


def remove_partial_saves(run: Path) -> None:
    """Delete what a killed run left half-written (atomic_dir / write_json_atomic temporaries)."""
    import shutil

    for stale in run.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def trim_log(log: Path, checkpoint: str) -> None:
    """Drop log.jsonl records past the checkpoint: those steps are trained again after a crash."""
    try:
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return
    log.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))


def append_log(path: Path, state, record: dict) -> None:
    """One log.jsonl line: the step, epoch and time of the trainer state, then the record."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **record}) + "\n")


def finish(run: Path, metrics: dict) -> None:
    """Write metrics.json last, with status complete: the marker that the run finished."""
    write_json_atomic(run / "metrics.json", {**metrics, "versions": package_versions(), "status": "complete"})


def data_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """sha256 of every local data file the run read."""
    out = {}
    for src in cfg.data.train + cfg.data.eval:
        p = Path(src.path)
        if p.is_file():
            out[src.path] = file_digest(p)
    return out


def git_commit() -> str | None:
    """The commit of this project's checkout (None when not run from a git checkout)."""
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names=STACK) -> dict[str, str | None]:
    """Versions of the stack, for reproducibility and bug reports."""
    import importlib.metadata as md
    import platform

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- reading (every later stage)


@dataclass
class Target:
    """What a path given to a later stage holds."""

    kind: str  # "run" | "adapter" | "merged"
    path: Path
    run_dir: Path | None  # where reports are written beside (None for a bare model dir)
    adapter_dir: Path | None
    model_path: str  # base model path (run/adapter) or the merged dir itself
    config: object | None  # RunConfig when a run dir (or its config.yaml) is known

    @property
    def tokenizer_dir(self) -> str:
        """The tokenizer saved with the adapter carries the chat template used in training."""
        return str(self.adapter_dir or self.model_path)

    @property
    def quantization_mode(self) -> str:
        """The quantization the adapter was trained on ('none' for merged models)."""
        return self.config.quantization.mode if self.config is not None and self.kind != "merged" else "none"

    @property
    def out_dir(self) -> Path:
        """Where reports about this target go: the run dir, else the given dir."""
        return self.run_dir or self.path


def resolve(path: str | Path) -> Target:
    """Identify a run dir / adapter dir / merged model dir, or say what is missing."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: does not exist; give a run directory (output_dir of `train`), an adapter or a model dir")
    cfg = _read_run_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
    if (path / "adapter" / "adapter_config.json").is_file():
        adapter = path / "adapter"
        return Target("run", path, path, adapter, _base_path(adapter, cfg), cfg)
    if (path / "adapter_config.json").is_file():
        parent_cfg = path.parent / "config.yaml"
        if cfg is None and parent_cfg.is_file():
            cfg = _read_run_config(parent_cfg)
        run_dir = path.parent if parent_cfg.is_file() else None
        return Target("adapter", path, run_dir, path, _base_path(path, cfg), cfg)
    if cfg is not None and (path / "model" / "config.json").is_file():
        # A run that fine-tuned the base itself (freeze.method: top_layers): a full model, used like a merged one.
        return Target("merged", path, path, None, str(path / "model"), cfg)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return Target("merged", path, None, None, str(path), cfg)
    if (path / "config.yaml").is_file():
        raise UserError(f"{path}: a run directory with no adapter/ (training did not finish?); run `peft-pipeline train` again with --resume")
    raise UserError(f"{path}: holds no adapter (adapter_config.json) and no model (config.json + *.safetensors)")


def source_run(target: Target) -> Target | None:
    """The run a merged model dir was merged from (its merge_report.json's run_dir, else the dir above it
    when that is a run), or None: so a merged model can be checked against what its run saved."""
    if target.kind != "merged" or target.run_dir is not None:
        return None
    candidates = []
    try:
        recorded = json.loads((target.path / "merge_report.json").read_text()).get("run_dir")
        candidates.append(Path(recorded)) if recorded else None
    except (OSError, ValueError):
        pass
    candidates.append(target.path.resolve().parent)
    for run in candidates:
        if (run / "config.yaml").is_file() and (run / "adapter" / "adapter_config.json").is_file():
            return resolve(run)
    return None


def merged_dir(target: Target) -> Path | None:
    """The merged model of a run: where its last passing merge wrote it (merge_report.json), else RUN_DIR/merged."""
    if target.kind == "merged":
        return Path(target.model_path)
    if target.run_dir is None:
        return None
    try:
        report = json.loads((target.run_dir / "merge_report.json").read_text())
    except (OSError, ValueError):
        report = {}
    recorded = Path(report["out_dir"]) if report.get("status") == "passed" and report.get("out_dir") else None
    for d in (recorded, target.run_dir / "merged"):
        if d is not None and (d / "config.json").is_file():
            return d
    return None


def _read_run_config(path: Path):
    """A run's saved config.yaml, validated; a damaged one is a one-line error."""
    from pydantic import ValidationError

    try:
        return RunConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid run config ({first}); was it edited by hand?") from None


def _base_path(adapter_dir: Path, cfg) -> str:
    # The run's config names the base the way the user did (embedded name, hub id or path);
    # the adapter config's base_model_name_or_path is the resolved path on the training machine.
    from peft_pipeline.paths import resolve_model_path

    if cfg is not None:
        return resolve_model_path(cfg.model)
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json: no base_model_name_or_path; cannot tell which base to load")
    return base
