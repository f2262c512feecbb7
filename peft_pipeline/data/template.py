"""Chat templates and loss masks: a normalized example -> rendered text -> token ids + labels.

Masks are computed on the full rendered text with character spans and the tokenizer's offsets,
never from `{% generation %}` markers (many templates, SmolLM2's included, have none), and the
tokens are those of the full text, so training sees exactly what inference will. Loss falls on
every assistant turn plus the end-of-turn token that closes it (found in the template's output,
or appended), on a completion and its EOS, or on the whole text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError


# 2: tool calls, reasoning, per-turn sequences for history-rewriting templates, the Arrow build
DATA_VERSION = 4  # 4: token columns stored as int32

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

def ensure_chat_template(tokenizer, choice: str | None) -> str:
    """Set the tokenizer's template from model.chat_template; return a label for reports."""
    if choice == "chatml" or (choice is None and not getattr(tokenizer, "chat_template", None)):
        tokenizer.chat_template = CHATML_TEMPLATE
        return "chatml (fallback)" if choice is None else "chatml"
    if choice and is_inline_template(choice):
        tokenizer.chat_template = choice
        return "inline template"
    if choice:
        tokenizer.chat_template = Path(choice).read_text(encoding="utf-8")
        return choice
    return "tokenizer"


def is_inline_template(choice: str) -> bool:
    """model.chat_template holds the Jinja text itself rather than a file name."""
    return "{%" in choice or "{{" in choice


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
    """Render a normalized example as one text and mark the characters that carry loss.

    An example that a history-rewriting template turns into several sequences (render_all) is
    refused here: callers that take one text per example cannot train it whole.
    """
    rendered = render_all(example, tokenizer, train_on_prompt)
    if len(rendered) > 1:
        raise UserError(
            "the chat template renders this conversation differently from its prefixes (it rewrites earlier "
            "turns, e.g. drops their reasoning), so it trains as one sequence per assistant turn, which this "
            "command cannot use; set model.chat_template: chatml or a template file"
        )
    return rendered[0]


def render_all(example: dict[str, Any], tokenizer, train_on_prompt: bool = False, apply=None) -> list[Rendered]:
    """Render a normalized example as the sequences it trains, with the characters that carry loss.

    One sequence, unless the template rewrites history (Qwen3 drops the reasoning of turns before
    the last user message): then each assistant turn the full text does not show as it was
    generated is trained in a sequence of its own history, the way the model authors and TRL
    intend. `apply(messages, add_generation_prompt, tools)` renders a chat (default: the
    tokenizer's apply_chat_template; ChatApply is the same template without its per-call cost).
    """
    eos = tokenizer.eos_token or ""
    if "text" in example:
        text = example["text"] + eos
        return [Rendered(text, [(0, len(text))], add_special_tokens=True)]
    if "prompt" in example:
        text = example["prompt"] + example["completion"] + eos
        start = 0 if train_on_prompt else len(example["prompt"])
        return [Rendered(text, [(start, len(text))], add_special_tokens=True)]
    apply = apply or (lambda msgs, add_generation_prompt=False, tools=None: tokenizer.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt))
    return _render_conversation(example["messages"], tokenizer, train_on_prompt, example.get("train_from", 0),
                                example.get("tools"), apply)


class ChatApply:
    """tokenizer.apply_chat_template(..., tokenize=False) for plain JSON messages, at a third of the cost.

    The same compiled template and the same inputs (the special tokens, reasoning aliases) as
    transformers passes it; the data tests check the texts are equal. Built lazily, so it pickles
    into the tokenizing processes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._render = None

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        if self._render is None:
            self._render = self._compile()
        return self._render(messages, add_generation_prompt, tools)

    def _compile(self):
        tok = self.tokenizer
        try:
            from transformers.utils import chat_template_utils as ctu

            template = ctu._compile_jinja_template(tok.chat_template)
            alias = getattr(ctu, "_alias_reasoning_fields", lambda chat: chat)
        except (ImportError, AttributeError, TypeError):  # another transformers, or a dict of named templates
            return lambda msgs, gen, tools: tok.apply_chat_template(msgs, tools=tools, tokenize=False,
                                                                    add_generation_prompt=gen)
        kwargs = dict(tok.special_tokens_map)
        return lambda msgs, gen, tools: template.render(messages=alias(msgs), tools=tools, documents=None,
                                                        add_generation_prompt=gen, **kwargs)

    def __getstate__(self):
        return {"tokenizer": self.tokenizer, "_render": None}


# Over 50 lines by choice: placing each turn in the full text, and splitting off the turns it does not
# show as generated, is one walk over the assistant turns; split up, its invariants would be spread out.
def _render_conversation(messages: list[dict], tokenizer, train_on_prompt: bool, train_from: int,
                         tools: list | None, apply) -> list[Rendered]:
    cache: dict[tuple[int, bool], str] = {}

    def chat(upto: int, prompt: bool = False) -> str:
        if (upto, prompt) not in cache:
            cache[(upto, prompt)] = apply(messages[:upto], add_generation_prompt=prompt, tools=tools)
        return cache[(upto, prompt)]

    messages = [_think_to_reasoning(m, tokenizer) for m in messages]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    out: list[Rendered] = []
    end = len(messages)
    while True:
        full = chat(end)
        if tools and end == len(messages):
            _check_tools_rendered(tools, full)
        spans: list[tuple[int, int]] = []
        inserts: list[int] = []  # positions in `full` where the EOS must be added (template closes with none)
        rest = []
        for i in turns:
            before, through = chat(i, True), chat(i + 1)
            if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
                if i + 1 == end:  # not even its own render starts with its prompt: no mask can be placed
                    raise UserError(
                        "the chat template renders a conversation differently from its prefixes (turn "
                        f"{i}, role assistant), so the loss mask cannot be placed; set model.chat_template: chatml "
                        "or a template file"
                    )
                rest.append(i)
                continue
            start, stop, insert = _turn_span(i, messages[i], before, through, tokenizer)
            spans.append((start, stop))
            if insert is not None:
                inserts.append(insert)
        if inserts:
            full, spans = _insert_eos(full, spans, inserts, tokenizer.eos_token)
        if train_on_prompt:
            spans = [(0, len(full))]
        out.append(Rendered(full, spans))
        if not rest:
            return out[::-1]  # earliest history first
        turns, end = rest, rest[-1] + 1


def _turn_span(i: int, m: dict, before: str, through: str, tokenizer) -> tuple[int, int, int | None]:
    """Where assistant turn i's loss runs in `through` (its prompt ends at len(before)); an EOS position
    to insert when the template closes the turn with none."""
    content = m["content"]
    if content.strip():
        end = through.find(content, len(before))
        if end < 0:  # the template trimmed the content
            content = content.strip()
            end = through.find(content, len(before))
        if end < 0:
            raise UserError(f"the chat template does not render assistant turn {i} verbatim; set model.chat_template")
        content_end = end + len(content)
    else:  # only tool calls (or reasoning): the turn's own text runs to its end-of-turn
        content_end = len(before)
    _check_turn_rendered(i, m, through[len(before):])
    eot = _first_end_of_turn(through[content_end:], tokenizer)
    if eot is not None:
        return len(before), content_end + eot[0] + len(eot[1]), None
    return len(before), content_end, content_end


def _think_to_reasoning(m: dict, tokenizer) -> dict:
    """An assistant turn written as '<think>...</think>answer' becomes reasoning_content + content when the
    template has a place for reasoning (it then renders the block itself); otherwise it stays as written."""
    content = m.get("content") or ""
    if m["role"] != "assistant" or "reasoning_content" in m or not content.lstrip().startswith("<think>"):
        return m
    if "</think>" not in content or "reasoning_content" not in str(tokenizer.chat_template):
        return m
    head, answer = content.split("</think>", 1)
    reasoning = head.lstrip()[len("<think>"):].strip("\n")
    return {**m, "content": answer.lstrip("\n"), "reasoning_content": reasoning}


def _check_tools_rendered(tools: list, full: str) -> None:
    """The declared tools reach the text; a template without tools support would drop them silently."""
    missing = [t["function"]["name"] for t in tools if t["function"]["name"] not in full]
    if missing:
        raise UserError(f"the chat template does not render the `tools` list (no {missing[0]!r} in the text); "
                        "set model.chat_template to a template with tools support (e.g. Qwen2.5's)")


def _check_turn_rendered(i: int, m: dict, turn_text: str) -> None:
    """An assistant turn's reasoning and tool calls appear in its text; a template that drops them would
    train the answer without them, silently."""
    reasoning = (m.get("reasoning_content") or "").strip()
    if reasoning and reasoning not in turn_text:
        raise UserError(f"assistant turn {i}: the chat template does not render its reasoning_content; set "
                        "model.chat_template to a template with reasoning (Qwen3-style) or put it in the content")
    for call in m.get("tool_calls") or []:
        if call["function"]["name"] not in turn_text:
            raise UserError(f"assistant turn {i}: the chat template does not render its tool_calls; set "
                            "model.chat_template to a template with tools support (e.g. Qwen2.5's)")


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


def tokenize_many(rendered: list[Rendered], tokenizer) -> list[tuple[list[int], list[int]]]:
    """tokenize() for many texts in one call into the Rust tokenizer: the same ids and labels, faster.

    Slow (Python) tokenizers and those that split special tokens take the one-by-one path.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "split_special_tokens", False) or backend is None:
        return [tokenize(r, tokenizer) for r in rendered]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets, same ids
    bos = tokenizer.bos_token_id
    lead = [bos] if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []
    pieces: list[str] = []
    plans = []
    for r in rendered:
        cuts = sorted({0, len(r.text)} | {p for span in r.spans for p in span})
        plan = [any(s <= a and b <= e for s, e in r.spans) for a, b in zip(cuts, cuts[1:])]
        pieces += [r.text[a:b] for a, b in zip(cuts, cuts[1:])]
        plans.append(plan)
    # Short pieces repeat (the newline after an end-of-turn, role headers): each distinct one is encoded once.
    short = dict.fromkeys(p for p in pieces if len(p) <= SHORT_PIECE)
    short.update(zip(short, (e.ids for e in encode(list(short), add_special_tokens=False))))
    encoded = iter(encode([p for p in pieces if len(p) > SHORT_PIECE], add_special_tokens=False))
    texts = iter(pieces)
    out = []
    for r, plan in zip(rendered, plans):
        ids = list(lead) if r.add_special_tokens else []
        labels = [-100] * len(ids)
        for trained in plan:
            text = next(texts)
            piece = short[text] if len(text) <= SHORT_PIECE else next(encoded).ids
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        out.append((ids, labels))
    return out


SHORT_PIECE = 16  # characters: pieces up to this long are looked up, not encoded again (tokenize_many)


# --------------------------------------------------------------------------- building datasets



def load_tokenizer(path: str, model=None, padding_side: str = "right"):
    """A tokenizer with a pad token (EOS when it has none): right padding to train, left to generate in batches.

    `model`: the run's ModelSection (revision, trust_remote_code) when loading the base's own tokenizer;
    None for a tokenizer a stage saved (an adapter dir carries the chat template used in training).
    """
    from transformers import AutoTokenizer

    kwargs = {"revision": model.revision, "trust_remote_code": model.trust_remote_code} if model is not None else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"model.name: cannot load a tokenizer from {path} ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def stop_token_ids(target, tokenizer) -> list[int]:
    """End-of-turn ids saved at training time (generation_config.json), else template + EOS."""
    for d in (target.adapter_dir, Path(target.model_path) if target.kind == "merged" else None):
        gen = d / "generation_config.json" if d else None
        if gen and gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                return sorted(set(eos if isinstance(eos, list) else [eos]))
    return stop_ids(tokenizer)
