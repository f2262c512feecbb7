"""Generation shared by `eval`, `generate` and `chat`: prompts in, decoded answers out.

Prompts are rendered exactly as in training (data.render): conversations through the run's chat
template with the generation prompt appended, raw prompt/completion text as it is. Batches are
LEFT padded, so every row's prompt ends at the same column and new tokens line up. Generation
stops at the run's end-of-turn ids (stop_token_ids), and every answer records whether it
got there (`stopped`) or ran into max_new_tokens: the "never stops" bug shows up as a number.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError

# The answer field of each prompt format; rows without one are fine for `generate` (not `eval`).
_ANSWER_FIELD = {"alpaca": "output", "prompt_completion": "completion"}
_PLACEHOLDER = "<answer>"


@dataclass
class Prompt:
    """One generation input: a conversation (chat template) or raw text, and the expected answer if known."""

    messages: list[dict] | None = None
    text: str | None = None
    expected: str | None = None
    where: str = ""

    def display(self) -> str:
        """What a person would call the prompt: the last user turn, or the raw text."""
        if self.messages is None:
            return self.text or ""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]

    def as_json(self) -> Any:
        """The prompt as written to eval.json / --out (messages list or text)."""
        return self.messages if self.messages is not None else self.text


@dataclass
class Completion:
    """A decoded answer; `stopped` is False when it ran into max_new_tokens instead of a stop token.

    `token_ids` are the generated ids before the stop token (the stop token itself is not kept).
    """

    text: str
    stopped: bool
    new_tokens: int
    token_ids: list[int]


@dataclass
class Sampling:
    """Decoding settings; temperature 0 means greedy (deterministic)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Reject values generate() would choke on, naming the flag."""
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: must be at least 1, got {self.max_new_tokens}", exit_code=2)
        if self.temperature < 0:
            raise UserError(f"--temperature: must be >= 0 (0 = greedy), got {self.temperature}", exit_code=2)
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: must be in (0, 1], got {self.top_p}", exit_code=2)


# --------------------------------------------------------------------------- reading prompts


def read_prompts(path: str | Path, system_prompt: str | None = None, need_expected: bool = True) -> list[Prompt]:
    """Rows of a data file (any training format) as prompts, each with its expected answer.

    The answer is the alpaca `output`, the `completion`, or the conversation's last assistant turn.
    With need_expected=False, rows may stop before the answer (generate's --prompts).
    """
    from peft_pipeline.config import DataSource
    from peft_pipeline.data.formats import detect_format, read_source

    rows = read_source(DataSource(path=str(path)))
    if not rows:
        raise UserError(f"{path}: no prompts; the file is empty")
    first = rows[0].data
    fmt = detect_format(_with_placeholder(first, None)[0].keys(), first)
    if fmt == "text":
        raise UserError(f"{path}: rows in text format have no prompt/answer split; use messages, "
                        "instruction+output (alpaca) or prompt+completion rows")
    return [_to_prompt(row, fmt, system_prompt, need_expected) for row in rows]


def _with_placeholder(data: dict, fmt: str | None) -> tuple[dict, bool]:
    """The row with a stand-in answer when it has none (so data.normalize validates the rest), and whether one was added."""
    data = dict(data)
    added = False
    if fmt in (None, "alpaca") and "instruction" in data and data.get("output") is None:
        data["output"], added = _PLACEHOLDER, True
    if fmt in (None, "prompt_completion") and "prompt" in data and data.get("completion") is None:
        as_turn = isinstance(data["prompt"], list)
        data["completion"] = [{"role": "assistant", "content": _PLACEHOLDER}] if as_turn else _PLACEHOLDER
        added = True
    for key in ("messages", "conversations"):
        turns = data.get(key)
        if fmt in (None, "messages", "sharegpt") and isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            role = turns[-1].get("role", turns[-1].get("from"))
            if role in ("user", "human", "system"):
                extra = {"role": "assistant", "content": _PLACEHOLDER} if "role" in turns[-1] else {"from": "gpt", "value": _PLACEHOLDER}
                data[key], added = turns + [extra], True
    return data, added


def _to_prompt(row, fmt: str, system_prompt: str | None, need_expected: bool) -> Prompt:
    from peft_pipeline.data.formats import Row, normalize

    if need_expected and fmt in _ANSWER_FIELD and row.data.get(_ANSWER_FIELD[fmt]) is None:
        raise UserError(f"{row.where}: missing field '{_ANSWER_FIELD[fmt]}' (the expected answer)")
    data, added = (row.data, False) if need_expected else _with_placeholder(row.data, fmt)
    ex = normalize(Row(data, row.where), fmt, system_prompt)
    if "prompt" in ex:
        return Prompt(text=ex["prompt"], expected=None if added else ex["completion"], where=row.where)
    messages = ex["messages"]
    return Prompt(messages=messages[:-1], expected=None if added else messages[-1]["content"], where=row.where)


# --------------------------------------------------------------------------- generating


def encode(prompt: Prompt, tokenizer) -> list[int]:
    """Prompt token ids, rendered as data.render renders the same row for training."""
    if prompt.messages is not None:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt.text, add_special_tokens=True)["input_ids"]


def generate(model, tokenizer, prompts: list[Prompt], stop_ids: list[int], sampling: Sampling | None = None,
             batch_size: int = 8, progress: bool = False, desc: str = "Generating", streamer=None) -> list[Completion]:
    """Answers for `prompts` (in order), generated in left-padded batches."""
    import torch
    from tqdm.auto import tqdm

    sampling = sampling or Sampling()
    encoded = [encode(p, tokenizer) for p in prompts]
    # Longest first: rows of similar length share a batch (less padding), and running out of
    # memory happens on the first batch rather than the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[Completion | None] = [None] * len(encoded)
    torch.manual_seed(sampling.seed)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr):
        idx = order[start:start + batch_size]
        new = _generate_batch(model, tokenizer, [encoded[i] for i in idx], stop_ids, sampling, streamer)
        for i, ids in zip(idx, new):
            results[i] = decode(ids, stop_ids, tokenizer)
    return results  # type: ignore[return-value]


def _generate_batch(model, tokenizer, batch: list[list[int]], stop_ids: list[int], sampling: Sampling, streamer):
    """New token ids for each row of one batch (prompt stripped, padding after a stop kept)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for r, ids in enumerate(batch):  # left padding: real tokens at the right edge
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[r, width - len(ids):] = 1
    kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "eos_token_id": list(stop_ids),
                              "pad_token_id": pad, "do_sample": sampling.temperature > 0}
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             streamer=streamer, **kwargs)
    return out[:, width:].tolist()


def decode(new_ids: list[int], stop_ids: list[int], tokenizer) -> Completion:
    """Cut at the first stop token; decode what came before it without special tokens."""
    stops = set(stop_ids)
    cut = next((k for k, t in enumerate(new_ids) if t in stops), None)
    kept = new_ids if cut is None else new_ids[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Completion(text=text.strip(), stopped=cut is not None, new_tokens=len(kept), token_ids=kept)


# --------------------------------------------------------------------------- the verbs


@dataclass
class Session:
    """A loaded target ready to generate: model, tokenizer, stop ids, and what to call it."""

    target: Any
    model: Any
    tokenizer: Any
    stop_ids: list[int]
    system_prompt: str | None


def open_session(path: str | Path, base: bool = False) -> Session:
    """Resolve a run/adapter/merged dir and load it for inference (without the adapter when `base`)."""
    from peft_pipeline.data.template import load_tokenizer, stop_token_ids
    from peft_pipeline.model.load import load_model
    from peft_pipeline.rundir import resolve

    target = resolve(path)
    if base and target.adapter_dir is None:
        raise UserError(f"{path}: --base: a merged model has no adapter to switch off; use the run directory", exit_code=2)
    tokenizer = load_tokenizer(target.tokenizer_dir, padding_side="left")
    model = load_model(target, with_adapter=not base, place_on_gpu=True)
    system = target.config.data.system_prompt if target.config is not None else None
    return Session(target, model, tokenizer, stop_token_ids(target, tokenizer), system)


def generate_cli(path: str, prompt: str | None, prompts_file: str | None, sampling: Sampling, base: bool = False,
                 out: str | None = None, batch_size: int = 8, progress: bool = True) -> int:
    """`peft-pipeline generate`: print completions, and write JSONL records with --out."""
    from peft_pipeline.rundir import resolve

    sampling.check()
    target = resolve(path)  # path errors before the model loads
    system = target.config.data.system_prompt if target.config is not None else None
    if prompt is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompts = [Prompt(messages=messages, where="--prompt")]
    else:
        prompts = read_prompts(prompts_file, system, need_expected=False)
    session = open_session(path, base)
    answers = generate(session.model, session.tokenizer, prompts, session.stop_ids, sampling, batch_size, progress)
    for p, a in zip(prompts, answers):
        if len(prompts) > 1:
            print(f"--- {p.where}: {one_line(p.display(), 100)}")
        print(a.text + ("" if a.stopped else f"\n[hit --max-new-tokens={sampling.max_new_tokens} before a stop token]"))
    if out:
        records = [{"where": p.where, "prompt": p.as_json(), "completion": a.text, "stopped": a.stopped,
                    "new_tokens": a.new_tokens, **({"expected": p.expected} if p.expected is not None else {})}
                   for p, a in zip(prompts, answers)]
        _write_jsonl(Path(out), records)
        print(f"[peft-pipeline] {len(records)} completions written to {out}", file=sys.stderr)
    return 0


def chat(path: str, sampling: Sampling, base: bool = False, system: str | None = None,
         stdin=None, stdout=None) -> int:
    """`peft-pipeline chat`: multi-turn chat on stdin/stdout; /reset clears history, /exit or EOF quits."""
    from transformers import TextStreamer

    sampling.check()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = open_session(path, base)
    system = system if system is not None else session.system_prompt
    fresh = [{"role": "system", "content": system}] if system else []
    history = list(fresh)
    interactive = stdin.isatty()
    print(f"[peft-pipeline] chatting with {session.target.path}{' (base, adapter off)' if base else ''}; "
          "/reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            if interactive:
                stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(fresh)
            print("[history cleared]", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        # Stream tokens as they come when a person is watching; print the decoded answer otherwise.
        streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True) if interactive else None
        answer = generate(session.model, session.tokenizer, [Prompt(messages=history)], session.stop_ids,
                          sampling, streamer=streamer)[0]
        if not interactive:
            print(answer.text, file=stdout, flush=True)
        if not answer.stopped:
            print(f"[hit --max-new-tokens={sampling.max_new_tokens} before the end of the turn]", file=sys.stderr)
        history.append({"role": "assistant", "content": answer.text})


def one_line(text: str, width: int = 110) -> str:
    """Whitespace collapsed, cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def adapter_off(model, off: bool):
    """The base model inside the block when `off` (same weights in memory, LoRA bypassed)."""
    if not off:
        yield
        return
    with model.disable_adapter():
        yield
