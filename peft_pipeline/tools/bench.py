"""Bench stage: training variants timed in one process, written as a Markdown table and JSON.

`peft-pipeline bench` (and `make bench`) trains each variant on the same rows in the same order
(one seed, one sampler, one batch size and max_length) for `warmup + steps` optimizer steps, and
reports over the measured steps only:

  real tokens/s  non-pad tokens of the measured steps / their wall time. A step runs from the end
                 of the previous optimizer step to the end of its own: collation, forward, backward,
                 optimizer and the trainer's logging are all inside it.
  step time      mean wall time of a measured step.
  pad share      pad tokens / all tokens the model ran on (0 for padding-free batches).
  peak memory    GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats at the start of
                 the variant. CPU: peak RSS (sampled every 10 ms from /proc/self/statm) above the RSS
                 just before the variant. Both include the weights, which the variant loads itself.
  MFU            model FLOPs / time / peak. A document of n real tokens costs n x (4N + 6 N_lora +
                 6 L d_attn n) (flops.py, "ours", with S = n): pad tokens, recomputation under
                 gradient checkpointing and attention to masked-out positions are not counted.
  final loss     the training loss of the last step.

Variants that run fewer measured steps (slow ones on CPU) are compared with the others over the
steps both ran, which are the same batches.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_pipeline.config import EMBEDDED_BASE
from peft_pipeline.console import say as _say_prefixed
from peft_pipeline.errors import UserError

# Architectures for GPU runs, random weights, dims from each model's public config.json.
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
}

# Dense peaks by GPU name (FLOP/s); elsewhere the bench measures one or takes --peak-tflops.
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))

DATA = {"longtail": "data/longtail/train.jsonl", "orders": "data/orders/train.jsonl"}

# Measurement plumbing shared by every variant: one loss per step, no checkpoints, our own progress lines.
BENCH_ARGS = {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
              "learning_rate": 2e-4, "seed": 42}


@dataclass(frozen=True)
class Variant:
    """One way of training: this pipeline with some training.* overrides, or plain TRL."""

    name: str
    what: str
    recipe: str  # "pipeline": this pipeline's train stage; "trl": SFTTrainer as TRL's docs show it
    data: str = "longtail"
    training: dict[str, Any] = field(default_factory=dict)  # pipeline: training.*; trl: SFTConfig kwargs
    model: dict[str, Any] = field(default_factory=dict)  # pipeline: model.* overrides
    quantize: bool = False  # QLoRA: 4-bit NF4 base
    pipeline_precision: bool = False  # trl: the pipeline's precision (CPU: fp32; GPU: bf16 weights)
    slow_on_cpu: bool = False  # runs `short_steps` measured steps on a CPU


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("defaults", "this pipeline's defaults: padding-free, attention within each packed row's documents "
                        "(FA2 varlen if installed on GPU, else sdpa_varlen), model dtype, no checkpointing, "
                        "Liger if installed on GPU", "pipeline"),
    Variant("padded", "defaults with training.padding_free=false: pad to the longest row of the batch",
            "pipeline", training={"padding_free": False}),
    Variant("defaults-sdpa", "defaults with model.attn_implementation=sdpa: transformers' SDPA, which masks the "
                             "whole pack with a dense block-diagonal mask (sdpa_varlen: each document alone)",
            "pipeline", model={"attn_implementation": "sdpa"}),
    Variant("trl-baseline", "plain TRL: SFTTrainer(model=path, peft_config=LoraConfig), TRL's defaults "
                            "(gradient checkpointing, bf16 autocast, fp32 weights), prompt/completion "
                            "messages, padded", "trl", slow_on_cpu=True),
    Variant("trl-dtype", "trl-baseline with the pipeline's precision (CPU: bf16=False, fp32; GPU: bf16 weights)",
            "trl", pipeline_precision=True),
    Variant("trl-dtype-nogc", "trl-dtype with gradient_checkpointing=False", "trl",
            training={"gradient_checkpointing": False}, pipeline_precision=True),
    Variant("trl-dtype-nogc-pf", "trl-dtype-nogc with padding_free=True (max_length=None)", "trl",
            training={"gradient_checkpointing": False, "padding_free": True, "max_length": None},
            pipeline_precision=True),
    Variant("qlora", "defaults on a 4-bit NF4 base (quantization.mode=4bit, double quant)", "pipeline",
            quantize=True, slow_on_cpu=True),
    Variant("defaults-orders", "defaults on data/orders (short rows of similar length)", "pipeline", data="orders"),
    Variant("padded-orders", "padded on data/orders", "pipeline", data="orders", training={"padding_free": False}),
)}

# Comparisons the report states: (name, faster, slower, target ratio or None).
COMPARISONS = (
    ("padding-free vs padded, longtail", "defaults", "padded", 1.8),
    ("attention split by document vs dense-mask SDPA", "defaults", "defaults-sdpa", None),
    ("defaults vs plain TRL baseline", "defaults", "trl-baseline", 1.5),
    ("ablation 1: pipeline precision", "trl-dtype", "trl-baseline", None),
    ("ablation 2: no gradient checkpointing", "trl-dtype-nogc", "trl-dtype", None),
    ("ablation 3: padding-free", "trl-dtype-nogc-pf", "trl-dtype-nogc", None),
    ("ablation 4: the rest of the pipeline (data prep, kernels)", "defaults", "trl-dtype-nogc-pf", None),
    ("padding-free vs padded, orders", "defaults-orders", "padded-orders", None),
    ("QLoRA NF4 vs LoRA", "qlora", "defaults", None),
)


@dataclass
class BenchSettings:
    """What `peft-pipeline bench` runs (its flags)."""

    out: Path = Path("docs/benchmarks.md")
    model: str = EMBEDDED_BASE
    """A model directory, or the embedded base."""
    model_config: str | None = None
    """A key of MODEL_CONFIGS: that architecture with random weights instead of `model`."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    steps: int = 8
    warmup: int = 2
    short_steps: int = 2
    """Measured steps of the variants marked slow_on_cpu, on a CPU."""
    batch_size: int = 8
    max_length: int = 2048
    data: dict[str, str] = field(default_factory=lambda: dict(DATA))
    profile: tuple[str, ...] = ()
    """Variants that train one more step under torch.profiler (not measured) to show where the time goes."""
    max_samples: int | None = None
    """Rows read from each data file (a seeded sample); None = all."""
    peak_flops: float | None = None
    progress: bool = True
    command: str = ""


def settings_from_args(args, progress: bool = True) -> BenchSettings:
    """BenchSettings from the `bench` command line, with the command itself for the report."""
    import shlex
    import sys

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants else tuple(VARIANTS)
    return BenchSettings(
        out=Path(args.out), model=args.model, model_config=args.model_config, variants=variants,
        steps=args.steps, warmup=args.warmup, short_steps=args.short_steps, batch_size=args.batch_size,
        max_length=args.max_length, max_samples=args.max_samples,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, progress=progress,
        profile=tuple(v.strip() for v in (args.profile or "").split(",") if v.strip()),
        command=shlex.join(["peft-pipeline", *sys.argv[1:]]),
    )


def bench(s: BenchSettings) -> list[dict[str, Any]]:
    """Run every variant in this process, write the Markdown table and JSON, return the results."""
    import tempfile

    check_settings(s)
    import peft, trl  # noqa: F401,E401 - imported before the first variant, so its memory is not charged for them

    env = environment(s)
    say(f"{env['device']}; MFU peak {env['peak_label']}; load average {env['load_before']}")
    results = []
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as work:
        model_dir = prepare_model(s, Path(work))
        release_memory()
        env["rss_baseline"] = rss_bytes()  # the CPU memory meter's zero: after imports, before any variant
        for name in s.variants:
            results.append(run_variant(VARIANTS[name], s, model_dir, Path(work) / name, env))
    env["load_after"] = load_average()
    json_path, md_path = write_report(s, env, results)
    say(f"wrote {md_path} and {json_path}")
    return results


# --------------------------------------------------------------------------- one variant


def run_variant(v: Variant, s: BenchSettings, model_dir: str, run_dir: Path, env: dict) -> dict[str, Any]:
    """Train one variant for warm-up + measured steps; return its measurements."""
    measured = min(s.short_steps, s.steps) if v.slow_on_cpu and env["device_type"] == "cpu" else s.steps
    total = s.warmup + measured
    profiled = v.name in s.profile
    say(f"{v.name}: {v.what} [{s.warmup} warm-up + {measured} measured steps{' + 1 profiled' if profiled else ''}]")
    clock, counter, memory, flops_model, profile = _train(v, s, model_dir, run_dir, total, env, profiled)
    release_memory()
    steps = []
    for k, (dt, cpu) in enumerate(zip(clock.step_times[:total], clock.cpu_times), start=1):
        lengths, computed = counter.batches[k - 1]
        steps.append({"step": k, "time_s": dt, "cpu_s": cpu, "real_tokens": sum(lengths), "computed_tokens": computed,
                      "flops": sum(flops_model(n) for n in lengths), "loss": clock.losses.get(k),
                      "warmup": k <= s.warmup})
    result = {"variant": v.name, "what": v.what, "data": v.data, "measured_steps": measured,
              "warmup_steps": s.warmup, "peak_memory_bytes": memory.peak, "memory_kind": memory.kind,
              "steps": steps, **summarize(steps, env["peak_flops"]), "profile": profile}
    say(f"{v.name}: {result['tokens_per_s']:.0f} real tok/s, {result['step_time_s']:.2f} s/step, "
        f"peak {memory.peak / 2**20:.0f} MiB, MFU {fmt_mfu(result['mfu'])}, final loss {result['final_loss']}")
    return result


def _train(v: Variant, s: BenchSettings, model_dir: str, run_dir: Path, total: int, env: dict, profiled: bool):
    """Build the variant's trainer inside the memory meter and train; the trainer dies with this frame.

    A profiled variant trains one step more, under torch.profiler, after the measured ones (and
    after its peak memory is read), so the profiler's overhead touches no measurement.
    """
    from transformers.trainer_callback import PrinterCallback

    with PeakMemory(env["device_type"], env.get("rss_baseline")) as memory:
        build = pipeline_trainer if v.recipe == "pipeline" else trl_trainer
        trainer = build(v, s, model_dir, run_dir, total + profiled, env)
        trainer.remove_callback(PrinterCallback)  # the trainer's own per-log dicts; StepClock prints instead
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter  # read when train() builds the dataloader
        clock = StepClock(v.name, total, s.warmup, s.progress, counter)
        trainer.add_callback(clock)
        profiler = ProfileLastStep(total, memory) if profiled else None
        if profiler:
            trainer.add_callback(profiler)
        trainer.train()
        flops_model = flops_per_document(trainer.model)
    if len(clock.step_times) != total + profiled or len(counter.batches) < total:
        raise RuntimeError(f"{v.name}: expected {total} steps, timed {len(clock.step_times)}, "
                           f"collated {len(counter.batches)} batches")
    return clock, counter, memory, flops_model, profiler.summary() if profiler else None


def summarize(steps: list[dict], peak_flops: float | None) -> dict[str, Any]:
    """Throughput, step time, pad share, MFU and final loss over the measured steps."""
    measured = [st for st in steps if not st["warmup"]]
    seconds = sum(st["time_s"] for st in measured)
    cpu_seconds = sum(st["cpu_s"] for st in measured)
    real = sum(st["real_tokens"] for st in measured)
    computed = sum(st["computed_tokens"] for st in measured)
    flops = sum(st["flops"] for st in measured)
    return {
        "tokens_per_s": real / seconds,
        "tokens_per_cpu_s": real / cpu_seconds if cpu_seconds > 0 else None,
        "cores_busy": cpu_seconds / seconds,  # ~ the thread count when nothing else competes for the cores
        "step_time_s": seconds / len(measured),
        "real_tokens": real,
        "pad_share": 1 - real / computed,
        "model_flops_per_s": flops / seconds,
        "mfu": flops / seconds / peak_flops if peak_flops else None,
        "final_loss": steps[-1]["loss"],
    }


def pipeline_trainer(v: Variant, s: BenchSettings, model_dir: str, run_dir: Path, total: int, env: dict):
    """This pipeline's train stage up to trainer.train(): config schema, data stage, model stage, trainer."""
    from transformers import set_seed

    from peft_pipeline.config import config_from_dict
    from peft_pipeline.data.build import build_datasets
    from peft_pipeline.data.template import ensure_chat_template, load_tokenizer
    from peft_pipeline.model.adapter import attach_adapter
    from peft_pipeline.model.load import load_base
    from peft_pipeline.paths import resolve_model_path
    from peft_pipeline.train.loop import add_callbacks
    from peft_pipeline.train.sft import make_sft_config, make_trainer

    training = {"per_device_train_batch_size": s.batch_size, "max_steps": total, "max_length": s.max_length,
                **BENCH_ARGS, **v.training}
    cfg = config_from_dict({
        "model": {"name": model_dir, **v.model},
        "quantization": {"mode": "4bit" if v.quantize else "none"},
        "data": {"train": [data_source(s, v.data)]},
        "training": training,
        "output_dir": str(run_dir),
    }, source=f"bench variant {v.name}")
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    ensure_chat_template(tokenizer, cfg.model.chat_template)
    train_ds, _, _ = build_datasets(cfg.data, tokenizer, cfg.max_length, cfg.seed, progress=False)
    base = load_base(cfg.model, cfg.quantization, path)
    args = make_sft_config(cfg, base.dtype, base)
    set_seed(cfg.seed)
    model = attach_adapter(base, cfg.lora, v.quantize, args.gradient_checkpointing)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(args, model, tokenizer, train_ds, None)
    add_callbacks(trainer, run_dir, None)
    return trainer


def trl_trainer(v: Variant, s: BenchSettings, model_dir: str, run_dir: Path, total: int, env: dict):
    """What a user writes from TRL's docs: a model path, LoraConfig as peft_config, SFTConfig with TRL's defaults.

    Only batch size, steps, max_length, learning rate, seed and logging are set (the same for every
    variant), plus the LoRA settings of this pipeline's defaults, so only the way of training differs.
    """
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from peft_pipeline.config import LoraSection

    extra: dict[str, Any] = dict(v.training)
    if env["device_type"] == "cpu":
        extra["use_cpu"] = True  # TRL's bf16=True default refuses a CPU without it, and its error says to set it
    if v.pipeline_precision:
        extra.update({"bf16": False} if env["device_type"] == "cpu" else {"model_init_kwargs": {"dtype": env["dtype"]}})
    args = SFTConfig(**{"output_dir": str(run_dir), "per_device_train_batch_size": s.batch_size, "max_steps": total,
                        "max_length": s.max_length, **BENCH_ARGS, **extra})
    lora = LoraSection()
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")
    dataset = trl_dataset(s, v.data, model_dir)
    return SFTTrainer(model=model_dir, args=args, train_dataset=dataset, peft_config=peft_config)


def trl_dataset(s: BenchSettings, name: str, model_dir: str):
    """The rows the pipeline trains on, as TRL's conversational prompt/completion, for TRL to tokenize.

    The pipeline drops rows longer than max_length (data.overlong: drop) where TRL would cut them;
    they are left out here too, so that both see the same rows, hence the same batches.
    """
    from datasets import Dataset

    from peft_pipeline.config import DataSource, ModelSection
    from peft_pipeline.data.build import DataReport, load_examples
    from peft_pipeline.data.template import ensure_chat_template, render, tokenize
    from peft_pipeline.data.template import load_tokenizer

    tokenizer = load_tokenizer(model_dir, ModelSection(name=model_dir))
    ensure_chat_template(tokenizer, None)
    examples = load_examples([DataSource(**data_source(s, name))], None, 42, DataReport())
    kept = [ex for ex in examples if len(tokenize(render(ex, tokenizer), tokenizer)[0]) <= s.max_length]
    return Dataset.from_list([{"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]} for ex in kept])


def data_source(s: BenchSettings, name: str) -> dict[str, Any]:
    """The data.train source of a variant's data set."""
    source: dict[str, Any] = {"path": s.data[name]}
    if s.max_samples:
        source["max_samples"] = s.max_samples
    return source


# --------------------------------------------------------------------------- measuring


class CountingCollator:
    """Wraps the trainer's collator: per batch, each row's real length and the tokens the model runs on."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[list[int], int]] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.batches.append(([len(e["input_ids"]) for e in examples], int(batch["input_ids"].numel())))
        return batch


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class StepClock(_callback_base()):
    """Wall time of every optimizer step (end to end) and its logged loss; prints progress."""

    def __init__(self, name: str, total: int, warmup: int, progress: bool, counter: CountingCollator):
        self.name, self.total, self.warmup, self.progress, self.counter = name, total, warmup, progress, counter
        self.step_times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds (all threads): steadier than wall time on a shared CPU
        self.losses: dict[int, float] = {}
        self.last = self.last_cpu = 0.0

    def _now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: time it finished, not when it was queued
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last, self.last_cpu = self._now(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now, cpu = self._now(), time.process_time()
        self.step_times.append(now - self.last)
        self.cpu_times.append(cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            step = state.global_step
            self.losses[step] = float(logs["loss"])
            if self.progress and step <= len(self.step_times):
                tag = "warm-up" if step <= self.warmup else "measured" if step <= self.total else "profiled"
                lengths, computed = self.counter.batches[step - 1]
                where = f"step {step}/{self.total}" if step <= self.total else "extra step"
                say(f"{self.name}: {where} ({tag}) {self.step_times[step - 1]:.2f} s, "
                    f"{sum(lengths)} real / {computed} tokens, loss {logs['loss']:.4f}")


class ProfileLastStep(_callback_base()):
    """torch.profiler over the step after `after`: where the time goes, by kind of operation."""

    KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "bitsandbytes")),
             ("attention", ("scaled_dot_product", "flash", "attention")),
             ("optimizer", ("adam", "foreach")))

    def __init__(self, after: int, memory: PeakMemory):
        self.after, self.memory, self.prof = after, memory, None

    def on_step_end(self, args, state, control, **kwargs):
        import torch
        from torch.profiler import ProfilerActivity, profile

        if state.global_step == self.after:
            self.memory.freeze()  # the measured steps' peak, before the profiled step
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.start()
        elif state.global_step == self.after + 1 and self.prof is not None:
            self.prof.stop()

    def summary(self) -> dict[str, Any]:
        """Self time (device time on a GPU) per kind of operation and the top operations, in seconds."""
        import torch

        attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        events = [(e.key, getattr(e, attr) / 1e6, e.count) for e in self.prof.key_averages()]
        events = [e for e in events if e[1] > 0]
        by_kind = {kind: 0.0 for kind, _ in self.KINDS} | {"other": 0.0}
        for name, seconds, _ in events:
            kind = next((k for k, keys in self.KINDS if any(key in name.lower() for key in keys)), "other")
            by_kind[kind] += seconds
        top = sorted(events, key=lambda e: -e[1])[:12]
        return {"clock": attr, "seconds_by_kind": by_kind, "top_ops": [list(e) for e in top]}


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, sampled RSS above a baseline on a CPU.

    The CPU baseline is the RSS before the first variant (after imports), not this variant's start:
    measured from its own start, a variant that fits in heap pages an earlier variant left mapped
    never raises the RSS and read 0 (seen in CI), although it held its model and activations.
    """

    def __init__(self, device_type: str, baseline: int | None = None):
        self.kind = ("cuda max_memory_allocated" if device_type == "cuda"
                     else "peak RSS above the RSS before the first variant")
        self.device_type = device_type
        self.baseline = baseline
        self.peak = 0
        self._stop = None

    def __enter__(self):
        import threading

        if self.device_type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return self
        self.start = rss_bytes() if self.baseline is None else self.baseline
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes() - self.start)

    def freeze(self) -> None:
        """Stop measuring here: the peak so far is the result."""
        if self.device_type == "cuda":
            import torch

            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes() - self.start)
        self.frozen = True

    def __exit__(self, *exc):
        if not getattr(self, "frozen", False):
            self.freeze()
        return False


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Free what the last variant left: Python garbage, the CUDA cache, and freed heap pages (glibc)."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # so the next variant's RSS baseline starts low
    except (OSError, AttributeError):
        pass


def flops_per_document(model):
    """n -> training FLOPs of one document of n tokens, n x (4N + 6 N_lora + 6 L d_attn n) (flops.py)."""
    from peft_pipeline.config import LoraSection
    from peft_pipeline.tools.flops import count_lora_params, count_matmul_params, lora_flops_per_token

    config = getattr(model, "config", None) or model.get_base_model().config
    counts = count_matmul_params(config)
    lora = LoraSection()
    n_lora = count_lora_params(config, lora.r, lora.target_modules)
    return lambda n: n * lora_flops_per_token(counts["N"], n_lora, counts["L"], counts["d_attn"], n)


# --------------------------------------------------------------------------- environment


def check_settings(s: BenchSettings) -> None:
    """Usage errors, before anything loads."""
    unknown = [v for v in s.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})", exit_code=2)
    not_run = [v for v in s.profile if v not in s.variants]
    if not_run:
        raise UserError(f"--profile: {', '.join(not_run)} not among the variants that run", exit_code=2)
    if s.model_config is not None and s.model_config not in MODEL_CONFIGS:
        raise UserError(f"--model-config: unknown {s.model_config} (known: {', '.join(MODEL_CONFIGS)})", exit_code=2)
    if s.steps < 1 or s.short_steps < 1 or s.warmup < 0 or s.batch_size < 1:
        raise UserError("--steps, --short-steps and --batch-size must be at least 1, --warmup at least 0", exit_code=2)
    for name in {VARIANTS[v].data for v in s.variants}:
        if not Path(s.data[name]).is_file():
            raise UserError(f"{s.data[name]}: data file not found (run from the repository root)", exit_code=2)


def environment(s: BenchSettings) -> dict[str, Any]:
    """Device, dtype, versions, date, load and the peak FLOP/s that MFU is measured against."""
    import datetime
    import platform

    import torch

    from peft_pipeline.model.load import resolve_dtype
    from peft_pipeline.rundir import package_versions

    cuda = torch.cuda.is_available()
    if cuda:
        name = torch.cuda.get_device_name(0)
        device = f"GPU: {name}"
        peak = s.peak_flops or next((p for key, p in GPU_PEAKS if key in name), None)
        label = f"{peak / 1e12:.0f} TFLOP/s dense bf16 ({name})" if peak else "n/a (unknown GPU; pass --peak-tflops)"
    else:
        device = f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        peak = s.peak_flops or measured_cpu_peak()
        label = (f"{peak / 1e9:.1f} GFLOP/s, measured: fp32 2048x2048 matmul, best of 5, in this process"
                 if not s.peak_flops else f"{peak / 1e9:.1f} GFLOP/s (--peak-tflops)")
    if s.peak_flops and cuda:
        label = f"{peak / 1e12:.0f} TFLOP/s (--peak-tflops)"
    return {
        "device": device, "device_type": "cuda" if cuda else "cpu", "peak_flops": peak, "peak_label": label,
        "dtype": str(resolve_dtype("auto")).removeprefix("torch."),
        "versions": package_versions(), "python_platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_average(),
    }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or platform)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measured_cpu_peak() -> float:
    """FLOP/s of a 2048x2048 fp32 matmul, best of 5: what this CPU does at best right now."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    return 2 * 2048**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_average() -> str:
    """1, 5 and 15-minute load averages (other processes share the CPU)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def prepare_model(s: BenchSettings, work: Path) -> str:
    """The model directory every variant loads: the given model, or a random-weight architecture."""
    from peft_pipeline.config import ModelSection
    from peft_pipeline.paths import resolve_model_path

    if s.model_config is None:
        return resolve_model_path(ModelSection(name=s.model))
    return str(random_model_dir(s.model_config, work / f"random-{s.model_config}"))


def model_config(name: str, **token_ids):
    """The transformers config of MODEL_CONFIGS[name]."""
    from transformers import LlamaConfig, Qwen2Config

    fields = dict(MODEL_CONFIGS[name])
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[fields.pop("model_type")]
    return config_class(**fields, **token_ids)


def random_model_dir(name: str, target: Path) -> Path:
    """Save MODEL_CONFIGS[name] with random weights (built on the GPU when there is one) and SmolLM2's tokenizer.

    Token counts are therefore SmolLM2's; the architecture, hence FLOPs per token, is the real one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from peft_pipeline.config import ModelSection
    from peft_pipeline.data.template import load_tokenizer
    from peft_pipeline.model.load import resolve_dtype
    from peft_pipeline.paths import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(ModelSection()), ModelSection())
    config = model_config(name, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    say(f"building {name} with random weights in {target}")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype("auto"))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    release_memory()
    return target


# --------------------------------------------------------------------------- report


BEGIN = "<!-- bench:begin: generated by `peft-pipeline bench`; text outside these markers is kept -->"
END = "<!-- bench:end -->"


def write_report(s: BenchSettings, env: dict, results: list[dict]) -> tuple[Path, Path]:
    """JSON next to --out; the Markdown table between the markers of --out (the rest of the file is kept)."""
    from peft_pipeline.paths import write_json_atomic

    out = Path(s.out)
    json_path = out.with_suffix(".json")
    comparisons = compare(results)
    write_json_atomic(json_path, {"environment": env, "settings": settings_dict(s), "results": results,
                                  "comparisons": comparisons})
    block = "\n".join([BEGIN, *markdown(s, env, results, comparisons), END])
    text = out.read_text() if out.is_file() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return json_path, out


def settings_dict(s: BenchSettings) -> dict[str, Any]:
    """The settings as plain JSON."""
    from dataclasses import asdict

    return {**asdict(s), "out": str(s.out)}


def compare(results: list[dict]) -> list[dict[str, Any]]:
    """The COMPARISONS both of whose variants ran: tokens/s ratio over common steps, loss and memory."""
    by_name = {r["variant"]: r for r in results}
    rows = []
    for label, fast, slow, target in COMPARISONS:
        if fast not in by_name or slow not in by_name:
            continue
        a, b = by_name[fast], by_name[slow]
        k = min(a["measured_steps"], b["measured_steps"])
        rows.append({
            "comparison": label, "variant": fast, "against": slow, "common_steps": k,
            "speedup": common_rate(a, k) / common_rate(b, k),
            "speedup_cpu_time": common_rate(a, k, "cpu_s") / common_rate(b, k, "cpu_s"),
            "loss_diff": (a["final_loss"] - b["final_loss"]) if k == a["measured_steps"] == b["measured_steps"]
            and a["final_loss"] is not None and b["final_loss"] is not None else None,
            "memory_ratio": a["peak_memory_bytes"] / b["peak_memory_bytes"] if b["peak_memory_bytes"] else None,
            "target": target,
        })
    return rows


def common_rate(result: dict, k: int, clock: str = "time_s") -> float:
    """Real tokens per second (wall, or process CPU with clock="cpu_s") over the first k measured steps."""
    steps = [st for st in result["steps"] if not st["warmup"]][:k]
    return sum(st["real_tokens"] for st in steps) / max(sum(st[clock] for st in steps), 1e-9)


# Over 50 lines by choice: the report's text, top to bottom as it reads.
def markdown(s: BenchSettings, env: dict, results: list[dict], comparisons: list[dict]) -> list[str]:
    """The generated section: how it was run, one row per variant, the comparisons."""
    v = env["versions"]
    model = f"{s.model_config} (random weights)" if s.model_config else s.model
    lines = [
        f"**Run** {env['date']} on {env['device']}; load average (1/5/15 min) {env['load_before']} before, "
        f"{env.get('load_after', 'n/a')} after.",
        f"torch {v.get('torch')}, transformers {v.get('transformers')}, trl {v.get('trl')}, peft {v.get('peft')}, "
        f"bitsandbytes {v.get('bitsandbytes')}, python {v.get('python')}.",
        "",
        f"**Command** `{s.command or 'peft-pipeline bench'}`",
        "",
        f"**Settings** model {model}; batch {s.batch_size} rows; max_length {s.max_length}; "
        f"{s.warmup} warm-up + {s.steps} measured steps ({s.short_steps} for the variants slow on CPU); "
        f"LoRA r16 alpha32 all-linear; lr 2e-4; rows per file: {s.max_samples or 'all'}.",
        f"**MFU** model FLOPs of real tokens, n(4N + 6 N_lora + 6 L d_attn n) per document of n tokens "
        f"(flops.py \"ours\"), against {env['peak_label']}. **Memory** {results[0]['memory_kind'] if results else ''}.",
        "",
        "| variant | what it is | data | measured steps | real tokens | real tok/s | step time (s) | "
        "pad share | peak memory (MiB) | MFU | final loss | cores busy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['what']} | {r['data']} | {r['measured_steps']} | {r['real_tokens']} | "
                     f"{r['tokens_per_s']:.1f} | {r['step_time_s']:.2f} | {r['pad_share']:.0%} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {fmt_mfu(r['mfu'])} | {loss} | {r['cores_busy']:.2f} |")
    if comparisons:
        lines += ["", "Ratios are over the measured steps both variants ran (the same batches). The CPU-time "
                      "ratio divides by this process's CPU seconds instead of wall time. Cores busy = CPU seconds "
                      "/ wall seconds: about the thread count when the cores are free; much less means other "
                      "processes took them and that variant's numbers are suspect.", "",
                  "| comparison | real tok/s ratio | CPU-time ratio | over steps | target | final loss difference | "
                  "peak memory ratio |", "|---|---:|---:|---:|---|---:|---:|"]
        for c in comparisons:
            target = "" if c["target"] is None else (
                f">= {c['target']}x: {'met' if c['speedup'] >= c['target'] else 'missed'}")
            diff = "n/a" if c["loss_diff"] is None else f"{c['loss_diff']:+.4f}"
            mem = "n/a" if c["memory_ratio"] is None else f"{c['memory_ratio']:.2f}"
            lines.append(f"| {c['comparison']} ({c['variant']} / {c['against']}) | {c['speedup']:.2f}x | "
                         f"{c['speedup_cpu_time']:.2f}x | {c['common_steps']} | {target} | {diff} | {mem} |")
    profiled = [r for r in results if r.get("profile")]
    if profiled:
        lines += ["", "Where the time goes: one extra step after the measured ones, under torch.profiler "
                      "(self time per kind of operation, seconds; the same batch for every profiled variant).", "",
                  "| variant | matmul | attention | optimizer | other | top operations |", "|---|---:|---:|---:|---:|---|"]
        for r in profiled:
            k = r["profile"]["seconds_by_kind"]
            top = ", ".join(f"{name} {sec:.1f}" for name, sec, _ in r["profile"]["top_ops"][:5])
            lines.append(f"| {r['variant']} | {k['matmul']:.1f} | {k['attention']:.1f} | {k['optimizer']:.1f} | "
                         f"{k['other']:.1f} | {top} |")
    return lines


def fmt_mfu(value: float | None) -> str:
    """MFU as a percentage, or n/a when no peak is known."""
    return "n/a" if value is None else f"{value:.1%}"


def say(*lines: str) -> None:
    """console.say under this stage's own prefix."""
    _say_prefixed(*lines, prefix="[bench]")
