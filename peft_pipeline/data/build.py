"""Building the datasets of a run: sources mixed, split, tokenized, length-checked and cached.

build_datasets is the data stage's entry: (train, eval, DataReport), from the cache when the
files, tokenizer and settings are unchanged. Nothing here drops or cuts a row silently: the
report counts every dropped, truncated and duplicate example.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_pipeline.config import DataSection, DataSource
from peft_pipeline.data.formats import detect_format, normalize, read_source
from peft_pipeline.data.template import DATA_VERSION, Rendered, render, tokenize
from peft_pipeline.errors import UserError
from peft_pipeline.paths import file_digest



@dataclass
class DataReport:
    """What happened to the data: counts that must never be silent."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    dropped_overlong: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    duplicates: int = 0
    tokens: dict[str, Any] = field(default_factory=dict)
    cache: str = ""

    def lines(self) -> list[str]:
        """Human summary, one fact per line."""
        out = [f"data: {s['path']} ({s['format']}): {s['rows']} rows -> {s['used']} used" for s in self.sources]
        out.append(f"data: {self.examples.get('train', 0)} train / {self.examples.get('eval', 0)} eval examples; "
                   f"{self.tokens.get('train_total', 0)} tokens, {self.tokens.get('train_trained', 0)} carry loss")
        if self.dropped_overlong or self.truncated:
            out.append(f"data: {self.dropped_overlong} dropped and {self.truncated} truncated as longer than max_length={self.tokens.get('max_length')}")
        if self.dropped_no_loss:
            out.append(f"data: {self.dropped_no_loss} dropped with no token left to learn from")
        if self.duplicates:
            out.append(f"data: {self.duplicates} duplicate examples in train (kept; dedupe the source if unintended)")
        out.append(f"data: cache {self.cache}")
        return out


def mix(src: DataSource, rows: list, seed: int) -> list:
    """A source's share of the mixture: max_samples (a seeded sample), then weight (a row multiplier)."""
    rng = random.Random(f"{seed}:{src.path}")
    if src.max_samples and src.max_samples < len(rows):
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), src.max_samples))]
    whole, frac = int(src.weight), src.weight - int(src.weight)
    mixed = rows * whole
    if frac:
        mixed += [rows[i] for i in sorted(rng.sample(range(len(rows)), round(frac * len(rows))))]
    return mixed


def load_examples(sources: list[DataSource], system_prompt: str | None, seed: int, report: DataReport,
                  keep_fields: bool = False) -> list[dict]:
    """Read, normalize and mix sources (max_samples, then weight) into one list of examples."""
    examples: list[dict] = []
    for src in sources:
        rows = read_source(src)
        if not rows:
            raise UserError(f"{src.path}: no rows; the dataset is empty")
        fmt = src.format if src.format != "auto" else detect_format(rows[0].data.keys(), rows[0].data)
        normalized = [normalize(r, fmt, system_prompt, keep_fields) for r in rows]
        mixed = mix(src, normalized, seed)
        report.sources.append({"path": src.path, "format": fmt, "rows": len(rows), "used": len(mixed)})
        examples.extend(mixed)
    return examples


def tokenize_examples(examples: list[dict], tokenizer, settings: DataSection, max_length: int | None,
                      report: DataReport, split: str, progress: bool = True, kept: list[int] | None = None) -> dict[str, list]:
    """Render, tokenize and length-filter examples; counts go into the report, kept rows' indices into `kept`."""
    from tqdm.auto import tqdm

    out: dict[str, list] = {"input_ids": [], "labels": []}
    seen: set[str] = set()
    limit = overlong_chars(tokenizer, max_length)
    for index, ex in enumerate(tqdm(examples, desc=f"Tokenizing {split}", disable=not progress, unit="ex")):
        rendered = render(ex, tokenizer, settings.train_on_prompt)
        # A text this long cannot fit in max_length tokens: drop it, or cut it, before tokenizing,
        # so one huge row (a 50 MB line) costs no gigabytes of token offsets.
        cut = limit is not None and len(rendered.text) > limit
        if cut and settings.overlong == "drop":
            report.dropped_overlong += 1
            continue
        if cut:
            rendered = Rendered(rendered.text[:limit], [(s, min(e, limit)) for s, e in rendered.spans if s < limit],
                                rendered.add_special_tokens)
        ids, labels = tokenize(rendered, tokenizer)
        if max_length and (cut or len(ids) > max_length):
            if settings.overlong == "drop":
                report.dropped_overlong += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        if all(label == -100 for label in labels):
            report.dropped_no_loss += 1
            continue
        if split == "train":
            key = hashlib.sha1(json.dumps(ex, sort_keys=True).encode()).hexdigest()
            report.duplicates += key in seen
            seen.add(key)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        if kept is not None:
            kept.append(index)
    return out


def overlong_chars(tokenizer, max_length: int | None) -> int | None:
    """Characters beyond which a text surely has more than max_length tokens (None: no limit).

    No token covers more characters than its longest vocabulary string; doubled for normalizers.
    """
    if not max_length:
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return 2 * max(longest, 1) * max_length


def split_holdout(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split (seeded), used when no eval source is given."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def fingerprint(settings: DataSection, tokenizer, max_length: int | None, seed: int) -> str:
    """Cache key: data file contents, tokenizer (vocab, template, specials), settings and code version."""
    h = hashlib.sha256()
    h.update(f"v{DATA_VERSION}|{max_length}|{seed}|".encode())
    # retention never changes tokens; augment does (an 'example' column) only when enabled. Left out
    # otherwise, so the key, and caches written before these settings existed, stay the same.
    skip = {"cache", "test", "retention"} | (set() if settings.augment.enabled else {"augment"})
    h.update(settings.model_dump_json(exclude=skip).encode())
    for src in settings.train + settings.eval:
        path = Path(src.path).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            h.update(file_digest(f).encode())
        if not files:
            h.update(f"hub:{src.path}:{src.name}:{src.split}".encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:20]


def build_datasets(settings: DataSection, tokenizer, max_length: int | None, seed: int,
                   cache_root: Path | None = None, progress: bool = True):
    """Return (train Dataset, eval Dataset or None, DataReport), from the cache when unchanged.

    Under several processes the main process builds the cache while the others wait, then all read it.
    """
    from accelerate import PartialState

    from peft_pipeline.paths import cache_dir

    key = fingerprint(settings, tokenizer, max_length, seed)
    root = (cache_root or cache_dir() / "data") / key
    state = PartialState()
    with state.main_process_first():
        if settings.cache and (root / "report.json").is_file():
            train, evals, report = _load_cached(root)
            report.cache = f"hit {root}"
            return _augmented(train, settings, tokenizer, max_length, seed), evals, report
        train, evals, report = _build(settings, tokenizer, max_length, seed, progress and state.is_main_process)
        if settings.cache and state.is_main_process:
            _save_cached(root, train, evals, report)
            report.cache = f"written {root}"
        elif not settings.cache:
            report.cache = "off"
        return _augmented(train, settings, tokenizer, max_length, seed), evals, report


def _augmented(train, settings: DataSection, tokenizer, max_length, seed):
    """With data.augment on, the train rows served varied per epoch (augment.AugmentedDataset)."""
    if not settings.augment.enabled:
        return train
    from peft_pipeline.data.augment import AugmentedDataset

    return AugmentedDataset.wrap(train, tokenizer, settings, max_length, seed)


def _build(settings: DataSection, tokenizer, max_length, seed, progress):
    from datasets import Dataset

    report = DataReport()
    report.tokens["max_length"] = max_length
    augment = settings.augment.enabled
    train_ex = load_examples(settings.train, settings.system_prompt, seed, report, keep_fields=augment)
    if settings.eval:
        eval_ex = load_examples(settings.eval, settings.system_prompt, seed, report)
    else:
        train_ex, eval_ex = split_holdout(train_ex, settings.val_fraction, seed)
    kept: list[int] = []
    train_cols = tokenize_examples(train_ex, tokenizer, settings, max_length, report, "train", progress, kept)
    eval_cols = tokenize_examples(eval_ex, tokenizer, settings, max_length, report, "eval", progress) if eval_ex else None
    if not train_cols["input_ids"]:
        limit = overlong_chars(tokenizer, max_length)
        rendered = (render(e, tokenizer, settings.train_on_prompt) for e in train_ex)
        # never tokenize a huge text just to report its length
        shortest = min((len(tokenize(r, tokenizer)[0]) for r in rendered if limit is None or len(r.text) <= limit),
                       default=None)
        raise UserError(
            f"training.max_length: no training example is left ({report.dropped_overlong} longer than "
            f"max_length={max_length}, {report.dropped_no_loss} with nothing to learn); the shortest example has "
            f"{shortest if shortest is not None else f'over {limit} characters, so over {max_length}'} tokens: "
            "raise training.max_length or set data.overlong: truncate"
        )
    lengths = sorted(len(x) for x in train_cols["input_ids"])
    report.examples = {"train": len(lengths), "eval": len(eval_cols["input_ids"]) if eval_cols else 0}
    report.tokens.update({
        "train_total": sum(lengths),
        "train_trained": sum(sum(label != -100 for label in ls) for ls in train_cols["labels"]),
        "length_min": lengths[0], "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1],
    })
    if augment:  # what augment.py varies, row by row (JSON: Arrow would widen the dicts to one schema)
        train_cols["example"] = [json.dumps(train_ex[i], ensure_ascii=False) for i in kept]
    train = Dataset.from_dict(train_cols)
    evals = Dataset.from_dict(eval_cols) if eval_cols and eval_cols["input_ids"] else None
    return train, evals, report


def _save_cached(root: Path, train, evals, report: DataReport) -> None:
    from dataclasses import asdict

    from peft_pipeline.paths import atomic_dir

    with atomic_dir(root) as tmp:
        train.save_to_disk(str(tmp / "train"))
        if evals is not None:
            evals.save_to_disk(str(tmp / "eval"))
        (tmp / "report.json").write_text(json.dumps(asdict(report), indent=2))


def _load_cached(root: Path):
    from datasets import load_from_disk

    report = DataReport(**json.loads((root / "report.json").read_text()))
    train = load_from_disk(str(root / "train"))
    evals = load_from_disk(str(root / "eval")) if (root / "eval").exists() else None
    return train, evals, report
