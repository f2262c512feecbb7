"""Command line: parse, dispatch to a stage, turn user errors into one line and an exit code.

No logic lives here, and nothing heavy is imported at start-up: `peft-pipeline --help` must
answer without importing torch. Exit codes: 0 ok, 1 failure, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-pipeline",
        description="LoRA/QLoRA fine-tuning: YAML config in; adapter, verified merge and GGUF out.",
        epilog="Under several GPUs: accelerate launch [--config_file launch/X.yaml] -m peft_pipeline train CONFIG.yaml",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    t = sub.add_parser("train", help="train an adapter from a YAML config")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values, e.g. training.max_steps=5")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in the run dir (or the one given)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")

    v = sub.add_parser("validate", help="check a config (and its overrides) without training")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", metavar="key.sub=value")

    e = sub.add_parser("eval", help="validation loss/perplexity and generation metrics, optionally against the base")
    e.add_argument("run", metavar="RUN_DIR", help="run directory (output_dir of train), an adapter dir or a merged model dir")
    e.add_argument("--data", metavar="FILE", help="compute the loss on this file instead of the run's eval split")
    e.add_argument("--prompts", metavar="FILE", help="prompts with expected answers (default: the run's data.test)")
    e.add_argument("--compare-base", action="store_true", help="also evaluate the base (adapter off); side-by-side table")
    e.add_argument("--retention", nargs="?", const="auto", metavar="FILE",
                   help="forgetting check: base vs adapter on general prompts (FILE, default the run's data.retention "
                        "or the bundled set); reports retained / lost")
    e.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (default 128)")
    e.add_argument("--batch-size", type=int, default=8, metavar="B", help="examples per forward/generate batch (default 8)")
    e.add_argument("--limit", type=int, metavar="N", help="only the first N examples and prompts")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    def sampling_args(q):
        q.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (default 128)")
        q.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); >0 samples")
        q.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass when sampling (default 1.0)")
        q.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default 0)")
        q.add_argument("--base", action="store_true", help="the base model without the adapter")

    g = sub.add_parser("generate", help="complete one prompt or a file of prompts with the fine-tuned model")
    g.add_argument("run", metavar="RUN_DIR", help="run directory, adapter dir or merged model dir")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message (rendered with the run's chat template)")
    src.add_argument("--prompts", metavar="FILE", help="JSONL/JSON/CSV rows in any training format; answers optional")
    sampling_args(g)
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per generate batch (default 8)")
    g.add_argument("--out", metavar="FILE", help="also write one JSON record per completion to FILE (JSONL)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (/reset, /exit)")
    c.add_argument("run", metavar="RUN_DIR", help="run directory, adapter dir or merged model dir")
    sampling_args(c)
    c.add_argument("--system", metavar="TEXT", help="system message (default: the run's data.system_prompt)")

    m = sub.add_parser("merge", help="merge a run's adapter into the full-precision base, verify it, save a plain model")
    m.add_argument("run", metavar="RUN_DIR", help="run directory (output_dir of train) or an adapter dir")
    m.add_argument("--out", metavar="DIR", help="where the merged model goes (default RUN_DIR/merged)")
    m.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of the saved weights (checks always run in fp32); auto = the base checkpoint's dtype")

    x = sub.add_parser("export", help="write a GGUF file (from the merged model, verified) or the adapter with a model card")
    x.add_argument("run", metavar="RUN_DIR", help="run directory (after merge) or a merged model dir")
    x.add_argument("--format", choices=["gguf", "adapter"], default="gguf", help="gguf (llama.cpp family) or adapter")
    x.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="GGUF weight type (default f16)")
    x.add_argument("--out", metavar="PATH", help="output file (gguf) or dir (adapter); default RUN_DIR/export/")
    x.add_argument("--push-to-hub", metavar="REPO", help="with --format adapter: upload to this hub repo (needs login)")
    x.add_argument("--no-score", action="store_true", help="skip scoring the GGUF on the run's test prompts")

    s = sub.add_parser("summary", help="what a run dir holds: scores before/after, merge and export checks, paths")
    s.add_argument("run", metavar="RUN_DIR")

    i = sub.add_parser("inspect", help="the data as training will see it: counts, lengths, trained tokens, warnings",
                       description="Exit code 0 when clean, 1 when there are warnings, 2 for config errors.")
    i.add_argument("config", help="YAML config (see configs/)")
    i.add_argument("overrides", nargs="*", metavar="key.sub=value")
    i.add_argument("--n", type=int, default=3, metavar="N", help="training examples to show (default 3)")
    i.add_argument("--plain", action="store_true", help="mark trained tokens as [[...]] instead of colour (for logs)")
    i.add_argument("--png", metavar="PATH", help="also save a token-length histogram (a .png file or a directory)")
    i.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="(re)write RUN_DIR/report.md with loss and learning-rate plots and eval tables")
    r.add_argument("run", metavar="RUN_DIR")

    sub.add_parser("env", help="versions, devices, CUDA and bitsandbytes backend, for bug reports")

    b = sub.add_parser("bench", help="time training variants (defaults, plain TRL, ablations, QLoRA); write a Markdown table")
    b.add_argument("--out", default="docs/benchmarks.md", metavar="FILE", help="Markdown report; JSON goes next to it")
    b.add_argument("--model", default="smollm2-135m-instruct", help="model dir (default: the embedded base)")
    b.add_argument("--model-config", metavar="NAME", help="random weights of llama-3.2-1b, qwen2.5-1.5b, llama-3.1-8b or smollm2-135m")
    b.add_argument("--variants", metavar="A,B", help="comma-separated subset (default: all)")
    b.add_argument("--steps", type=int, default=8, help="measured steps per variant (default 8)")
    b.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant, not measured (default 2)")
    b.add_argument("--short-steps", type=int, default=2, help="measured steps of the variants slow on CPU (default 2)")
    b.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    b.add_argument("--max-length", type=int, default=2048, help="longest row in tokens (default 2048)")
    b.add_argument("--max-samples", type=int, metavar="N", help="rows read from each data file (default all)")
    b.add_argument("--peak-tflops", type=float, metavar="T", help="peak for MFU (default: by GPU name, measured on CPU)")
    b.add_argument("--profile", metavar="A,B", help="these variants train one more step under torch.profiler")
    b.add_argument("--no-progress", action="store_true", help="no per-step lines")

    w = sub.add_parser("sweep", help="hyperparameter search (grid, random, TPE): real runs, pruning, results, best.yaml",
                       description="Each trial is a training run in SWEEP_DIR/trial-NNN; re-run the same command to "
                                   "continue an interrupted sweep. See configs/sweeps/.")
    w.add_argument("config", help="YAML run config (see configs/)")
    w.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file: method, metric, trials, params (see configs/sweeps/)")
    w.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values in every trial")
    w.add_argument("--parallel", type=int, default=1, metavar="N", help="N worker processes, one GPU each (default 1)")
    w.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set in the processes --parallel starts
    w.add_argument("--no-progress", action="store_true", help="no progress bars")
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
        return int(_dispatch(args) or 0)
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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


def _close_progress_bars() -> None:
    """End progress bars a failure left open (the trainer's), so the error starts its own line."""
    tqdm = sys.modules.get("tqdm")  # only when something already imported it: no import cost
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def _dispatch(args) -> int:
    if args.verb == "validate":
        from peft_pipeline.config import load_config

        cfg = load_config(args.config, args.overrides)
        print(cfg.to_yaml(), end="")
        return 0
    if args.verb == "train":
        from peft_pipeline.config import load_config

        cfg = load_config(args.config, args.overrides)
        from peft_pipeline.train import train

        progress = not args.no_progress and os.environ.get("PEFT_PIPELINE_NO_PROGRESS") != "1"
        train(cfg, overwrite=args.overwrite, resume=args.resume, progress=progress)
        return 0
    if args.verb == "merge":
        from peft_pipeline.merge import merge

        merge(args.run, out=args.out, dtype=args.dtype)
        return 0
    if args.verb == "eval":
        from peft_pipeline.evaluate import evaluate
        from peft_pipeline.generate import Sampling

        evaluate(args.run, data=args.data, prompts=args.prompts, compare_base=args.compare_base,
                 sampling=Sampling(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size,
                 limit=args.limit, progress=_progress(args), retention=args.retention)
        from peft_pipeline.report import refresh_report

        refresh_report(args.run)
        return 0
    if args.verb in ("generate", "chat"):
        from peft_pipeline import generate as gen

        sampling = gen.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        if args.verb == "chat":
            return gen.chat(args.run, sampling, base=args.base, system=args.system)
        return gen.generate_cli(args.run, args.prompt, args.prompts, sampling, base=args.base, out=args.out,
                                batch_size=args.batch_size, progress=_progress(args))
    if args.verb == "export":
        from peft_pipeline.export import export

        export(args.run, fmt=args.format, quant=args.quant, out=args.out, push_to_hub=args.push_to_hub,
               score=not args.no_score)
        return 0
    if args.verb == "summary":
        from peft_pipeline.runs import summary

        print(summary(args.run))
        return 0
    if args.verb == "sweep":
        from peft_pipeline.sweep import sweep

        sweep(args.config, args.sweep, args.overrides, parallel=args.parallel, worker=args.worker,
              progress=_progress(args))
        return 0
    if args.verb == "bench":
        from peft_pipeline.bench import bench, settings_from_args

        bench(settings_from_args(args, progress=_progress(args)))
        return 0
    if args.verb == "inspect":
        from peft_pipeline.config import load_config
        from peft_pipeline.inspect_data import inspect

        cfg = load_config(args.config, args.overrides)
        return inspect(cfg, n=args.n, plain=args.plain, png=args.png, progress=_progress(args))
    if args.verb == "report":
        from peft_pipeline.report import write_report

        print(write_report(args.run))
        return 0
    if args.verb == "env":
        from peft_pipeline.report import env_lines

        print("\n".join(env_lines()))
        return 0
    raise AssertionError(f"unhandled verb {args.verb}")


def _progress(args) -> bool:
    """Progress bars unless --no-progress or PEFT_PIPELINE_NO_PROGRESS=1."""
    return not args.no_progress and os.environ.get("PEFT_PIPELINE_NO_PROGRESS") != "1"
