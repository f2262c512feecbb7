"""Data stage: files -> normalized examples -> chat-templated tokens with a loss mask -> cached datasets.

Every row becomes one of three normalized shapes:
- {"messages": [...]}: rendered with the model's chat template; loss on every assistant turn
  plus the end-of-turn token that closes it (found in the template's output, or appended);
- {"prompt": str, "completion": str}: raw text (TRL's "standard" prompt/completion), loss on
  the completion and EOS;
- {"text": str}: continued pretraining, loss everywhere, EOS appended.

Masks are computed on the full rendered text with character spans and the tokenizer's offsets,
never from `{% generation %}` markers (many templates, SmolLM2's included, have none), and the
tokens are those of the full text, so training sees exactly what inference will.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from peft_pipeline.config import DataSection, DataSource, LOCAL_DATA_SUFFIXES
from peft_pipeline.errors import UserError

# Bump when tokenization or masking changes, so cached datasets from older code are not reused.
DATA_VERSION = 1

# A fallback for bases without a chat template. The end of each assistant turn is the tokenizer's
# own EOS, so generation stops there without adding tokens to the vocabulary.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that close a turn in common templates; the tokenizer's EOS is tried first.
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>")
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# --------------------------------------------------------------------------- reading files


@dataclass
class Row:
    """A raw row and where it came from, so every error can name file and row."""

    data: dict[str, Any]
    where: str


def read_source(src: DataSource) -> list[Row]:
    """Read one source into rows, naming file and line in every error."""
    path = Path(src.path).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        elif suffix in (".parquet", ".arrow"):
            rows = _read_with_datasets(path, suffix)
        else:
            raise UserError(f"{path}: unsupported data file type '{suffix}'; use .jsonl, .json, .csv or .parquet")
    elif path.is_dir():
        rows = _read_saved_dataset(path, src.split)
    elif suffix in LOCAL_DATA_SUFFIXES or src.path.startswith((".", "/", "~")):
        raise UserError(f"{src.path}: data file not found")
    else:
        rows = _read_hub(src)
    if src.columns:
        rows = [Row({src.columns.get(k, k): v for k, v in r.data.items()}, r.where) for r in rows]
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or remove this line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append(Row(obj, where))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and "data" in obj and isinstance(obj["data"], list):
        obj = obj["data"]
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        # column-oriented {"instruction": [...], "output": [...]}
        n = len(next(iter(obj.values())))
        obj = [{k: v[i] for k, v in obj.items()} for i in range(n)]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of records (or {{\"data\": [...]}})")
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise UserError(f"{path}: record {i}: expected an object, got {type(item).__name__}")
        rows.append(Row(item, f"{path}: record {i}"))
    return rows


def _read_csv(path: Path) -> list[Row]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [Row(dict(r), f"{path}:{i + 2}") for i, r in enumerate(csv.DictReader(f))]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _read_with_datasets(path: Path, suffix: str) -> list[Row]:
    from datasets import Dataset

    ds = Dataset.from_parquet(str(path)) if suffix == ".parquet" else Dataset.from_file(str(path))
    return [Row(r, f"{path}: row {i}") for i, r in enumerate(ds)]


def _read_saved_dataset(path: Path, split: str) -> list[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory but not a dataset saved with datasets.save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}' (has {', '.join(ds)}); set split: in the data source")
        ds = ds[split]
    return [Row(r, f"{path}[{split}]: row {i}") for i, r in enumerate(ds)]


def _read_hub(src: DataSource) -> list[Row]:
    # Real hub path for users with internet; tests never reach it.
    from datasets import load_dataset

    try:
        ds = load_dataset(src.path, src.name, split=src.split)
    except Exception as e:  # noqa: BLE001 - network/hub errors become one line
        raise UserError(f"{src.path}: not a local file and could not be loaded from the hub ({type(e).__name__}: {e})") from None
    return [Row(r, f"{src.path}[{src.split}]: row {i}") for i, r in enumerate(ds)]


# --------------------------------------------------------------------------- formats


def detect_format(columns: Iterable[str], first: dict[str, Any] | None = None) -> str:
    """Guess the format from the columns (and the first row for 'conversations')."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        turns = (first or {}).get("conversations") or [{}]
        return "sharegpt" if isinstance(turns[0], dict) and "from" in turns[0] else "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise UserError(
        f"cannot detect the data format from columns {sorted(cols)}; expected messages, conversations, "
        "instruction+output (alpaca), prompt+completion or text; rename with columns: or set format:"
    )


def normalize(row: Row, fmt: str, system_prompt: str | None = None, keep_fields: bool = False) -> dict[str, Any]:
    """Turn one raw row into {'messages'}, {'prompt','completion'} or {'text'}; errors name the row.

    keep_fields: alpaca rows also keep {'fields': {instruction, input}} (augment.py re-lays the user turn out).
    """
    d = row.data

    def need(key: str, kind=str):
        if key not in d or d[key] is None:
            raise UserError(f"{row.where}: missing field '{key}' ({fmt} format)")
        if kind is str and not isinstance(d[key], str):
            raise UserError(f"{row.where}: field '{key}' must be a string, got {type(d[key]).__name__}")
        return d[key]

    if fmt == "alpaca":
        instruction, output = need("instruction"), need("output")
        extra = d.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{row.where}: field 'input' must be a string, got {type(extra).__name__}")
        if not instruction.strip() or not output.strip():
            raise UserError(f"{row.where}: empty {'instruction' if not instruction.strip() else 'output'}")
        messages = []
        system = d.get("system") or system_prompt
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": alpaca_user_turn(instruction, extra)})
        messages.append({"role": "assistant", "content": output})
        if keep_fields:
            return {"messages": messages, "fields": {"instruction": instruction, "input": extra}}
        return {"messages": messages}
    if fmt == "messages":
        key = "messages" if "messages" in d else "conversations"
        return {"messages": _check_messages(need(key, list), row.where, system_prompt)}
    if fmt == "sharegpt":
        turns = need("conversations", list)
        messages = []
        for i, t in enumerate(turns if isinstance(turns, list) else []):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise UserError(f"{row.where}: conversations[{i}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise UserError(f"{row.where}: conversations[{i}]: unknown speaker '{t['from']}' (use human, gpt or system)")
            messages.append({"role": role, "content": t["value"]})
        return {"messages": _check_messages(messages, row.where, system_prompt)}
    if fmt == "prompt_completion":
        prompt, completion = d.get("prompt"), d.get("completion")
        if prompt is None or completion is None:
            raise UserError(f"{row.where}: missing field '{'prompt' if prompt is None else 'completion'}' (prompt_completion format)")
        if isinstance(prompt, list) and isinstance(completion, list):
            msgs = _check_messages(prompt + completion, row.where, system_prompt, allow_trailing_user=False)
            # Only the completion's assistant turns carry loss: prompt turns become context.
            n_prompt = len(msgs) - len(completion)
            return {"messages": msgs, "train_from": n_prompt}
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UserError(f"{row.where}: prompt and completion must both be strings or both message lists")
        if not completion.strip():
            raise UserError(f"{row.where}: empty completion")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        text = need("text")
        if not text.strip():
            raise UserError(f"{row.where}: empty text")
        return {"text": text}
    raise UserError(f"{row.where}: unknown format '{fmt}'")


def alpaca_user_turn(instruction: str, extra: str) -> str:
    """An alpaca row's user message: the instruction, then its input (if any) after a blank line."""
    return instruction + (f"\n\n{extra}" if extra.strip() else "")


def _check_messages(messages: Any, where: str, system_prompt: str | None, allow_trailing_user: bool = False) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: messages[{i}]: unknown role '{m['role']}' (use system, user or assistant)")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: messages[{i}].content must be a string, got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise UserError(f"{where}: messages[{i}] ({m['role']}) is empty")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant turn to learn from")
    if out[-1]["role"] != "assistant" and not allow_trailing_user:
        raise UserError(f"{where}: the conversation ends with a {out[-1]['role']} turn; end it with the assistant's reply or drop the last turn")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


# --------------------------------------------------------------------------- templates and masks


def ensure_chat_template(tokenizer, choice: str | None) -> str:
    """Set the tokenizer's template from model.chat_template; return a label for reports."""
    if choice == "chatml" or (choice is None and not getattr(tokenizer, "chat_template", None)):
        tokenizer.chat_template = CHATML_TEMPLATE
        return "chatml (fallback)" if choice is None else "chatml"
    if choice:
        tokenizer.chat_template = Path(choice).read_text(encoding="utf-8")
        return choice
    return "tokenizer"


def end_of_turn(tokenizer) -> str:
    """The string that closes an assistant turn in this template (also the generation stop)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    suffix = text[text.rfind("Hello there") + len("Hello there"):]
    found = _first_end_of_turn(suffix, tokenizer)
    return found[1] if found else tokenizer.eos_token


def stop_ids(tokenizer) -> list[int]:
    """Token ids generation stops at: the template's end of turn and EOS (what training saved)."""
    ids = {tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


def _first_end_of_turn(suffix: str, tokenizer) -> tuple[int, str] | None:
    candidates = [tokenizer.eos_token] + [c for c in END_OF_TURN_CANDIDATES if c != tokenizer.eos_token]
    hits = [(suffix.find(c), c) for c in candidates if c and c in suffix]
    return min(hits) if hits else None


@dataclass
class Rendered:
    """Text with the character spans that carry loss."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool = False


def render(example: dict[str, Any], tokenizer, train_on_prompt: bool = False) -> Rendered:
    """Render a normalized example and mark the characters that carry loss."""
    eos = tokenizer.eos_token or ""
    if "text" in example:
        text = example["text"] + eos
        return Rendered(text, [(0, len(text))], add_special_tokens=True)
    if "prompt" in example:
        text = example["prompt"] + example["completion"] + eos
        start = 0 if train_on_prompt else len(example["prompt"])
        return Rendered(text, [(start, len(text))], add_special_tokens=True)
    return _render_conversation(example["messages"], tokenizer, train_on_prompt, example.get("train_from", 0))


def _render_conversation(messages: list[dict], tokenizer, train_on_prompt: bool, train_from: int = 0) -> Rendered:
    apply = tokenizer.apply_chat_template
    full = apply(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    inserts: list[int] = []  # positions in `full` where the EOS must be added (template closes with none)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        before = apply(messages[:i], tokenize=False, add_generation_prompt=True)
        through = apply(messages[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise UserError(
                "the chat template renders a conversation differently from its prefixes (turn "
                f"{i}, role assistant), so the loss mask cannot be placed; set model.chat_template: chatml "
                "or a template file"
            )
        content = m["content"]
        end = through.find(content, len(before))
        if end < 0:  # the template trimmed the content
            content = content.strip()
            end = through.find(content, len(before))
        if end < 0:
            raise UserError(f"the chat template does not render assistant turn {i} verbatim; set model.chat_template")
        content_end = end + len(content)
        eot = _first_end_of_turn(through[content_end:], tokenizer)
        if eot is not None:
            spans.append((len(before), content_end + eot[0] + len(eot[1])))
        else:
            spans.append((len(before), content_end))
            inserts.append(content_end)
    if inserts:
        full, spans = _insert_eos(full, spans, inserts, tokenizer.eos_token)
    if train_on_prompt:
        spans = [(0, len(full))]
    return Rendered(full, spans)


def _insert_eos(text: str, spans: list[tuple[int, int]], positions: list[int], eos: str):
    out, new_spans, last = [], [], 0
    pos_set = set(positions)
    for pos in sorted(positions):
        out.append(text[last:pos] + eos)
        last = pos
    out.append(text[last:])
    for s, e in spans:
        shift_s = sum(len(eos) for p in pos_set if p < s)
        shift_e = sum(len(eos) for p in pos_set if p <= e)
        new_spans.append((s + shift_s, e + shift_e))
    return "".join(out), new_spans


def tokenize(rendered: Rendered, tokenizer) -> tuple[list[int], list[int]]:
    """Tokenize piece by piece at the loss-span boundaries; label trained pieces, -100 elsewhere.

    Cutting at the boundaries means the prompt is tokenized exactly as at inference time (where
    it is tokenized alone and the model continues it), and no BPE token straddles the edge of an
    answer, so the trained tokens decode to exactly the answer plus its end-of-turn.
    """
    text = rendered.text
    cuts = sorted({0, len(text)} | {p for span in rendered.spans for p in span})
    ids: list[int] = []
    labels: list[int] = []
    if rendered.add_special_tokens:
        bos = tokenizer.bos_token_id
        if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
            ids.append(bos)
            labels.append(-100)
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        trained = any(s <= a and b <= e for s, e in rendered.spans)
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


# --------------------------------------------------------------------------- building datasets


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


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (also recorded in run dirs as data fingerprints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    from peft_pipeline.augment import AugmentedDataset

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
