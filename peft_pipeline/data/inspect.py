"""Inspect stage: the dataset exactly as the trainer will see it, before any weight is loaded.

`peft-pipeline inspect CONFIG` builds the datasets with the same code as `train`
(data.build_datasets with the config's tokenizer and chat template, so a cache written here is
reused by training) and prints:
- rows and examples per source and format, truncation and drop counts;
- a text histogram of tokens per training example (and a PNG with --png);
- N training examples decoded from their token ids, trained tokens highlighted: a green
  background in a terminal, `[[...]]` around them in plain text (--plain, or not a terminal);
- warnings: examples with no trained token, trained spans that do not end with the end-of-turn
  token (the model would never learn to stop), chat templates that drop, reorder or invent turns.
Exit code: 0 clean, 1 when there is a warning (so CI can gate on it), 2 for config errors.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_pipeline.config import RunConfig

OPEN, CLOSE = "[[", "]]"
# Two shades so token boundaries stay visible inside a trained span.
SHADES = ("\x1b[30;42m", "\x1b[30;102m")
RESET = "\x1b[0m"
DIM = "\x1b[2m"
PROBES = {"system": "SYSTEM-PROBE-17", "user": "USER-PROBE-23", "assistant": "ASSISTANT-PROBE-31"}


@dataclass
class Inspection:
    """Everything `inspect` found; printed by `print_inspection`."""

    report: Any  # data.DataReport
    n_train_sources: int
    template: str
    end_of_turn: str
    max_length: int | None
    lengths: list[int]
    trained: list[int]
    examples: list[tuple[list[int], list[int]]]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    augmented: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    """(label, ids, labels) of the shown examples as data.augment varies them in epochs 0 and 1."""


def inspect(cfg: RunConfig, n: int = 3, plain: bool = False, png: str | None = None, progress: bool = True,
            out=None) -> int:
    """Print what training would see for this config; return 0 when clean, 1 when there are warnings."""
    from peft_pipeline.errors import UserError

    if n < 0:
        raise UserError(f"--n: must be 0 or more, got {n}", exit_code=2)
    out = out or sys.stdout
    color = not plain and out.isatty() and "NO_COLOR" not in os.environ
    if cfg.method != "sft":
        return inspect_preference(cfg, n, color, out)
    ins, tokenizer = collect(cfg, n, progress)
    print_inspection(ins, tokenizer, color, out)
    if png:
        path = write_histogram_png(ins.lengths, png, ins.max_length)
        print(f"\ntoken-length histogram written to {path}", file=out)
    return 1 if ins.warnings else 0


def collect(cfg: RunConfig, n: int, progress: bool = False):
    """Build the datasets as `train` does and check them; return (Inspection, tokenizer)."""
    from peft_pipeline.data.build import build_datasets
    from peft_pipeline.data.template import end_of_turn, ensure_chat_template, stop_ids
    from peft_pipeline.data.template import load_tokenizer
    from peft_pipeline.paths import resolve_model_path

    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    template = ensure_chat_template(tokenizer, cfg.model.chat_template)
    eot = end_of_turn(tokenizer)
    warnings, notes = template_checks(tokenizer)
    train_ds, _, report = build_datasets(cfg.data, tokenizer, cfg.max_length, cfg.seed, progress=progress)
    ids, labels = train_ds["input_ids"], train_ds["labels"]
    stops = set(stop_ids(tokenizer))
    warnings += mask_warnings(ids, labels, stops, cfg.data.train_on_prompt, eot, report, cfg.max_length)
    ins = Inspection(
        report=report, n_train_sources=len(cfg.data.train), template=template, end_of_turn=eot,
        max_length=cfg.max_length, lengths=[len(x) for x in ids],
        trained=[sum(label != -100 for label in ls) for ls in labels],
        examples=list(zip(ids[:n], labels[:n])), warnings=warnings, notes=notes,
        augmented=augmented_examples(train_ds, n),
    )
    return ins, tokenizer


def inspect_preference(cfg: RunConfig, n: int, color: bool, out) -> int:
    """Pairs (or rated completions, or prompts) rendered with the chat template, the scored tokens marked.

    The ids are those TRL trains on (data.preference.pair_ids): the prompt unmarked, each completion
    marked, ending in the end-of-turn token. Returns 1 when a completion does not end with a stop token.
    """
    from peft_pipeline.data import preference
    from peft_pipeline.data.template import end_of_turn, ensure_chat_template, load_tokenizer, stop_ids
    from peft_pipeline.paths import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
    template = ensure_chat_template(tokenizer, cfg.model.chat_template)
    data = preference.load(cfg, tokenizer)
    stops = set(stop_ids(tokenizer))
    mark = mark_ansi if color else mark_plain
    for line in [*data.lines(), f"chat template: {template}; end of turn: {end_of_turn(tokenizer)!r}"]:
        print(line, file=out)
    unstopped = 0
    for r in data.train[:n]:
        sides = [(s, r[s]) for s in ("chosen", "rejected", "completion") if s in r]
        if not sides:  # GRPO: the prompt the policy completes, and the reference its rewards compare with
            print(f"\n--- {r['where']} (prompt; reference answer: {r['answer']!r})\n{r['prompt']}", file=out)
            continue
        p, completions = preference.pair_ids(tokenizer, r["prompt"], [text for _, text in sides])
        for (side, _), c in zip(sides, completions):
            label = f"{side}, {'desirable' if r['label'] else 'undesirable'}" if side == "completion" else side
            print(f"\n--- {r['where']} ({label}: {len(c)} scored tokens)", file=out)
            print(mark(p + c, [-100] * len(p) + c, tokenizer), file=out)
            unstopped += not c or c[-1] not in stops
    if unstopped:
        print(f"\nwarning: {unstopped} completions do not end with a stop token; the model would not learn to stop",
              file=out)
    return 1 if unstopped else 0


def augmented_examples(train_ds, n: int, epochs: tuple[int, ...] = (0, 1)) -> list[tuple[str, list[int], list[int]]]:
    """The first n training rows as data.augment serves them in `epochs`, where that differs from the row as written."""
    if not hasattr(train_ds, "variant"):  # augmentation off: a plain Dataset
        return []
    out = []
    originals = train_ds[:n]["input_ids"]  # a slice: the rows as written
    for k, original in enumerate(originals):
        for epoch in epochs:
            v = train_ds.variant(k, epoch)
            if v["input_ids"] != original:
                out.append((f"train example {k}, epoch {epoch}", v["input_ids"], v["labels"]))
    return out


# --------------------------------------------------------------------------- checks


def template_checks(tokenizer) -> tuple[list[str], list[str]]:
    """Render probe conversations and flag a template that drops, reorders or invents turns."""
    apply = tokenizer.apply_chat_template
    warnings: list[str] = []
    notes: list[str] = []
    msgs = [{"role": r, "content": c} for r, c in PROBES.items()]
    try:
        text = apply(msgs, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template error is a finding, not a crash
        return [f"chat template: fails on a system+user+assistant conversation ({type(e).__name__}: {e}); "
                "set model.chat_template: chatml or a template file"], notes
    found = {r: text.find(c) for r, c in PROBES.items()}
    for role, pos in found.items():
        if pos < 0:
            warnings.append(f"chat template: drops the {role} message (its text is not in the rendered conversation); "
                            "set model.chat_template, or move the content into another turn")
    present = [p for p in found.values() if p >= 0]
    if present != sorted(present):
        warnings.append("chat template: renders the messages out of order (system, user, assistant); set model.chat_template")
    user_only = [{"role": "user", "content": PROBES["user"]}]
    if apply(user_only, tokenize=False, add_generation_prompt=True) == apply(user_only, tokenize=False):
        warnings.append("chat template: ignores add_generation_prompt, so at inference nothing cues the assistant's "
                        "turn; set model.chat_template: chatml or a template file")
    no_system = apply(msgs[1:], tokenize=False)
    head = no_system[: max(no_system.find(PROBES["user"]), 0)]
    if "system" in head.lower():
        notes.append(f"chat template: inserts a default system prompt when a conversation has none ({head.strip()!r}); "
                     "set data.system_prompt to choose your own")
    return warnings, notes


def mask_warnings(ids: list[list[int]], labels: list[list[int]], stops: set[int], train_on_prompt: bool,
                  eot: str, report, max_length: int | None) -> list[str]:
    """Examples that cannot teach the model to stop, and examples left with nothing to learn."""
    warnings = []
    if report.dropped_no_loss:
        warnings.append(f"data: {report.dropped_no_loss} examples have no trained token and were dropped "
                        f"(answer cut off by max_length={max_length}? nothing after the prompt?)")
    bad = [i for i, (x, y) in enumerate(zip(ids, labels)) if not _ends_turns(x, y, stops, train_on_prompt)]
    if bad:
        first = ", ".join(str(i) for i in bad[:5])
        cause = (f" ({report.truncated} truncated at max_length={max_length}: raise training.max_length or set "
                 "data.overlong: drop)") if report.truncated else ""
        warnings.append(f"data: {len(bad)} training examples have a trained span without the end-of-turn token "
                        f"{eot!r} (examples {first}{', ...' if len(bad) > 5 else ''}){cause}; the model will not "
                        "learn to stop there")
    return warnings


def _ends_turns(ids: list[int], labels: list[int], stops: set[int], train_on_prompt: bool) -> bool:
    """Every trained span ends with a stop token (with train_on_prompt: the one span contains one)."""
    runs = _runs(ids, labels)
    trained = [toks for is_trained, toks in runs if is_trained]
    if train_on_prompt:
        return all(any(t in stops for t in toks) for toks in trained)
    return all(toks[-1] in stops for toks in trained)


def _runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they carry loss."""
    runs: list[tuple[bool, list[int]]] = []
    for i, label in zip(ids, labels):
        flag = label != -100
        if runs and runs[-1][0] == flag:
            runs[-1][1].append(i)
        else:
            runs.append((flag, [i]))
    return runs


# --------------------------------------------------------------------------- showing


def mark_plain(ids: list[int], labels: list[int], tokenizer) -> str:
    """The example's text with every trained span between [[ and ]] (for logs and tests)."""
    return "".join(OPEN + tokenizer.decode(t) + CLOSE if trained else tokenizer.decode(t)
                   for trained, t in _runs(ids, labels))


def mark_ansi(ids: list[int], labels: list[int], tokenizer) -> str:
    """The example's text with trained tokens on a green background, alternating shades per token."""
    parts = []
    for trained, toks in _runs(ids, labels):
        whole = tokenizer.decode(toks)
        if not trained:
            parts.append(whole)
            continue
        pieces = [tokenizer.decode([t]) for t in toks]
        if "".join(pieces) != whole:  # a multi-byte character split over tokens: shade the span as one
            pieces = [whole]
        parts.extend(f"{SHADES[k % 2]}{p}{RESET}" for k, p in enumerate(pieces))
    return "".join(parts)


def text_histogram(lengths: list[int], bins: int = 10, width: int = 40, limit: int | None = None) -> list[str]:
    """Counts of examples per token-length bucket, one bar per line."""
    if not lengths:
        return ["  (no examples)"]
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))  # ceil: every length falls in a bucket
    counts = [0] * (-(-(hi - lo + 1) // step))
    for n in lengths:
        counts[(n - lo) // step] += 1
    top = max(counts)
    label_w = len(f"{lo + step * (len(counts) - 1)}-{lo + step * len(counts) - 1}")
    lines = []
    for k, c in enumerate(counts):
        a, b = lo + k * step, lo + (k + 1) * step - 1
        bar = "#" * max(1 if c else 0, round(width * c / top))
        over = "  > max_length" if limit and a > limit else ""
        lines.append(f"  {f'{a}-{b}':>{label_w}} | {bar:<{width}} {c}{over}")
    return lines


def print_inspection(ins: Inspection, tokenizer, color: bool, out) -> None:
    """The whole inspection as readable text."""
    r = ins.report
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p("sources:")
    for k, s in enumerate(r.sources):
        split = "train" if k < ins.n_train_sources else "eval"
        p(f"  {split:<5} {s['path']} ({s['format']}): {s['rows']} rows -> {s['used']} examples")
    by_format: dict[str, int] = {}
    for s in r.sources:
        by_format[s["format"]] = by_format.get(s["format"], 0) + s["used"]
    p("formats: " + ", ".join(f"{f} {n}" for f, n in by_format.items()))
    p(f"examples: {r.examples.get('train', 0)} train, {r.examples.get('eval', 0)} eval "
      f"(after dropping {r.dropped_overlong} over max_length={ins.max_length} and {r.dropped_no_loss} with no trained "
      f"token; {r.truncated} truncated); {r.duplicates} duplicates in train")
    total, trained = sum(ins.lengths), sum(ins.trained)
    p(f"tokens: {total} in train, {trained} trained ({100 * trained / max(total, 1):.1f}%); per example "
      f"min {r.tokens.get('length_min')}, median {r.tokens.get('length_median')}, max {r.tokens.get('length_max')}")
    p(f"chat template: {ins.template}; end of turn: {ins.end_of_turn!r}; cache: {r.cache}")
    p("\ntokens per training example:")
    for line in text_histogram(ins.lengths, limit=ins.max_length):
        p(line)
    legend = f"{SHADES[0]}trained{RESET} / not trained" if color else f"{OPEN}trained{CLOSE} / not trained"
    for k, (ids, labels) in enumerate(ins.examples):
        n_trained = sum(label != -100 for label in labels)
        head = f"--- train example {k}: {len(ids)} tokens, {n_trained} trained ({legend})"
        p("\n" + (f"{DIM}{head}{RESET}" if color else head))
        p(mark_ansi(ids, labels, tokenizer) if color else mark_plain(ids, labels, tokenizer))
    for label, ids, labels in ins.augmented:
        head = f"--- augmented ({label}): {len(ids)} tokens, {sum(x != -100 for x in labels)} trained"
        p("\n" + (f"{DIM}{head}{RESET}" if color else head))
        p(mark_ansi(ids, labels, tokenizer) if color else mark_plain(ids, labels, tokenizer))
    for note in ins.notes:
        p(f"\nnote: {note}")
    for w in ins.warnings:
        p(f"\nwarning: {w}")
    if not ins.warnings:
        p("\nno warnings")


def write_histogram_png(lengths: list[int], path: str | Path, limit: int | None = None) -> Path:
    """Save a token-length histogram; PATH is a .png file or a directory (token_lengths.png in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path / "token_lengths.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(30, max(1, len(set(lengths)))), color="#4c9a2a")
    if limit and lengths and max(lengths) >= 0.8 * limit:
        ax.axvline(limit, color="#b00", linestyle="--", label=f"max_length={limit}")
        ax.legend()
    ax.set_xlabel("tokens per training example")
    ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
