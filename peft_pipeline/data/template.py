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
