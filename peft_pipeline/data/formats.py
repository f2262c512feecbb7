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
            rows.append(Row(parse_line(line.rstrip("\r\n"), where), where))
    return rows


def parse_line(line: str, where: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; errors name the line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or remove this line") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    return obj


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
    return [Row(r, f"{path}[{split}]: row {i}") for i, r in enumerate(_saved_dataset(path, split))]


def _read_hub(src: DataSource) -> list[Row]:
    return [Row(r, f"{src.path}[{src.split}]: row {i}") for i, r in enumerate(_hub_dataset(src))]


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
        tools = check_tools(d.get("tools"), row.where)  # OpenAI function schemas, or None
        messages = _check_messages(need(key, list), row.where, system_prompt, tools=tools)
        return {"messages": messages, "tools": tools} if tools else {"messages": messages}
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


def _check_messages(messages: Any, where: str, system_prompt: str | None, allow_trailing_user: bool = False,
                    tools: list[dict] | None = None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out: list[dict] = []
    calls = _PendingCalls({t["function"]["name"] for t in tools or []})
    for i, m in enumerate(messages):
        out.append(_message(i, m, where, calls))
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant turn to learn from")
    if out[-1]["role"] != "assistant" and not allow_trailing_user:
        raise UserError(f"{where}: the conversation ends with a {out[-1]['role']} turn; end it with the assistant's reply or drop the last turn")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


# --------------------------------------------------------------------------- templates and masks




# --------------------------------------------------------------------------- tool calls and reasoning

# Older names for an assistant turn's reasoning (transformers aliases them the same way).
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


class _PendingCalls:
    """The tools a row declares, and the calls its tool results may still answer."""

    def __init__(self, declared: set[str]):
        self.declared = declared
        self.open: list[str | None] = []  # call ids (None when the data gives none), oldest first


# Over 50 lines by choice: one message's checks, role by role, read as the table of what a row may hold.
def _message(i: int, m: Any, where: str, calls: _PendingCalls) -> dict[str, Any]:
    """One message checked and reduced to what templates read: role, content, and tool calls,
    tool_call_id/name or reasoning_content where they apply. Errors name the row and the message."""
    at = f"messages[{i}]"
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise UserError(f"{where}: {at} needs 'role' and 'content'")
    role, content = m["role"], m.get("content")
    if role not in ROLES and role != "tool":
        raise UserError(f"{where}: {at}: unknown role '{role}' (use system, user, assistant or tool)")
    if role == "tool" and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result, as the model will see it
    tool_calls = m.get("tool_calls") if role == "assistant" else None
    if content is None and tool_calls:
        content = ""
    if not isinstance(content, str):
        raise UserError(f"{where}: {at}.content must be a string, got {type(content).__name__}")
    if not content.strip() and not tool_calls:
        raise UserError(f"{where}: {at} ({role}) is empty")
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise UserError(f"{where}: {at}.reasoning_content must be a string, got {type(reasoning).__name__}")
            out["reasoning_content"] = reasoning
        if tool_calls is not None:
            if not isinstance(tool_calls, list) or not tool_calls:
                raise UserError(f"{where}: {at}.tool_calls must be a non-empty list of calls")
            out["tool_calls"] = [_tool_call(c, where, f"{at}.tool_calls[{j}]", calls.declared) for j, c in enumerate(tool_calls)]
            calls.open = [c.get("id") for c in out["tool_calls"]]
        else:
            calls.open = []
    elif role == "tool":
        call_id = m.get("tool_call_id")
        if not calls.open:
            raise UserError(f"{where}: {at} is a tool result with no tool call before it; "
                            "put the assistant turn with tool_calls first, or drop the result")
        if call_id is not None and any(c is not None for c in calls.open):
            if call_id not in calls.open:
                raise UserError(f"{where}: {at}.tool_call_id '{call_id}' answers no open call "
                                f"(open: {', '.join(str(c) for c in calls.open)})")
            calls.open.remove(call_id)
        else:
            calls.open.pop(0)
        out.update({k: str(m[k]) for k in ("tool_call_id", "name") if m.get(k) is not None})
    return out


def _tool_call(call: Any, where: str, at: str, declared: set[str]) -> dict[str, Any]:
    """An OpenAI tool call ({id?, type, function: {name, arguments}}) with its arguments parsed to an object
    (templates write `arguments | tojson`); the name must be one of the row's tools."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise UserError(f"{where}: {at} needs function.name (OpenAI format: {{type: function, function: {{name, arguments}}}})")
    name = fn["name"]
    if name not in declared:
        known = ", ".join(sorted(declared)) if declared else "the row declares no tools"
        raise UserError(f"{where}: {at} calls '{name}', an undeclared tool ({known}); add it to the row's tools or fix the name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: {at}.function.arguments is malformed JSON ({e.msg} at column {e.colno}); "
                            "write the arguments as a JSON object") from None
    if not isinstance(args, dict):
        raise UserError(f"{where}: {at}.function.arguments must be a JSON object, got {type(args).__name__}")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call, dict) and call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def check_tools(tools: Any, where: str) -> list[dict] | None:
    """A row's `tools` (OpenAI function schemas; a JSON string of them is read too) as
    [{type: function, function: {name, ...}}]; None when the row has none."""
    if tools is None or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: tools is malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(tools, list):
        raise UserError(f"{where}: tools must be a list of function schemas, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(f"{where}: tools[{i}] needs function.name (OpenAI format: {{type: function, "
                            "function: {name, description, parameters}}})")
        out.append({"type": "function", "function": fn})
    return out


# --------------------------------------------------------------------------- streamed reading


@dataclass
class RawSource:
    """A source read row by row for the Arrow build: rows as JSON text with their line or index.

    where(n) names row n the way read_source's rows do, so errors raised later, in another
    process, still name the file and line.
    """

    rows: Iterable[tuple[int, str]]
    label: str
    kind: str  # "line": file:N; "record": file: record N; "row": label: row N

    def where(self, n: int) -> str:
        """The file:line (or record, or row) of row n, as every data error names it."""
        if self.kind == "line":
            return f"{self.label}:{n}"
        return f"{self.label}: {self.kind} {n}"


def raw_source(src: DataSource) -> RawSource:
    """One source as (line or index, JSON text) pairs, read lazily: a JSONL file is never held whole.

    JSONL lines are passed on unparsed (the tokenizing processes parse them); other files and
    datasets are read with read_source or in Arrow batches and written back as JSON.
    """
    path = Path(src.path).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return RawSource(_jsonl_lines(path), str(path), "line")
    if path.is_file() and path.suffix.lower() in (".parquet", ".arrow"):
        from datasets import Dataset

        ds = Dataset.from_parquet(str(path)) if path.suffix.lower() == ".parquet" else Dataset.from_file(str(path))
        return RawSource(_dataset_rows(ds), str(path), "row")
    if path.is_dir() or path.is_file() or src.path.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_DATA_SUFFIXES:
        if path.is_dir():
            ds = _saved_dataset(path, src.split)
            return RawSource(_dataset_rows(ds), f"{path}[{src.split}]", "row")
        rows = read_source(DataSource(path=src.path))  # .json / .csv (small by nature) or a missing file's error
        return RawSource(((_where_number(r.where), json.dumps(r.data, ensure_ascii=False)) for r in rows),
                         str(path), "line" if path.suffix.lower() == ".csv" else "record")
    return RawSource(_dataset_rows(_hub_dataset(src)), f"{src.path}[{src.split}]", "row")


def _jsonl_lines(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            if line.strip():
                yield lineno, line.rstrip("\r\n")


def _dataset_rows(ds, batch: int = 10_000):
    # Arrow batches, not the whole table: a hub dataset or a big parquet file never sits in memory.
    n = 0
    for cols in ds.iter(batch_size=batch):
        keys = list(cols)
        for values in zip(*(cols[k] for k in keys)):
            yield n, json.dumps(dict(zip(keys, values)), ensure_ascii=False, default=str)
            n += 1


def _where_number(where: str) -> int:
    # read_source's "file:LINE" (CSV) or "file: record N" (JSON) back to the number
    tail = where.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else int(where.rsplit(":", 1)[1])


def _saved_dataset(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory but not a dataset saved with datasets.save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}' (has {', '.join(ds)}); set split: in the data source")
        ds = ds[split]
    return ds


def _hub_dataset(src: DataSource):
    # Real hub path for users with internet; tests never reach it. streaming: rows arrive as they are read,
    # and max_samples stops the reading (build.py takes the first rows of a stream).
    from datasets import load_dataset

    try:
        ds = load_dataset(src.path, src.name, split=src.split, streaming=src.streaming)
    except Exception as e:  # noqa: BLE001 - network/hub errors become one line
        raise UserError(f"{src.path}: not a local file and could not be loaded from the hub ({type(e).__name__}: {e})") from None
    return ds.take(src.max_samples) if src.streaming and src.max_samples else ds
