"""The bundled datasets in data/: reproducible from data/make_data.py, well-formed, and as the README describes."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from conftest import REPO

import pytest

DATA = REPO / "data"
FILES = {
    "orders/train.jsonl": 400, "orders/validation.jsonl": 40, "orders/test.jsonl": 40,
    "chat/train.jsonl": 80, "chat/validation.jsonl": 10, "longtail/train.jsonl": 600,
    "intents/train.jsonl": 300, "intents/validation.jsonl": 100,
    "tools/train.jsonl": 60, "tools/validation.jsonl": 10,
}
ORDER_KEYS = ["customer", "item", "quantity", "city"]


def read(rel: str) -> list[dict]:
    with open(DATA / rel, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_generator_reproduces_committed_files(tmp_path):
    # Run as the README says, so the CLI (default seed, --out) is what gets checked.
    proc = subprocess.run([sys.executable, str(DATA / "make_data.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    produced = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert produced == sorted(FILES)
    for rel in FILES:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), (
            f"data/{rel} differs from the generator's output; regenerate with `python data/make_data.py`")


@pytest.mark.parametrize("rel", sorted(FILES))
def test_row_counts(rel):
    assert len(read(rel)) == FILES[rel]


@pytest.mark.parametrize("rel", ["orders/train.jsonl", "orders/validation.jsonl", "orders/test.jsonl"])
def test_orders_schema(rel):
    for row in read(rel):
        assert list(row) == ["instruction", "input", "output"]
        assert all(isinstance(v, str) and v for v in row.values())
        out = json.loads(row["output"])
        assert list(out) == ORDER_KEYS
        assert type(out["quantity"]) is int and out["quantity"] > 0
        # Extraction, not invention: every string field is a span of the sentence.
        for key in ("customer", "item", "city"):
            assert out[key] in row["input"], (key, row)


def test_orders_splits_are_disjoint():
    train = {r["input"] for r in read("orders/train.jsonl")}
    val = {r["input"] for r in read("orders/validation.jsonl")}
    test = {r["input"] for r in read("orders/test.jsonl")}
    assert len(train) == 400 and len(val) == 40 and len(test) == 40  # no duplicates within a split
    assert not train & val and not train & test and not val & test


def test_orders_have_variety():
    rows = read("orders/train.jsonl")
    spelled = sum(any(w in r["input"].lower().split() for w in ("one", "two", "three", "four", "five", "six"))
                  for r in rows)
    assert spelled >= 20, "some quantities should be spelled out"
    assert len({json.loads(r["output"])["city"] for r in rows}) >= 15


@pytest.mark.parametrize("rel", ["chat/train.jsonl", "chat/validation.jsonl"])
def test_chat_schema(rel):
    for row in read(rel):
        assert list(row) == ["messages"]
        msgs = row["messages"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"] for m in msgs)
        if msgs[0]["role"] == "system":
            msgs = msgs[1:]
        # Alternating user/assistant, 2-3 turns, ending on the assistant (so every turn has a target).
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert 2 <= len(msgs) // 2 <= 3


def test_chat_validation_not_in_train():
    train = {json.dumps(r) for r in read("chat/train.jsonl")}
    assert not any(json.dumps(r) in train for r in read("chat/validation.jsonl"))


def test_longtail_lengths_are_long_tailed():
    from transformers import AutoTokenizer

    from peft_pipeline.paths import embedded_base_dir

    tok = AutoTokenizer.from_pretrained(embedded_base_dir())
    rows = read("longtail/train.jsonl")
    assert all(list(r) == ["instruction", "input", "output"] for r in rows)
    # Measured the way training sees a row: chat-templated, default system prompt included.
    lens = sorted(
        len(tok.apply_chat_template(
            [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]},
             {"role": "assistant", "content": r["output"]}],
            tokenize=True, return_dict=False))
        for r in rows)
    assert 120 <= statistics.median(lens) <= 180
    assert lens[int(0.99 * len(lens))] >= 600
    assert 1000 <= lens[-1] <= 2048
    assert (DATA / "longtail/train.jsonl").stat().st_size < 3_000_000


INTENTS = ["cancel", "change_address", "complaint", "refund", "track"]


@pytest.mark.parametrize("rel,per_class", [("intents/train.jsonl", 60), ("intents/validation.jsonl", 20)])
def test_intents_schema_and_balance(rel, per_class):
    rows = read(rel)
    assert all(list(r) == ["text", "label"] and isinstance(r["text"], str) and r["text"].strip() for r in rows)
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in INTENTS}
    assert counts == dict.fromkeys(INTENTS, per_class)
    # shuffled, not grouped by class: no run of 10 rows with one label
    labels = [r["label"] for r in rows]
    assert not any(len(set(labels[i:i + 10])) == 1 for i in range(len(labels) - 9))


def test_intents_validation_not_in_train_and_not_keyword_trivial():
    train = read("intents/train.jsonl")
    val = {r["text"] for r in read("intents/validation.jsonl")}
    assert len(val) == 100 and not val & {r["text"] for r in train}
    # the class name (or its obvious keyword) is absent from many messages of that class
    keyword = {"cancel": "cancel", "change_address": "address", "complaint": "complain", "refund": "refund", "track": "track"}
    missing = sum(keyword[r["label"]] not in r["text"].lower() for r in train)
    assert missing >= len(train) // 2

