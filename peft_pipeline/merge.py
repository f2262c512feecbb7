"""Merge stage: a run's LoRA adapter folded into the full-precision base, proven equal, saved as a plain model.

Merging into 4-bit weights changes outputs (peft #1043, #2321), so the base is always reloaded
unquantized in float32, QLoRA runs included, and the merge is checked every time before anything
is written:
  1. parity: the merged model's logits on a few of the run's own examples against base + adapter
     (both float32): max abs difference below TOLERANCE, and the same greedy generations;
  2. the saved directory, reloaded with a plain AutoModelForCausalLM (no peft), against the merged
     weights it was written from (after rounding to --dtype);
  3. QLoRA only, reported not enforced: the gap between the adapter on the 4-bit base (what
     training saw) and the merged full-precision model.
A failed check is a UserError and leaves no merged directory (the write goes through atomic_dir).
The numbers go to merge_report.json in the run dir, with a copy in the merged dir.
"""

from __future__ import annotations

import time
from pathlib import Path

from peft_pipeline.console import say as _say_prefixed
from peft_pipeline.errors import UserError
from peft_pipeline.evaluate.parity import (GEN_TOKENS, N_SAMPLES, TOLERANCE, Measured, Sample, builtin_samples, compare,
                                           generate, measure, to_sample)

SAVE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHARD_SIZE = "5GB"  # shards that load one at a time, as on the hub
# Eager attention for the float32 checks: every architecture has it, in every dtype, on every device
# (flash-attention has no float32); the checks run on a few short examples, so its cost does not matter.
CHECK_ATTENTION = "eager"

# Prompts used when none of the run's data files can be read from here (relative paths, other machine).


def merge(path: str | Path, out: str | Path | None = None, dtype: str = "auto") -> Path:
    """Merge the adapter of a run into its float32 base, verify, save; return the merged dir."""
    from peft_pipeline.data.template import load_tokenizer, stop_token_ids
    from peft_pipeline.paths import atomic_dir

    started = time.time()
    target = resolve_merge_target(path)
    out = check_out_dir(target, Path(out) if out else default_out_dir(target))
    save_dtype = choose_save_dtype(target, dtype)
    tokenizer = load_tokenizer(target.tokenizer_dir, padding_side="left")
    samples, source = load_samples(target, tokenizer)
    device = choose_device(target)
    stop = stop_token_ids(target, tokenizer)
    report = new_report(target, out, save_dtype, source, samples, device)
    say(f"merging {target.adapter_dir} into {target.model_path} (float32) -> {out}")
    say(f"checking on {len(samples)} examples from {source}")

    quantized = measure_quantized(target, samples, stop, tokenizer) if target.quantization_mode != "none" else None
    merged, got, ref = merge_in_fp32(target, device, samples, stop, tokenizer)
    report["samples"]["greedy_adapter"] = [tokenizer.decode(s.continuations["adapter"]) for s in samples]
    report["parity"] = parity = compare(ref, got, "adapter", gate=True)
    if quantized is not None:
        report["qlora_gap"] = quantization_gap(quantized, got, samples, tokenizer, target.quantization_mode)
    fail_unless(parity["passed"], parity, report, target, out, "merged model differs from base + adapter")

    cast = round_weights(merged, save_dtype, samples, got, ref, report)
    with atomic_dir(out) as tmp:
        say(f"saving {save_dtype} weights to {out}")
        save_merged(merged, target, tokenizer, stop, tmp, save_dtype)
        del merged
        report["reload"] = reload = check_saved(tmp, save_dtype, cast, samples, device)
        fail_unless(reload["passed"], reload, report, target, out, "the saved model differs from the merged weights")
        report["status"] = "passed"
        report["runtime_s"] = round(time.time() - started, 1)
        write_report(report, tmp)
    write_report(report, target.run_dir)
    say(*summary_lines(report), f"merged model: {out}")
    return out


# --------------------------------------------------------------------------- inputs and outputs




def resolve_merge_target(path: str | Path):
    """A run dir or adapter dir; a merged model has nothing left to merge."""
    from peft_pipeline.rundir import resolve

    target = resolve(path)
    if target.kind == "merged" or target.adapter_dir is None:
        raise UserError(f"{path}: already a merged model (no adapter); give the run directory that holds adapter/")
    return target


def default_out_dir(target) -> Path:
    """RUN_DIR/merged; beside a bare adapter dir when there is no run dir."""
    if target.run_dir is not None:
        return target.run_dir / "merged"
    return target.adapter_dir.with_name(target.adapter_dir.name + "-merged")


def check_out_dir(target, out: Path) -> Path:
    """Refuse an --out that would replace the run, the adapter, the base or unrelated files."""
    protected = [p for p in (target.run_dir, target.adapter_dir, Path(target.model_path)) if p is not None]
    resolved = out.resolve()
    for p in protected:
        p = p.resolve()
        if resolved == p or resolved in p.parents:
            raise UserError(f"--out {out}: would replace {p}; choose a new directory (default: RUN_DIR/merged)")
    earlier_merge = (out / "merge_report.json").is_file() and (out / "config.json").is_file()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not earlier_merge)):
        raise UserError(f"--out {out}: exists and is not a merged model from an earlier merge; "
                        "choose another --out or remove it")
    return out


def choose_save_dtype(target, dtype: str) -> str:
    """--dtype as a torch dtype name; 'auto' keeps the base checkpoint's own dtype (float32 if unknown)."""
    if dtype != "auto":
        if dtype not in SAVE_DTYPES:
            raise UserError(f"--dtype {dtype}: expected one of auto, {', '.join(SAVE_DTYPES)}", exit_code=2)
        return SAVE_DTYPES[dtype]
    from transformers import AutoConfig

    model = target.config.model if target.config is not None else None
    try:
        config = AutoConfig.from_pretrained(target.model_path, revision=model.revision if model else None,
                                            trust_remote_code=bool(model and model.trust_remote_code))
    except (OSError, ValueError):
        return "float32"
    stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return stored if stored in SAVE_DTYPES.values() else "float32"


def choose_device(target) -> str:
    """'cuda' when the float32 base fits in free GPU memory (with headroom), else 'cpu'."""
    import torch

    from peft_pipeline.config import ModelSection
    from peft_pipeline.model.load import meta_model

    model_cfg = target.config.model if target.config is not None else ModelSection(name=target.model_path)
    n_params = sum(p.numel() for p in meta_model(model_cfg, target.model_path).parameters())
    need = n_params * 4  # float32 bytes; the adapter, activations and caches fit in the 25% headroom below
    size = f"~{need / 2**30:.2f} GiB ({n_params / 1e6:,.0f}M parameters)"
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        if need * 1.25 < free:
            say(f"float32 base {size} fits the GPU ({free / 2**30:.1f} GiB free)")
            return "cuda"
        say(f"float32 base {size} does not fit the GPU ({free / 2**30:.1f} GiB free); merging on CPU")
    else:
        say(f"no GPU: float32 base {size} in CPU memory")
    available = _available_ram()
    if available is not None and need > available:
        say(f"warning: only {available / 2**30:.1f} GiB of CPU memory available; the merge may run out of memory")
    return "cpu"


def _available_ram() -> int | None:
    """Bytes of memory available to new allocations (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def new_report(target, out: Path, save_dtype: str, source: str, samples, device: str) -> dict:
    """The report's fixed part: what was merged, where, and on what."""
    from peft_pipeline.rundir import package_versions

    return {
        "status": "running",
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "adapter_dir": str(target.adapter_dir),
        "base_model": target.model_path,
        "quantization_mode": target.quantization_mode,
        "merged_into": "float32 base (unquantized)",
        "out_dir": str(out.resolve()),  # absolute: `export RUN` finds the merge here (rundir.merged_dir)
        "saved_dtype": save_dtype,
        "compare_dtype": "float32",
        "device": device,
        "tolerance": TOLERANCE,
        "samples": {"source": source, "count": len(samples), "tokens": sum(len(s.ids) for s in samples),
                    "new_tokens_per_prompt": GEN_TOKENS},
        "versions": package_versions(),
    }


def write_report(report: dict, directory: Path | None) -> None:
    """merge_report.json in `directory` (skipped when there is none, e.g. a bare adapter dir)."""
    from peft_pipeline.paths import write_json_atomic

    if directory is not None:
        write_json_atomic(Path(directory) / "merge_report.json", report)


def fail_unless(ok: bool, check: dict, report: dict, target, out: Path, what: str) -> None:
    """A failed check is an error: report it (status failed) and stop before the output is in place.

    An earlier merge in `out` goes too: left there, `export` would take it for this adapter's merge.
    """
    import shutil

    if ok:
        return
    report["status"] = "failed"
    write_report(report, target.run_dir)
    removed = ""
    if out.exists():
        shutil.rmtree(out)
        removed = f"; removed the earlier merge in {out}"
    where = f"; details in {target.run_dir / 'merge_report.json'}" if target.run_dir else ""
    raise UserError(f"merge check failed: {what} ({check['reason']}); no merged model written{removed}{where}")


def summary_lines(report: dict) -> list[str]:
    """The report's numbers in a few lines."""
    p = report["parity"]
    lines = [f"parity (float32): max |logit diff| {p['max_abs_diff']:.2e} (< {TOLERANCE:g}), "
             f"greedy {p['greedy_identical']}/{p['prompts']} identical"]
    if "cast" in report:
        c = report["cast"]
        lines.append(f"saved as {report['saved_dtype']}: max |logit diff| {c['max_abs_diff']:.2e}, "
                     f"greedy {c['greedy_identical']}/{c['prompts']} identical (rounding to {report['saved_dtype']})")
    if "qlora_gap" in report and "skipped" not in report["qlora_gap"]:
        g = report["qlora_gap"]
        lines.append(f"{g['base_quantization']} base + adapter (as trained) vs merged: loss {g['loss_quantized_adapter']:.4f} "
                     f"vs {g['loss_merged']:.4f}, max |logit diff| {g['max_abs_diff']:.3f}, "
                     f"greedy {g['greedy_identical']}/{g['prompts']} identical")
    return lines


# --------------------------------------------------------------------------- samples


def load_samples(target, tokenizer) -> tuple[list[Sample], str]:
    """A few of the run's own examples (eval, else test, else train), rendered as in training."""
    from peft_pipeline.data.build import DataReport, load_examples
    from peft_pipeline.config import DataSource

    cfg = target.config
    if cfg is not None:
        test = [DataSource(path=cfg.data.test)] if cfg.data.test else []
        for split, sources in (("eval", cfg.data.eval), ("test", test), ("train", cfg.data.train)):
            # Paths in config.yaml are relative to where training ran; use what can be read from here.
            local = [s for s in sources if Path(s.path).expanduser().is_file() or Path(s.path).expanduser().is_dir()]
            if not local:
                continue
            try:
                examples = load_examples(local[:1], cfg.data.system_prompt, cfg.seed, DataReport())
            except UserError:
                continue  # e.g. a test file in a format training does not read
            samples = [s for s in (to_sample(ex, tokenizer, cfg.data.train_on_prompt) for ex in examples[: 4 * N_SAMPLES]) if s]
            if samples:
                return samples[:N_SAMPLES], f"{split} data {local[0].path}"
    return builtin_samples(tokenizer), "built-in prompts (the run's data files are not readable from here)"


# --------------------------------------------------------------------------- measuring


# --------------------------------------------------------------------------- the stages of a merge


def measure_quantized(target, samples, stop, tokenizer) -> Measured | None:
    """The adapter on the quantized base, as training saw it (freed before the float32 load)."""
    import gc
    import importlib.util

    import torch

    from peft_pipeline.model.load import load_model

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    say(f"measuring the adapter on the {target.quantization_mode} base (what training saw)")
    model = load_model(target, with_adapter=True, quantized=True)
    generate(model, samples, "quantized", stop, tokenizer)
    measured = measure(model, samples, ("quantized",))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # room for the float32 base
    return measured


def merge_in_fp32(target, device: str, samples, stop, tokenizer):
    """Base + adapter in float32 (the reference), then merged in place; both measured."""
    from peft_pipeline.model.load import load_model

    say(f"loading the float32 base + adapter on {device}")
    # from_pretrained reads safetensors shard by shard into empty (meta) modules: one copy in memory.
    model = load_model(target, with_adapter=True, quantized=False, dtype="float32",
                            attn_implementation=CHECK_ATTENTION).to(device)
    if getattr(model.config, "quantization_config", None):
        raise UserError(f"{target.model_path}: the base checkpoint is itself quantized; merging needs a "
                        "full-precision base (set model.name to the unquantized model)")
    generate(model, samples, "adapter", stop, tokenizer)
    ref = measure(model, samples, ("adapter",))
    say("merging the adapter into the weights")
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them
    except ValueError as e:
        raise UserError(f"{target.adapter_dir}: cannot merge: {str(e).splitlines()[0]}") from None
    probes = ("adapter", "quantized") if "quantized" in samples[0].continuations else ("adapter",)
    got = measure(merged, samples, probes)
    return merged, got, ref


def quantization_gap(quantized: Measured | None, merged: Measured, samples, tokenizer, mode: str) -> dict:
    """How far the merged float32 model is from the adapter on the quantized base (not a failure)."""
    if quantized is None:
        return {"skipped": "bitsandbytes is not installed here"}
    c = compare(quantized, merged, "quantized")
    return {
        "base_quantization": mode,
        "loss_quantized_adapter": c["loss_reference"],
        "loss_merged": c["loss"],
        "max_abs_diff": c["max_abs_diff"],
        "mean_abs_diff": c["mean_abs_diff"],
        "prompts": c["prompts"],
        "greedy_identical": c["greedy_identical"],
        "greedy_agree": c["greedy_identical"] == c["prompts"],
        "greedy": c["greedy"],
        "greedy_quantized_adapter": [tokenizer.decode(s.continuations["quantized"]) for s in samples],
        "note": "the adapter was trained against the quantized weights; merged into float32 it sees the true ones",
    }


def round_weights(merged, save_dtype: str, samples, got: Measured, ref: Measured, report: dict) -> Measured:
    """Round the merged weights to the save dtype (values only; compute stays float32) and measure that."""
    import torch

    if save_dtype == "float32":
        return got
    target_dtype = getattr(torch, save_dtype)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            rounded = p.to(target_dtype)
            if not torch.isfinite(rounded).all() and torch.isfinite(p).all():
                raise UserError(f"--dtype: {name} overflows {save_dtype}; use --dtype bf16 or fp32")
            p.copy_(rounded.float())
    cast = measure(merged, samples, ("adapter",))
    report["cast"] = {**compare(ref, cast, "adapter"), "note": f"saved dtype {save_dtype} differs from the float32 check; "
                      "these numbers are the rounding of the weights, computed in float32"}
    return cast


def save_merged(merged, target, tokenizer, stop: list[int], out: Path, save_dtype: str) -> None:
    """A plain HF model dir: safetensors shards, config without quantization, tokenizer, stop tokens."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    merged = merged.to(getattr(torch, save_dtype))  # save_pretrained copies to CPU one tensor at a time
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, key):
            delattr(merged.config, key)
    gen_dir = target.adapter_dir if (target.adapter_dir / "generation_config.json").is_file() else None
    gen = GenerationConfig.from_pretrained(gen_dir) if gen_dir else GenerationConfig(do_sample=False)
    gen.eos_token_id = stop
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = getattr(merged.config, "bos_token_id", None)
    merged.generation_config = gen
    merged.save_pretrained(out, max_shard_size=SHARD_SIZE)
    # The tokenizer as training saved it (its padding side and chat template), not our inference copy.
    AutoTokenizer.from_pretrained(target.tokenizer_dir).save_pretrained(out)


def check_saved(out: Path, save_dtype: str, cast: Measured, samples, device: str) -> dict:
    """Reload the saved dir with plain transformers in float32; it must reproduce the merged weights."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    say("reloading the saved model without peft to check it")
    problems = []
    config = json.loads((out / "config.json").read_text())
    if (out / "adapter_config.json").exists():
        problems.append("adapter_config.json in the merged dir")
    if "quantization_config" in config:
        problems.append("config.json carries a quantization_config")
    if config.get("dtype") != save_dtype:
        problems.append(f"config.json dtype {config.get('dtype')} is not {save_dtype}")
    # float32 compute on the saved values: the same numbers the rounded in-memory weights gave.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation=CHECK_ATTENTION).to(device)
    if any("lora_" in n for n, _ in model.named_parameters()):
        problems.append("LoRA parameters left in the weights")
    reloaded = measure(model, samples, ("adapter",))
    del model
    result = compare(cast, reloaded, "adapter", gate=True)
    if problems:
        result["passed"] = False
        result["reason"] = "; ".join(problems + ([result["reason"]] if result["reason"] else []))
    return result


def say(*lines: str) -> None:
    """console.say under this stage's own prefix."""
    _say_prefixed(*lines, prefix="[peft-pipeline] merge:")
