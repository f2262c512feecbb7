"""Reading data files and normalizing rows: JSONL/JSON/CSV/Parquet/saved/hub -> one of three example shapes.

Every row becomes one of:
- {"messages": [...]}: a conversation (alpaca, ShareGPT and OpenAI messages rows all end here);
- {"prompt": str, "completion": str}: raw text (TRL's "standard" prompt/completion);
- {"text": str}: continued pretraining.
Each row keeps where it came from (file:line), so every data error names it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from peft_pipeline.config import DataSource, LOCAL_DATA_SUFFIXES
from peft_pipeline.errors import UserError


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


# Over 50 lines by choice: one branch per data format, read as a table of the formats.
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


def check_turns(messages: list, where: str, name: str = "messages", exit_code: int = 1) -> list[dict]:
    """Each turn a {role, content} with a known role and non-empty string content; errors name row and turn."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: {name}[{i}] needs 'role' and 'content'", exit_code)
        if m["role"] not in ROLES:
            raise UserError(f"{where}: {name}[{i}]: unknown role '{m['role']}' (use system, user or assistant)", exit_code)
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: {name}[{i}].content must be a string, got {type(m['content']).__name__}", exit_code)
        if not m["content"].strip():
            raise UserError(f"{where}: {name}[{i}] ({m['role']}) is empty", exit_code)
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_messages(messages: Any, where: str, system_prompt: str | None, allow_trailing_user: bool = False) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = check_turns(messages, where)
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant turn to learn from")
    if out[-1]["role"] != "assistant" and not allow_trailing_user:
        raise UserError(f"{where}: the conversation ends with a {out[-1]['role']} turn; end it with the assistant's reply or drop the last turn")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


# --------------------------------------------------------------------------- templates and masks


