"""Reading what earlier stages wrote: a run dir, a bare adapter dir, or a merged model dir.

Later stages (eval, generate, chat, merge, export) take any of the three and need the same
things from it: the base model path and settings, the adapter (if any), the tokenizer with the
chat template used in training, and the stop tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from peft_pipeline.errors import UserError


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
    from peft_pipeline.config import RunConfig

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


def _read_run_config(path: Path):
    """A run's saved config.yaml, validated; a damaged one is a one-line error."""
    from pydantic import ValidationError

    from peft_pipeline.config import RunConfig

    try:
        return RunConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid run config ({first}); was it edited by hand?") from None


def _base_path(adapter_dir: Path, cfg) -> str:
    # The run's config names the base the way the user did (embedded name, hub id or path);
    # the adapter config's base_model_name_or_path is the resolved path on the training machine.
    from peft_pipeline.model import resolve_model_path

    if cfg is not None:
        return resolve_model_path(cfg.model)
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json: no base_model_name_or_path; cannot tell which base to load")
    return base


def load_tokenizer(target: Target, padding_side: str = "left"):
    """Tokenizer with the training chat template; left padding for batched generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target.tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def stop_token_ids(target: Target, tokenizer) -> list[int]:
    """End-of-turn ids saved at training time (generation_config.json), else template + EOS."""
    from peft_pipeline.data import stop_ids

    for d in (target.adapter_dir, Path(target.model_path) if target.kind == "merged" else None):
        gen = d / "generation_config.json" if d else None
        if gen and gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                return sorted(set(eos if isinstance(eos, list) else [eos]))
    return stop_ids(tokenizer)


def load_model(target: Target, with_adapter: bool = True, quantized: bool | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, place_on_gpu: bool = False):
    """Base (+ adapter) ready for inference, in eval mode.

    `quantized=None` reproduces training (4-bit base for a QLoRA run); False loads full precision.
    `dtype` / `attn_implementation` override the run's model section (e.g. float32 + eager for merge checks).
    `place_on_gpu` moves an unquantized model to the GPU when there is one (eval, generate, chat).
    """
    from peft_pipeline.classify import refuse
    from peft_pipeline.config import ModelSection, QuantizationSection

    # A causal LM with a classifier's adapter would generate from an untrained LM head.
    refuse(target, "it predicts labels, not text", f"use `peft-pipeline eval {target.path}` [--data FILE]")
    from peft_pipeline.model import load_base

    model_cfg = target.config.model if target.config is not None else ModelSection(name=target.model_path)
    if dtype is not None:
        model_cfg = model_cfg.model_copy(update={"dtype": dtype})
    if attn_implementation is not None:
        model_cfg = model_cfg.model_copy(update={"attn_implementation": attn_implementation})
    qcfg = target.config.quantization if target.config is not None and target.kind != "merged" else QuantizationSection()
    if quantized is None:
        quantized = qcfg.mode != "none"
    model = load_base(model_cfg, qcfg, target.model_path, quantize=quantized)
    if place_on_gpu and not quantized:
        import torch

        if torch.cuda.is_available():
            # load_base leaves unquantized weights on the CPU (the trainer places them when training).
            model = model.to("cuda")
    if with_adapter and target.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(target.adapter_dir))
    model.eval()
    return model


def summary(path: str | Path) -> str:
    """A run dir in a few lines: what it holds and what each stage measured (no model loaded)."""
    run = Path(path)

    def read(p: Path) -> dict:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    metrics, evals = read(run / "metrics.json"), read(run / "eval.json")
    merged_eval, merge, export = read(run / "merged" / "eval.json"), read(run / "merge_report.json"), read(run / "export_report.json")
    lines = [f"run: {run}  status: {metrics.get('status', 'missing metrics.json')}"]
    if metrics.get("status") == "complete":
        losses = f", loss {metrics['first_logged_loss']:.4f} -> {metrics['final_logged_loss']:.4f}" if metrics.get("final_logged_loss") else ""
        evl = f", eval loss {metrics['eval_loss']:.4f}" if metrics.get("eval_loss") is not None else ""
        lines.append(f"  trained {metrics.get('global_steps')} steps, {metrics.get('trained_tokens')} tokens{losses}{evl}")
    scores = [("base", _test_metric(evals, "base")), ("adapter", _test_metric(evals, "adapter")),
              ("merged", _test_metric(merged_eval, None)),
              ("gguf", (export.get("test_scores") or {}).get("exact_match"))]
    shown = [f"{name} {value:.1%}" for name, value in scores if isinstance(value, (int, float))]
    if shown:
        lines.append("  exact match on test prompts: " + ", ".join(shown))
    kept = evals.get("retention") or metrics.get("retention")  # eval --retention is the newer one when both exist
    if kept:
        from peft_pipeline.retention import summary_line

        lines.append("  " + summary_line(kept))
    if merge:
        parity = merge.get("parity") or {}
        lines.append(f"  merge: {merge.get('status')}, max |logit diff| vs base+adapter {parity.get('max_abs_diff')}, "
                     f"greedy identical on {parity.get('greedy_identical')} of {parity.get('prompts')} prompts")
    if export:
        lines.append(f"  gguf: {export.get('status')}, {export.get('file')} ({export.get('bytes', 0) / 1e6:.0f} MB), "
                     f"greedy identical: {export.get('check', {}).get('greedy_identical')}")
    for name in ("adapter", "model", "merged", "export", "checkpoints"):
        if (run / name).exists():
            lines.append(f"  {name + '/':13s} {run / name}")
    return "\n".join(lines)


def _test_metric(evals: dict, model: str | None, metric: str = "exact_match"):
    """One model's generation metric in an eval.json (model None: the only model evaluated)."""
    per_model = ((evals.get("generation") or {}).get("metrics") or {})
    if model is None:
        model = (evals.get("models") or [None])[-1]
    value = (per_model.get(model) or {}).get(metric)
    return value if isinstance(value, (int, float)) else None
