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
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for the console script and `python -m peft_pipeline`."""
    from peft_pipeline.errors import UserError

    parser = _parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    try:
        return int(_dispatch(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
        run = train(cfg, overwrite=args.overwrite, resume=args.resume, progress=progress)
        print(f"[peft-pipeline] run complete: {run}")
        return 0
    raise AssertionError(f"unhandled verb {args.verb}")
