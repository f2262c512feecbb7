"""Rows for preference and RL training: pairs, rated completions, prompts; detected, checked, rendered to text.

Formats (detected from the columns like the SFT ones, or set with data.train[].format):
- preference: prompt / chosen / rejected (TRL's and UltraFeedback's layout). Each is a string or a message
  list; chosen/rejected may repeat the prompt's messages (UltraFeedback) or, with no prompt column, be
  whole conversations that differ only in the last assistant turn (TRL's "implicit prompt").
- unpaired: prompt / completion / label (true = desirable), for KTO; pairs also serve KTO (unpaired here).
- prompts: prompt [+ answer], for GRPO; alpaca, messages and prompt/completion rows also serve, their last
  assistant turn becoming the reference answer.

Every row is rendered HERE to strings, so that every trainer sees the same text and the prompt is exactly
what inference sees: a message prompt goes through the run's chat template with the generation prompt (as
evaluate/generate.py renders prompts), and a completion is the assistant text closed by the template's
end-of-turn token (data/template.render places it). A string prompt stays raw text and its completion is
closed by EOS, as SFT's prompt/completion rows are. TRL is then handed plain strings: no template of its
own, no BOS prepended (ORPO's ChatML artefacts), no second EOS.

A bad row is a one-line error naming file:line: a missing or empty side, chosen == rejected, a label
that is not a boolean.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from peft_pipeline.config import DataSource, RunConfig
from peft_pipeline.data.formats import Row, check_turns, detect_format, normalize, read_source
from peft_pipeline.errors import UserError

def _error(message: str) -> UserError:
    """A bad row or source: one line naming file:line, exit code 2 (the input needs fixing, nothing ran)."""
    return UserError(message, exit_code=2)


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
               "desirable": True, "undesirable": False, "good": True, "bad": False}
ANSWER_COLUMNS = ("answer", "expected", "reference", "solution")


def detect(columns: Iterable[str], method: str, first: dict | None = None) -> str:
    """The row format for `method` from the columns: preference, unpaired, prompts, or an SFT format (grpo)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    if method == "grpo":
        if "prompt" in cols and "completion" not in cols:
            return "prompts"
        return detect_format(cols, first)  # alpaca, messages, prompt_completion: the last answer is the reference
    wanted = "prompt/chosen/rejected (or prompt/completion/label for kto)"
    raise _error(f"cannot detect preference rows from columns {sorted(cols)}; method {method} expects {wanted}; "
                    "rename with columns: or set format:")


# --------------------------------------------------------------------------- row checks


def _messages(value: Any, where: str, side: str) -> list[dict]:
    """A message list checked the way SFT checks conversations (roles, string contents, nothing empty)."""
    if not value:
        raise _error(f"{where}: empty {side}")
    return check_turns(value, where, side, exit_code=2)


def _side(row: Row, key: str, fmt: str) -> Any:
    value = row.data.get(key)
    if key not in row.data or value is None:
        raise _error(f"{row.where}: missing field '{key}' ({fmt} format)")
    if isinstance(value, str):
        if not value.strip():
            raise _error(f"{row.where}: empty {key}")
        return value
    if isinstance(value, list):
        return _messages(value, row.where, key)
    raise _error(f"{row.where}: field '{key}' must be a string or a message list, got {type(value).__name__}")


def _completion(prompt: Any, value: Any, where: str, side: str) -> Any:
    """A completion as text or ONE assistant message, with any repeat of the prompt's messages removed."""
    if isinstance(value, str):
        return value
    if isinstance(prompt, list) and value[:len(prompt)] == prompt:
        value = value[len(prompt):]
    if len(value) != 1 or value[0]["role"] != "assistant":
        raise _error(f"{where}: {side} must be one assistant message (after the prompt's messages), "
                        f"got roles {[m['role'] for m in value]}")
    return value


def read_pair(row: Row) -> dict[str, Any]:
    """prompt/chosen/rejected from a row (explicit or implicit prompt), every side checked; errors name the row."""
    chosen, rejected = _side(row, "chosen", "preference"), _side(row, "rejected", "preference")
    if "prompt" in row.data:
        prompt = _side(row, "prompt", "preference")
    elif isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1] and len(chosen) > 1:
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]  # TRL's implicit prompt
    else:
        raise _error(f"{row.where}: missing field 'prompt' (preference format; or give chosen and rejected as "
                        "conversations that differ only in the last assistant turn)")
    if isinstance(chosen, list) != isinstance(rejected, list) or (isinstance(prompt, str) and isinstance(chosen, list)):
        raise _error(f"{row.where}: prompt, chosen and rejected must all be strings or all message lists")
    chosen = _completion(prompt, chosen, row.where, "chosen")
    rejected = _completion(prompt, rejected, row.where, "rejected")
    if _text(chosen).strip() == _text(rejected).strip():
        raise _error(f"{row.where}: chosen and rejected are the same answer; a pair needs two different ones "
                        "(fix or drop the row)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_unpaired(row: Row) -> dict[str, Any]:
    """prompt/completion/label (label a boolean, or a word like true/false/desirable) checked; errors name the row."""
    prompt = _side(row, "prompt", "unpaired")
    completion = _completion(prompt, _side(row, "completion", "unpaired"), row.where, "completion")
    label = row.data.get("label")
    if isinstance(label, str):
        label = LABEL_WORDS.get(label.strip().lower(), label)
    if not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise _error(f"{row.where}: label must be true (desirable) or false (undesirable), got {row.data.get('label')!r}")
    return {"prompt": prompt, "completion": completion, "label": label}


def read_prompt(row: Row, fmt: str) -> dict[str, Any]:
    """A GRPO prompt and its reference answer ('' when none): prompts rows, or an SFT row's last answer."""
    if fmt == "prompts":
        prompt = _side(row, "prompt", "prompts")
        answer = next((row.data[c] for c in ANSWER_COLUMNS if row.data.get(c) is not None), "")
        if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
            raise _error(f"{row.where}: the prompt ends with an assistant turn; end it with the user's")
        return {"prompt": prompt, "answer": answer if isinstance(answer, str) else str(answer)}
    example = normalize(row, fmt)
    if "messages" in example:
        msgs = example["messages"]
        return {"prompt": msgs[:-1], "answer": msgs[-1]["content"]}
    if "prompt" in example:
        return {"prompt": example["prompt"], "answer": example["completion"]}
    raise _error(f"{row.where}: a text row has no prompt to generate from; method grpo needs prompts")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


# --------------------------------------------------------------------------- rendering


def render_prompt(prompt: Any, tokenizer, system_prompt: str | None = None) -> str:
    """The prompt as inference sees it: the chat template with the generation prompt, or the raw string."""
    if isinstance(prompt, str):
        return prompt
    msgs = list(prompt)
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def render_completion(prompt: Any, completion: Any, tokenizer, system_prompt: str | None = None) -> str:
    """The completion text the model is scored on: the assistant turn and its end-of-turn (or text + EOS)."""
    from peft_pipeline.data.template import render

    if isinstance(completion, str):
        return completion + (tokenizer.eos_token or "")
    msgs = list(prompt) + list(completion)
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    rendered = render({"messages": msgs, "train_from": len(msgs) - 1}, tokenizer)
    start, end = rendered.spans[-1]
    # The template's own rendering: the span starts where the generation prompt ends.
    return rendered.text[start:end]


def render_row(row: dict[str, Any], tokenizer, system_prompt: str | None = None) -> dict[str, Any]:
    """A read row with every side rendered to the strings the trainers take."""
    out = dict(row)
    prompt = row["prompt"]
    out["prompt"] = render_prompt(prompt, tokenizer, system_prompt)
    for side in ("chosen", "rejected", "completion"):
        if side in row:
            out[side] = render_completion(prompt, row[side], tokenizer, system_prompt)
    return out


def pair_ids(tokenizer, prompt: str, completions: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids as TRL's DPO prepares them: the prompt, then each completion (EOS-terminated) after it.

    The completion starts where the tokenized prompt and the tokenized prompt+completion diverge
    (trl.data_utils.common_prefix_length), so a token merged across the boundary belongs to the completion.
    """
    eos = tokenizer.eos_token or ""
    fulls = [tokenizer(text=prompt + (c if c.endswith(eos) else c + eos))["input_ids"] for c in completions]
    p = tokenizer(text=prompt)["input_ids"]
    n = min(_common_prefix(p, f) for f in fulls)
    return p[:n], [f[n:] for f in fulls]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --------------------------------------------------------------------------- loading


@dataclass
class PreferenceData:
    """The rendered rows of a preference or GRPO run and what to tell the user about them."""

    kind: str  # "pairs", "unpaired" or "prompts": what the trainer gets
    train: list[dict]
    eval: list[dict]
    sources: list[str] = field(default_factory=list)  # "path: N rows (format)"
    tokens: dict[str, int] = field(default_factory=dict)
    overlong: int = 0  # pairs longer than max_length: TRL cuts their completions (or drops them)

    def lines(self) -> list[str]:
        """The data lines printed before training."""
        what = {"pairs": "preference pairs", "unpaired": "rated completions", "prompts": "prompts"}[self.kind]
        out = [f"data: {s}" for s in self.sources]
        out.append(f"{what}: {len(self.train)} train, {len(self.eval)} eval; tokens: "
                   + ", ".join(f"{k} {v}" for k, v in self.tokens.items()))
        if self.overlong:
            out.append(f"warning: {self.overlong} rows exceed training.max_length; TRL cuts their completions "
                       "(keep_start), and drops rows whose prompt alone fills it")
        return out

    def report(self) -> dict[str, Any]:
        """For metrics.json."""
        return {"kind": self.kind, "train": len(self.train), "eval": len(self.eval), "sources": self.sources,
                "tokens": self.tokens, "overlong": self.overlong}


def read_rows(sources: list[DataSource], method: str, seed: int, described: list[str]) -> list[dict]:
    """Every source read, detected, checked row by row and mixed (max_samples, weight)."""
    from peft_pipeline.data.build import mix

    out: list[dict] = []
    for src in sources:
        rows = read_source(src)
        if not rows:
            raise _error(f"{src.path}: no rows")
        try:
            fmt = src.format if src.format != "auto" else detect(rows[0].data.keys(), method, rows[0].data)
        except UserError as e:
            raise _error(f"{src.path}: {e}") from None
        if method != "grpo" and fmt not in ("preference", "unpaired"):
            raise _error(f"{src.path}: format {fmt} is not preference data; method {method} needs "
                            "prompt/chosen/rejected rows")
        if fmt == "unpaired" and method != "kto":
            raise _error(f"{src.path}: rated completions (prompt/completion/label) train with method: kto; "
                            f"method {method} needs prompt/chosen/rejected pairs")
        read = [read_pair(r) if fmt == "preference" else read_unpaired(r) if fmt == "unpaired" else read_prompt(r, fmt)
                for r in rows]
        for r, row in zip(read, rows):
            r["where"] = row.where
        described.append(f"{src.path}: {len(read)} rows ({fmt})")
        out += mix(src, read, seed)
    return out


def unpair(rows: list[dict], seed: int) -> list[dict]:
    """KTO's rows: each pair as a desirable and an undesirable completion, labels alternating.

    TRL's KTO samples sequentially and estimates its KL term within a batch, so a batch must mix
    labels; interleaving (desirable, undesirable, ...) does that for any batch size of 2 or more.
    """
    good, bad = [], []
    for r in rows:
        if "chosen" in r:
            good.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True, "where": r["where"]})
            bad.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False, "where": r["where"]})
        else:
            (good if r["label"] else bad).append(r)
    rng = random.Random(seed)
    rng.shuffle(bad)  # a pair's two sides do not share a batch position: the KL term pairs mismatched rows
    out: list[dict] = []
    for i in range(max(len(good), len(bad))):
        out += [x[i] for x in (good, bad) if i < len(x)]
    return out


def load(cfg: RunConfig, tokenizer) -> PreferenceData:
    """The run's rows for its method, read and checked (file:line), rendered through the chat template."""
    from peft_pipeline.data.build import split_holdout

    method, data, described = cfg.method, cfg.data, []
    train = read_rows(data.train, method, cfg.seed, described)
    evals = read_rows(data.eval, method, cfg.seed, described) if data.eval else []
    if not data.eval and data.val_fraction > 0:
        train, evals = split_holdout(train, data.val_fraction, cfg.seed)
    if method == "kto":
        train, evals = unpair(train, cfg.seed), unpair(evals, cfg.seed)
    kind = "prompts" if method == "grpo" else "unpaired" if method == "kto" else "pairs"
    if kind == "pairs" and any("chosen" not in r for r in train + evals):
        raise _error(f"method {method} trains on pairs; rated completions (prompt/completion/label) need method: kto")
    system = data.system_prompt
    train = [render_row(r, tokenizer, system) for r in train]
    evals = [render_row(r, tokenizer, system) for r in evals]
    out = PreferenceData(kind, train, evals, described)
    _measure(out, tokenizer, cfg.max_length)
    return out


def _measure(data: PreferenceData, tokenizer, max_length: int | None) -> None:
    """Longest prompt and completion in tokens, and the rows TRL would cut at max_length."""
    longest = {"prompt_max": 0, "completion_max": 0}
    for r in data.train + data.eval:
        sides = [r[s] for s in ("chosen", "rejected", "completion") if s in r]
        if sides:
            p, cs = pair_ids(tokenizer, r["prompt"], sides)
        else:
            p, cs = tokenizer(text=r["prompt"])["input_ids"], [[]]
        longest["prompt_max"] = max(longest["prompt_max"], len(p))
        longest["completion_max"] = max(longest["completion_max"], *(len(c) for c in cs))
        if max_length and sides and len(p) + max(len(c) for c in cs) > max_length:
            data.overlong += 1
    data.tokens = longest


def as_dataset(rows: list[dict]):
    """A datasets.Dataset of the trainer's columns (the row's file:line is kept for nobody but us: dropped)."""
    from datasets import Dataset

    if not rows:
        return None
    return Dataset.from_list([{k: v for k, v in r.items() if k != "where"} for r in rows])
