"""Command line: a table of verbs, each parsed by its own arguments and handed to one stage function.

No logic lives here, and nothing heavy is imported at start-up: `peft-pipeline --help` must
answer without importing torch. Which stage serves a verb on a run dir is tasks.py's choice.
Exit codes: 0 ok, 1 failure, 2 usage or config error (errors.UserError carries it).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple


class Verb(NamedTuple):
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


# --------------------------------------------------------------------------- what each verb does


def _validate(a) -> int:
    from peft_pipeline.config import load_config
    from peft_pipeline.tasks import method_for
    from peft_pipeline.train.loop import check

    cfg = load_config(a.config, a.overrides)
    check(cfg, method_for(cfg), progress=_progress(a))  # every check train makes before weights load
    print(cfg.to_yaml(), end="")
    return 0


def _train(a) -> int:
    from peft_pipeline.config import load_config
    from peft_pipeline.tasks import method_for
    from peft_pipeline.train.loop import train

    cfg = load_config(a.config, a.overrides)
    train(cfg, method_for(cfg), overwrite=a.overwrite, resume=a.resume, progress=_progress(a))
    return 0


def _eval(a) -> int:
    from peft_pipeline.evaluate.generate import Sampling
    from peft_pipeline.report import refresh_report
    from peft_pipeline.tasks import stage

    if a.adapter_scale is not None:
        return _scale_scan(a)
    stage("eval", a.run)(a.run, data=a.data, prompts=a.prompts, compare_base=a.compare_base,
                         sampling=Sampling(max_new_tokens=a.max_new_tokens), batch_size=a.batch_size, limit=a.limit,
                         progress=_progress(a), retention=a.retention, pairs=a.pairs,
                         harness=a.harness.split(",") if a.harness else None, harness_include=a.harness_include)
    refresh_report(a.run)
    return 0


def _scale_scan(a) -> int:
    from peft_pipeline.errors import UserError
    from peft_pipeline.evaluate.scales import parse_scales, scan
    from peft_pipeline.rundir import resolve
    from peft_pipeline.tasks import is_classification

    scales = parse_scales(a.adapter_scale)
    others = [flag for flag, on in (("--data", a.data), ("--compare-base", a.compare_base), ("--pairs", a.pairs),
                                    ("--harness", a.harness)) if on]
    if others:
        raise UserError(f"--adapter-scale runs its own scan (test prompts and retention at each scale); leave out "
                        f"{', '.join(others)} or run them as a separate eval", exit_code=2)
    target = resolve(a.run)
    if is_classification(target):
        raise UserError(f"{target.path}: a classification run; --adapter-scale scores generations; run eval without it",
                        exit_code=2)
    scan(a.run, scales, prompts=a.prompts, retention=a.retention, max_new_tokens=a.max_new_tokens,
         batch_size=a.batch_size, limit=a.limit, progress=_progress(a))
    return 0


def _generate(a) -> int:
    from peft_pipeline.tasks import stage

    return stage("generate", a.run)(a.run, a.prompt, a.prompts, _sampling(a), base=a.base, out=a.out,
                                    batch_size=a.batch_size, progress=_progress(a))


def _chat(a) -> int:
    from peft_pipeline.tasks import stage

    return stage("chat", a.run)(a.run, _sampling(a), base=a.base, system=a.system)


def _merge(a) -> int:
    from peft_pipeline.tasks import stage

    stage("merge", a.run)(a.run, out=a.out, dtype=a.dtype)
    return 0


def _export(a) -> int:
    from peft_pipeline.export.llamacpp import parse_quants
    from peft_pipeline.tasks import stage

    if a.format == "gguf":
        parse_quants(a.quant)  # an unknown type is a usage error before the run is even read

    stage("export", a.run, a.format)(a.run, fmt=a.format, quant=a.quant, out=a.out, push_to_hub=a.push_to_hub,
                                      score=not a.no_score)
    return 0


def _summary(a) -> int:
    from peft_pipeline.report import summary

    print(summary(a.run))
    return 0


def _inspect(a) -> int:
    from peft_pipeline.config import load_config
    from peft_pipeline.data.inspect import inspect

    return inspect(load_config(a.config, a.overrides), n=a.n, plain=a.plain, png=a.png, progress=_progress(a))


def _report(a) -> int:
    from peft_pipeline.report import write_report

    print(write_report(a.run))
    return 0


def _env(a) -> int:
    from peft_pipeline.report import env_lines

    print("\n".join(env_lines()))
    return 0


def _bench(a) -> int:
    from peft_pipeline.tools.bench import bench, settings_from_args

    bench(settings_from_args(a, progress=_progress(a)))
    return 0


def _prepare(a) -> int:
    from peft_pipeline.config import load_config
    from peft_pipeline.data.prepare import prepare

    print("\n".join(prepare(load_config(a.config, a.overrides), progress=_progress(a))))
    return 0


def _bench_data(a) -> int:
    from pathlib import Path

    from peft_pipeline.tools.bench_data import bench_data

    bench_data([int(x) for x in a.sizes.split(",")], [int(x) for x in a.procs.split(",")], a.per_row_max,
               Path(a.out), Path(a.folder).expanduser(), a.max_length, progress=_progress(a))
    return 0


def _sweep(a) -> int:
    from peft_pipeline.tools.sweep import sweep

    sweep(a.config, a.sweep, a.overrides, parallel=a.parallel, worker=a.worker, progress=_progress(a))
    return 0


def _progress(a) -> bool:
    """Progress bars unless --no-progress or PEFT_PIPELINE_NO_PROGRESS=1."""
    return not getattr(a, "no_progress", False) and os.environ.get("PEFT_PIPELINE_NO_PROGRESS") != "1"


def _sampling(a):
    from peft_pipeline.evaluate.generate import Sampling

    return Sampling(a.max_new_tokens, a.temperature, a.top_p, a.seed)


# --------------------------------------------------------------------------- their arguments


def _config_args(p, overrides_help: str | None = None) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=overrides_help)


def _no_progress(p, text: str = "no progress bars") -> None:
    p.add_argument("--no-progress", action="store_true", help=text)


def _train_args(p) -> None:
    _config_args(p, "override config values, e.g. training.max_steps=5")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in the run dir (or the one given)")
    _no_progress(p, "no progress bars (logs)")


def _validate_args(p) -> None:
    _config_args(p)
    _no_progress(p)


def _eval_args(p) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="run directory (output_dir of train), an adapter dir or a merged model dir")
    p.add_argument("--data", metavar="FILE", help="compute the loss on this file instead of the run's eval split")
    p.add_argument("--prompts", metavar="FILE", help="prompts with expected answers (default: the run's data.test)")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base (adapter off); side-by-side table")
    p.add_argument("--retention", nargs="?", const="auto", metavar="FILE",
                   help="forgetting check: base vs adapter on general prompts (FILE, default the run's data.retention "
                        "or the bundled set); reports retained / lost")
    p.add_argument("--pairs", metavar="FILE", help="held-out preference pairs (prompt/chosen/rejected): accuracy and "
                                                   "margin of chosen over rejected (default: a DPO/ORPO/CPO/KTO run's eval pairs)")
    p.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks (comma-separated), base and adapter "
                                                      "side by side; writes harness.json (needs the [harness] extra)")
    p.add_argument("--harness-include", metavar="DIR", help="a directory of your own harness task YAML files")
    p.add_argument("--adapter-scale", metavar="S,S,...", help="scan: test exact match and retention with the adapter's "
                   "update scaled by each S in (0, 1] (e.g. 1,0.9,0.8); writes adapter-scales.json; see lora.final_scale")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (default 128)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="examples per forward/generate batch (default 8)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N examples and prompts (and harness documents)")
    _no_progress(p)


def _sampling_args(p) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="run directory, adapter dir or merged model dir")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default 0)")
    p.add_argument("--base", action="store_true", help="the base model without the adapter")


def _generate_args(p) -> None:
    _sampling_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message (rendered with the run's chat template)")
    src.add_argument("--prompts", metavar="FILE", help="JSONL/JSON/CSV rows in any training format; answers optional")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per generate batch (default 8)")
    p.add_argument("--out", metavar="FILE", help="also write one JSON record per completion to FILE (JSONL)")
    _no_progress(p)


def _chat_args(p) -> None:
    _sampling_args(p)
    p.add_argument("--system", metavar="TEXT", help="system message (default: the run's data.system_prompt)")


def _merge_args(p) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="run directory (output_dir of train) or an adapter dir")
    p.add_argument("--out", metavar="DIR", help="where the merged model goes (default RUN_DIR/merged)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of the saved weights (checks always run in fp32); auto = the base checkpoint's dtype")


def _export_args(p) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="run directory (after merge) or a merged model dir")
    p.add_argument("--format", choices=["gguf", "adapter"], default="gguf", help="gguf (llama.cpp family) or adapter")
    p.add_argument("--quant", default="f16", metavar="TYPES",
                   help="comma list of GGUF types: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m (default f16)")
    p.add_argument("--out", metavar="DIR", help="output dir (gguf files, or the adapter); default RUN_DIR/export/")
    p.add_argument("--push-to-hub", metavar="REPO", help="with --format adapter: upload to this hub repo (needs login)")
    p.add_argument("--no-score", action="store_true", help="skip scoring the GGUF on the run's test prompts")


def _run_arg(p) -> None:
    p.add_argument("run", metavar="RUN_DIR")


def _inspect_args(p) -> None:
    _config_args(p)
    p.add_argument("--n", type=int, default=3, metavar="N", help="training examples to show (default 3)")
    p.add_argument("--plain", action="store_true", help="mark trained tokens as [[...]] instead of colour (for logs)")
    p.add_argument("--png", metavar="PATH", help="also save a token-length histogram (a .png file or a directory)")
    _no_progress(p)


def _bench_args(p) -> None:
    p.add_argument("--out", default="docs/benchmarks.md", metavar="FILE", help="Markdown report; JSON goes next to it")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model dir (default: the embedded base)")
    p.add_argument("--model-config", metavar="NAME", help="random weights of llama-3.2-1b, qwen2.5-1.5b, llama-3.1-8b or smollm2-135m")
    p.add_argument("--variants", metavar="A,B", help="comma-separated subset (default: all)")
    p.add_argument("--steps", type=int, default=8, help="measured steps per variant (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant, not measured (default 2)")
    p.add_argument("--short-steps", type=int, default=2, help="measured steps of the variants slow on CPU (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--max-length", type=int, default=2048, help="longest row in tokens (default 2048)")
    p.add_argument("--max-samples", type=int, metavar="N", help="rows read from each data file (default all)")
    p.add_argument("--peak-tflops", type=float, metavar="T", help="peak for MFU (default: by GPU name, measured on CPU)")
    p.add_argument("--profile", metavar="A,B", help="these variants train one more step under torch.profiler")
    _no_progress(p, "no per-step lines")


def _prepare_args(p) -> None:
    _config_args(p)
    _no_progress(p)


def _bench_data_args(p) -> None:
    p.add_argument("--sizes", default="30000,300000,3000000", metavar="N,M", help="rows per generated file")
    p.add_argument("--procs", default="1,2", metavar="A,B", help="data.num_proc values to run (default 1,2)")
    p.add_argument("--per-row-max", type=int, default=300_000, metavar="N",
                   help="also time the per-row path (before the Arrow build) up to this many rows (default 300000)")
    p.add_argument("--max-length", type=int, default=2048, help="training.max_length (default 2048)")
    p.add_argument("--out", default="docs/data-scale.md", metavar="FILE", help="Markdown report; JSON goes next to it")
    p.add_argument("--folder", default="~/.cache/peft-pipeline/bench-data", metavar="DIR",
                   help="where the generated files (and the caches, removed after each run) go")
    _no_progress(p, "no per-run lines")


def _sweep_args(p) -> None:
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file: method, metric, trials, params (see configs/sweeps/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values in every trial")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="N worker processes, one GPU each (default 1)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set in the processes --parallel starts
    _no_progress(p)


VERBS: dict[str, Verb] = {
    "train": Verb("train an adapter from a YAML config", _train_args, _train),
    "validate": Verb("check a config, its data and its model names without loading weights", _validate_args, _validate),
    "eval": Verb("validation loss/perplexity and generation metrics, optionally against the base", _eval_args, _eval),
    "generate": Verb("complete one prompt or a file of prompts with the fine-tuned model", _generate_args, _generate),
    "chat": Verb("interactive multi-turn chat in the terminal (/reset, /exit)", _chat_args, _chat),
    "merge": Verb("merge a run's adapter into the full-precision base, verify it, save a plain model", _merge_args, _merge),
    "export": Verb("GGUF files via llama.cpp (from the merged model, checked in llama.cpp) or the adapter with a model card",
                   _export_args, _export),
    "summary": Verb("what a run dir holds: scores before/after, merge and export checks, paths", _run_arg, _summary),
    "inspect": Verb("the data as training will see it: counts, lengths, trained tokens, warnings", _inspect_args, _inspect,
                    "Exit code 0 when clean, 1 when there are warnings, 2 for config errors."),
    "report": Verb("(re)write RUN_DIR/report.md with loss and learning-rate plots and eval tables", _run_arg, _report),
    "env": Verb("versions, devices, CUDA and bitsandbytes backend, for bug reports", lambda p: None, _env),
    "prepare": Verb("build the tokenized data cache of a config without loading the model (e.g. on a CPU node)",
                    _prepare_args, _prepare),
    "bench-data": Verb("time data preparation (rows/s, peak memory) at growing sizes and process counts",
                       _bench_data_args, _bench_data),
    "bench": Verb("time training variants (defaults, plain TRL, ablations, QLoRA); write a Markdown table", _bench_args, _bench),
    "sweep": Verb("hyperparameter search (grid, random, TPE): real runs, pruning, results, best.yaml", _sweep_args, _sweep,
                  "Each trial is a training run in SWEEP_DIR/trial-NNN; re-run the same command to continue an "
                  "interrupted sweep. See configs/sweeps/."),
}


# --------------------------------------------------------------------------- entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-pipeline",
        description="LoRA/QLoRA fine-tuning: YAML config in; adapter, verified merge and GGUF out.",
        epilog="Under several GPUs: accelerate launch [--config_file launch/X.yaml] -m peft_pipeline train CONFIG.yaml",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for name, verb in VERBS.items():
        verb.arguments(sub.add_parser(name, help=verb.help, description=verb.description))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for the console script and `python -m peft_pipeline`."""
    from peft_pipeline.errors import UserError

    parser = _parser()
    args = _parse(parser, argv)
    if not args.verb:
        parser.print_help()
        return 2
    try:
        return int(VERBS[args.verb].run(args) or 0)
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _end_process_group()


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """parse_args, letting key=value overrides come after options (`train c.yaml --resume a.b=1`).

    argparse binds a nargs="*" positional once, before later options, and `--resume` (optional
    value) would swallow the override that follows it as a checkpoint path.
    """
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "overrides", None) is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and "=" in resume and not os.path.exists(resume):
        args.overrides.append(resume)
        args.resume = True
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides += extra
    return args


def _end_process_group() -> None:
    """Tear down the process group `accelerate launch` made, before the interpreter exits.

    Left to interpreter shutdown, gloo's threads can be torn down mid-destructor: a rank then aborts
    ("terminate called without an active exception") after its run completed, and the launch fails.
    """
    dist = sys.modules.get("torch.distributed")  # only when something already imported it: no import cost
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _close_progress_bars() -> None:
    """End progress bars a failure left open (the trainer's), so the error starts its own line."""
    tqdm = sys.modules.get("tqdm")  # only when something already imported it: no import cost
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()
