"""Augmentation (augment.py): off by default, reproducible per (seed, epoch, row), answers and masks intact."""

from __future__ import annotations

import json

import pytest

from peft_pipeline.data.augment import vary
from peft_pipeline.data.augment import AugmentedDataset, shuffle_json
from peft_pipeline.config import ConfigError, DataSection, config_from_dict
from peft_pipeline.data.build import build_datasets, fingerprint
from peft_pipeline.data.formats import Row, normalize
from peft_pipeline.data.template import render, tokenize

from conftest import write_jsonl

ORDER = {"customer": "Ana", "item": "lamps", "quantity": 3, "city": "Oslo", "note": {"gift": True, "wrap": "red"}}
ROWS = [{"instruction": f"Repeat the word {w}.", "input": json.dumps({**ORDER, "word": w}), "output": w}
        for w in ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano"]]
TEMPLATES = ["{instruction}\n\n{input}", "Input:\n{input}\n\nTask: {instruction}", "{input}\n---\n{instruction}"]
SYSTEMS = ["You are precise.", "Answer briefly.", ""]
AUGMENT = {"enabled": True, "probability": 1.0, "system_prompts": SYSTEMS, "instruction_templates": TEMPLATES,
           "shuffle_fields": True}


def section(tmp_path, **augment_settings) -> DataSection:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return DataSection.model_validate({"train": str(path), "cache": False, "augment": augment_settings})


def build(tmp_path, tokenizer, **augment_settings):
    return build_datasets(section(tmp_path, **augment_settings), tokenizer, 256, seed=7, progress=False)[0]


def user_turn(ids, tokenizer) -> str:
    text = tokenizer.decode(ids)
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def trained_text(ids, labels, tokenizer) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])


def test_off_by_default_gives_the_tokens_as_written_and_the_same_cache_key(tmp_path, tokenizer):
    off = build(tmp_path, tokenizer)
    assert type(off).__name__ == "Dataset" and DataSection().augment.enabled is False
    for k, row in enumerate(ROWS):
        ids, labels = tokenize(render(normalize(Row(row, "r"), "alpaca"), tokenizer), tokenizer)
        assert off[k] == {"input_ids": ids, "labels": labels}
    # disabled augment settings and the retention choice do not touch the cache key (or old caches)
    plain = section(tmp_path)
    tweaked = plain.model_copy(update={"augment": plain.augment.model_copy(update={"system_prompts": ["x"]}),
                                       "retention": None})
    assert fingerprint(plain, tokenizer, 256, 7) == fingerprint(tweaked, tokenizer, 256, 7)
    # on, the columns still hold the rows as written; only items served to the DataLoader vary
    on = build(tmp_path, tokenizer, **AUGMENT)
    assert isinstance(on, AugmentedDataset)
    assert on["input_ids"] == off["input_ids"] and on["labels"] == off["labels"]
    assert on.column_names == ["input_ids", "labels"]


def test_variant_depends_only_on_seed_epoch_and_row(tmp_path, tokenizer):
    ds = build(tmp_path, tokenizer, **AUGMENT)
    again = build(tmp_path, tokenizer, **AUGMENT)
    by_epoch = [ds.variant(0, epoch)["input_ids"] for epoch in range(6)]
    assert by_epoch == [again.variant(0, epoch)["input_ids"] for epoch in range(6)]  # same seed+epoch: same
    assert by_epoch[0] == ds.variant(0, 0)["input_ids"]
    assert len({tuple(x) for x in by_epoch}) >= 3  # other epochs: other variants
    assert by_epoch[0] != by_epoch[1]
    # the epoch the trainer sets is the one ds[i] and the DataLoader's batch fetch serve
    ds.set_epoch(1)
    assert ds[0]["input_ids"] == by_epoch[1] == ds.__getitems__([0])[0]["input_ids"]
    # another seed gives other variants
    other = build_datasets(section(tmp_path, **AUGMENT), tokenizer, 256, seed=8, progress=False)[0]
    assert [other.variant(0, e)["input_ids"] for e in range(6)] != by_epoch


def test_json_field_shuffle_keeps_the_object_and_the_answer(tmp_path, tokenizer):
    ds = build(tmp_path, tokenizer, enabled=True, probability=1.0, shuffle_fields=True)
    orders = set()
    for epoch in range(5):
        ids, labels = ds.variant(2, epoch).values()
        instruction, payload = user_turn(ids, tokenizer).split("\n\n", 1)
        assert instruction == ROWS[2]["instruction"]
        assert json.loads(payload) == json.loads(ROWS[2]["input"])  # equal as JSON
        orders.add(payload)
        assert trained_text(ids, labels, tokenizer) == "stone<|im_end|>"  # answer unchanged
    assert len(orders) > 1  # ... but the key order moves
    # nested keys move too; the style (here compact) is kept; non-objects are left alone
    import random

    nested = {str(k): {"a": 1, "b": 2, "c": 3} for k in range(4)}
    out = [shuffle_json(json.dumps(nested, separators=(",", ":")), random.Random(s)) for s in range(6)]
    assert all(json.loads(o) == nested and ", " not in o for o in out) and len(set(out)) > 1
    assert shuffle_json("[1, 2]", random.Random(0)) is None and shuffle_json("not json", random.Random(0)) is None


def test_every_variant_trains_exactly_the_answer_and_its_end_of_turn(tmp_path, tokenizer):
    ds = build(tmp_path, tokenizer, **AUGMENT)
    seen_layouts, seen_systems = set(), set()
    for k, row in enumerate(ROWS):
        for epoch in range(3):
            ids, labels = ds.variant(k, epoch).values()
            assert trained_text(ids, labels, tokenizer) == row["output"] + "<|im_end|>"
            # the trained tokens are exactly the tail of the assistant turn
            first = next(i for i, label in enumerate(labels) if label != -100)
            assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
            text = tokenizer.decode(ids)
            seen_layouts.add(next(t for t in ("Task: ", "\n---\n", "") if t in user_turn(ids, tokenizer)))
            seen_systems.add(next((s for s in SYSTEMS[:2] if s in text), "default"))
    assert seen_layouts == {"Task: ", "\n---\n", ""} and seen_systems == {*SYSTEMS[:2], "default"}


def test_rows_with_their_own_system_message_keep_it(tokenizer):
    from peft_pipeline.config import AugmentSection
    import random

    own = normalize(Row({"instruction": "x", "output": "y", "system": "Row's own."}, "r"), "alpaca", keep_fields=True)
    aug = AugmentSection(enabled=True, probability=1.0, system_prompts=["Other."])
    assert vary(own, aug, None, random.Random(0)) is None  # nothing else to vary: the row as written
    ours = normalize(Row({"instruction": "x", "output": "y"}, "r"), "alpaca", "Default.", keep_fields=True)
    varied = vary(ours, aug, "Default.", random.Random(0))
    assert varied["messages"][0] == {"role": "system", "content": "Other."}


def test_too_long_variant_falls_back_to_the_row_as_written(tmp_path, tokenizer):
    long_system = "Be careful. " * 200
    ds = build_datasets(section(tmp_path, enabled=True, probability=1.0, system_prompts=[long_system]),
                        tokenizer, 128, seed=7, progress=False)[0]
    assert ds.variant(0, 0)["input_ids"] == ds[:1]["input_ids"][0]


def test_config_reports_every_augment_problem_at_once(tmp_path):
    data = {"train": str(write_jsonl(tmp_path / "t.jsonl", ROWS)),
            "augment": {"enabled": True, "instruction_templates": ["{instuction}: {input}", "{input} only", "{x"]}}
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": data, "training": {"packing": True}})
    problems = e.value.problems
    assert any("instruction_templates[0]: unknown placeholder {instuction} (did you mean {instruction}?)" in p
               for p in problems)
    assert any("instruction_templates[1]: needs {instruction}" in p for p in problems)
    assert any("instruction_templates[2]" in p and "literal braces" in p for p in problems)
    assert any(p.startswith("training.packing:") for p in problems)
    with pytest.raises(ConfigError, match="nothing to vary"):
        config_from_dict({"data": {"train": data["train"], "augment": {"enabled": True}}})


def tiny_training(tmp_path, tiny_base, name: str, epochs: int = 2):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return config_from_dict({
        "model": {"name": str(tiny_base)},
        "lora": {"r": 4, "target_modules": "all-linear"},
        "data": {"train": str(data), "cache": False, "augment": AUGMENT},
        "training": {"num_train_epochs": epochs, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_strategy": "no", "max_length": 256, "seed": 3},
        "output_dir": str(tmp_path / name),
    })


def test_training_sees_other_variants_each_epoch_and_is_reproducible(tmp_path, tiny_base, monkeypatch):
    from safetensors.torch import load_file

    from peft_pipeline.tasks import train

    fetched: list[tuple[int, int, tuple[int, ...]]] = []
    original = AugmentedDataset.__getitems__

    def spy(self, keys):
        items = original(self, keys)
        fetched.extend((self.epoch, int(k), tuple(x["input_ids"])) for k, x in zip(keys, items))
        return items

    monkeypatch.setattr(AugmentedDataset, "__getitems__", spy)
    runs = []
    for name in ("a", "b"):
        fetched.clear()
        run = train(tiny_training(tmp_path, tiny_base, name), progress=False)
        runs.append((list(fetched), load_file(run / "adapter" / "adapter_model.safetensors")))
    seen, weights = runs[0]
    by_epoch = {e: {k: ids for ep, k, ids in seen if ep == e} for e in (0, 1)}
    assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == list(range(len(ROWS)))  # each row once per epoch
    assert sum(by_epoch[0][k] != by_epoch[1][k] for k in range(len(ROWS))) >= len(ROWS) // 2
    assert runs[1][0] == seen  # same seed: the same inputs in the same order
    assert weights.keys() == runs[1][1].keys() and all((weights[k] == runs[1][1][k]).all() for k in weights)


def test_inspect_shows_augmented_examples(tmp_path, tiny_base, capsys):
    from peft_pipeline.data.inspect import inspect

    cfg = tiny_training(tmp_path, tiny_base, "inspect")
    inspect(cfg, n=1, plain=True, progress=False)
    out = capsys.readouterr().out
    assert "--- augmented (train example 0, epoch 0)" in out and "--- augmented (train example 0, epoch 1)" in out
    assert out.count("[[apple<|im_end|>]]") == 3  # the row as written and both variants train the same answer
