"""Augmentation: prompt variations of training rows, drawn on the fly, a different one each epoch.

What varies (data.augment; config.AugmentSection), only ever in the prompt:
- the system message of rows that have none of their own (one of `system_prompts`);
- the layout of an alpaca row's user turn (one of `instruction_templates`, e.g. "Input:\n{input}\n\nTask: {instruction}");
- the key order of a prompt that is a JSON object (`shuffle_fields`): the alpaca input, or a whole user turn.
Answers are never touched, and a variant is rendered and masked by the same data.render/tokenize
as every other row, so its trained tokens are still exactly each answer plus its end-of-turn.

Reproducible: row i in epoch e is varied (with `probability`) by random.Random(f"{seed}:{e}:{i}"),
so reruns, several processes and resumed runs all see the same variant. The trainer's epoch
reaches the dataset through EpochCallback (on_epoch_begin, from TrainerState.epoch: after a
resume it is the checkpoint's epoch). A variant longer than training.max_length, or left with
nothing to learn, falls back to the row as written (whose tokens are known to fit).

How it plugs into TRL: SFTTrainer accepts only a `datasets.Dataset`, and prepares it with
`Dataset.map` (which would bake one variant in), so the rows come in an AugmentedDataset, a
Dataset whose items are drawn when the DataLoader asks for them, and train.make_sft_config tells
TRL to skip preparation (the data stage already tokenized, masked and length-checked every row).
Its columns stay the rows as written, so lengths, inspect and preflight read the originals.
"""

from __future__ import annotations

import json
import random
import string
from typing import Any

from datasets import Dataset

from peft_pipeline.config import AugmentSection, DataSection
from peft_pipeline.data.formats import alpaca_user_turn


def template_fields(template: str) -> set[str]:
    """Placeholder names in an instruction template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def shuffle_json(text: str, rng: random.Random) -> str | None:
    """The JSON object in `text` with its keys (also nested ones) in a random order; None if not an object.

    Serialized in the original's style (compact, default, or indented), so only the order changes.
    """
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict) or not obj:
        return None

    def shuffled(value):
        if isinstance(value, dict):
            items = list(value.items())
            rng.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v) for v in value]
        return value

    stripped = text.strip()
    if json.dumps(obj, ensure_ascii=False, separators=(",", ":")) == stripped:
        style: dict[str, Any] = {"separators": (",", ":")}
    elif "\n" in stripped:
        style = {"indent": 2}
    else:
        style = {}
    return json.dumps(shuffled(obj), ensure_ascii=False, **style)


# Over 50 lines by choice: the draws must stay in one fixed order (system, fields, template) for a seed to
# give one variant, and one function keeps that order visible.
def vary(example: dict[str, Any], aug: AugmentSection, system_prompt: str | None,
         rng: random.Random) -> dict[str, Any] | None:
    """A varied copy of a normalized conversational example; None when nothing applies to it.

    Draws happen in a fixed order (system, fields, template) so a seed gives one answer.
    """
    if "messages" not in example:
        return None  # raw text and raw prompt/completion rows have no turns to vary
    messages = [dict(m) for m in example["messages"]]
    train_from = example.get("train_from", 0)
    changed = False
    if aug.system_prompts:
        choice = rng.choice(aug.system_prompts)
        has_system = messages[0]["role"] == "system"
        # A system message the row brought itself is part of its task: leave it. One added from
        # data.system_prompt (or none at all) is ours to vary.
        if not has_system or messages[0]["content"] == system_prompt:
            shift = 0
            if has_system:
                messages.pop(0)
                shift -= 1
            if choice.strip():
                messages.insert(0, {"role": "system", "content": choice})
                shift += 1
            train_from = train_from + shift if train_from else 0
            changed = True
    fields = example.get("fields")
    if fields is not None:  # alpaca: rebuild the user turn from instruction and input
        instruction, extra = fields["instruction"], fields["input"]
        if aug.shuffle_fields and extra.strip():
            extra = shuffle_json(extra, rng) or extra
        has_input = bool(extra.strip())
        fitting = [t for t in aug.instruction_templates if ("input" in template_fields(t)) == has_input]
        if fitting:
            content = rng.choice(fitting).format(instruction=instruction, input=extra)
        else:
            content = alpaca_user_turn(instruction, extra)  # as data.normalize lays it out
        user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        changed = changed or content != messages[user]["content"]
        messages[user]["content"] = content
    elif aug.shuffle_fields:
        for m in messages:
            if m["role"] == "user":
                new = shuffle_json(m["content"], rng)
                if new is not None:
                    m["content"], changed = new, True
    if not changed:
        return None
    out = {"messages": messages}
    if train_from:
        out["train_from"] = train_from
    return out


class _Shared:
    """What every copy of an AugmentedDataset shares: the rows' examples, settings and the current epoch.

    Trainer and TRL copy datasets (remove_columns deep-copies); the epoch set on one copy must reach the
    copy the DataLoader reads, so deepcopy returns this same object.
    """

    def __init__(self, examples: list[str], tokenizer, settings: DataSection, max_length: int | None, seed: int):
        self.examples, self.tokenizer, self.settings = examples, tokenizer, settings
        self.max_length, self.seed, self.epoch = max_length, seed, 0

    def __deepcopy__(self, memo):
        return self


class AugmentedDataset(Dataset):
    """The training rows as written (its columns), served varied per epoch to the DataLoader (`ds[i]`)."""

    _shared: _Shared

    @classmethod
    def wrap(cls, ds: Dataset, tokenizer, settings: DataSection, max_length: int | None, seed: int) -> "AugmentedDataset":
        """From the data stage's train Dataset, whose 'example' column holds each row's normalized example (JSON)."""
        examples = ds["example"]
        base = ds.remove_columns("example").flatten_indices()
        out = cls(base.data, info=base.info, split=base.split, fingerprint=base._fingerprint)
        out._shared = _Shared(list(examples), tokenizer, settings, max_length, seed)
        return out

    @property
    def epoch(self) -> int:
        """The epoch whose variants `ds[i]` returns."""
        return self._shared.epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch `epoch`'s variants from now on."""
        self._shared.epoch = int(epoch)

    def variant(self, index: int, epoch: int | None = None) -> dict[str, list[int]]:
        """input_ids and labels of row `index` as trained in `epoch` (default: the current one)."""
        from peft_pipeline.data.template import render, tokenize

        sh = self._shared
        epoch = sh.epoch if epoch is None else epoch
        row = super().__getitem__(index)
        rng = random.Random(f"{sh.seed}:{epoch}:{index}")
        aug = sh.settings.augment
        if rng.random() >= aug.probability:
            return row
        varied = vary(json.loads(sh.examples[index]), aug, sh.settings.system_prompt, rng)
        if varied is None:
            return row
        ids, labels = tokenize(render(varied, sh.tokenizer, sh.settings.train_on_prompt), sh.tokenizer)
        if (sh.max_length and len(ids) > sh.max_length) or all(label == -100 for label in labels):
            return row
        return {"input_ids": ids, "labels": labels}

    def __getitem__(self, key):
        if isinstance(key, int) or (hasattr(key, "__index__") and not isinstance(key, (str, bool))):
            return self.variant(int(key))
        return super().__getitem__(key)  # columns, slices: the rows as written

    def __getitems__(self, keys: list) -> list:
        # torch's DataLoader fetches a batch through here
        return [self.variant(int(k)) for k in keys]
