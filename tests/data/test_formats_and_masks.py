"""Data stage: every format renders with the chat template and carries loss on exactly the right tokens."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_pipeline.config import DataSection, DataSource
from peft_pipeline.data.build import DataReport, build_datasets, load_examples, split_holdout
from peft_pipeline.data.formats import Row, detect_format, normalize, read_source
from peft_pipeline.data.template import CHATML_TEMPLATE, end_of_turn, render, tokenize
from peft_pipeline.errors import UserError

from conftest import decoded_runs, write_jsonl

EOT = "<|im_end|>"


def trained_text(example, tokenizer, train_on_prompt=False) -> str:
    ids, labels = tokenize(render(example, tokenizer, train_on_prompt), tokenizer)
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])


def trained_runs(example, tokenizer) -> list[str]:
    """Contiguous runs of trained tokens, decoded: one per assistant turn."""
    return decoded_runs(*tokenize(render(example, tokenizer), tokenizer), tokenizer)


# --------------------------------------------------------------------------- formats and masks


def test_alpaca_trains_only_the_answer_and_its_end_of_turn(tokenizer):
    ex = normalize(Row({"instruction": "Add.", "input": "2 + 2", "output": "4"}, "r"), "alpaca")
    assert ex["messages"][0] == {"role": "user", "content": "Add.\n\n2 + 2"}
    r = render(ex, tokenizer)
    ids, labels = tokenize(r, tokenizer)
    trained = [k for k, label in enumerate(labels) if label != -100]
    # exactly two trained positions: "4" and <|im_end|>, at the end (the final "\n" is not trained)
    assert [tokenizer.decode([ids[k]]) for k in trained] == ["4", EOT]
    assert trained == [len(ids) - 3, len(ids) - 2]
    assert tokenizer.decode([ids[-1]]) == "\n" and labels[-1] == -100
    # labels equal the input ids where trained (the model shifts them itself)
    assert all(labels[k] == ids[k] for k in trained)


def test_multi_turn_messages_train_every_assistant_turn(tokenizer):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]}
    ex = normalize(Row(row, "r"), "messages")
    assert trained_runs(ex, tokenizer) == ["Hello!" + EOT, "4" + EOT]
    assert "Be brief" not in trained_text(ex, tokenizer)


def test_sharegpt_maps_speakers_and_masks_like_messages(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                             {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]}
    assert detect_format(row.keys(), row) == "sharegpt"
    ex = normalize(Row(row, "r"), "sharegpt")
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant", "user", "assistant"]
    assert trained_runs(ex, tokenizer) == ["Yo" + EOT, "Ciao" + EOT]


def test_prompt_completion_strings_train_completion_and_eos(tokenizer):
    ex = normalize(Row({"prompt": "Q: capital of France?\nA:", "completion": " Paris"}, "r"), "prompt_completion")
    assert trained_text(ex, tokenizer) == " Paris" + tokenizer.eos_token
    assert trained_text(ex, tokenizer, train_on_prompt=True).startswith("Q: capital")


def test_prompt_completion_messages_train_only_the_completion(tokenizer):
    row = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}],
           "completion": [{"role": "assistant", "content": "d"}]}
    ex = normalize(Row(row, "r"), "prompt_completion")
    assert trained_runs(ex, tokenizer) == ["d" + EOT]


def test_text_format_trains_everything_and_appends_eos(tokenizer):
    ex = normalize(Row({"text": "Once upon a time"}, "r"), "text")
    ids, labels = tokenize(render(ex, tokenizer), tokenizer)
    assert all(label != -100 for label in labels)
    assert tokenizer.decode(ids) == "Once upon a time" + tokenizer.eos_token


def test_train_on_prompt_trains_the_whole_conversation(tokenizer):
    ex = normalize(Row({"instruction": "Add.", "output": "4"}, "r"), "alpaca")
    ids, labels = tokenize(render(ex, tokenizer, train_on_prompt=True), tokenizer)
    assert all(label != -100 for label in labels)


def test_system_prompt_is_added_when_missing(tokenizer):
    ex = normalize(Row({"instruction": "x", "output": "y"}, "r"), "alpaca", system_prompt="You extract.")
    assert ex["messages"][0] == {"role": "system", "content": "You extract."}
    assert "You extract." in render(ex, tokenizer).text


def test_template_without_end_of_turn_gets_eos_appended_and_trained(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # a template that closes turns with a newline only: the EOS must still be learned
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    ex = normalize(Row(row, "r"), "messages")
    assert trained_runs(ex, tok) == ["Yo" + tok.eos_token, "Ciao" + tok.eos_token]
    assert render(ex, tok).text.count(tok.eos_token) == 2


def test_chatml_fallback_ends_assistant_turns_with_eos(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = CHATML_TEMPLATE
    tok.eos_token = "<|endoftext|>"
    assert end_of_turn(tok) == "<|endoftext|>"
    ex = normalize(Row({"instruction": "x", "output": "y"}, "r"), "alpaca")
    assert trained_runs(ex, tok) == ["y<|endoftext|>"]


def test_template_that_rewrites_history_is_refused(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # renders only the last two messages: prefixes are not prefixes of the whole
    tok.chat_template = "{% for m in messages[-2:] %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    with pytest.raises(UserError, match="chat template"):
        render(normalize(Row(row, "r"), "messages"), tok)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30)), min_size=1, max_size=4),
       st.booleans())
def test_mask_covers_exactly_assistant_content_plus_end_of_turn(tokenizer, turns, with_system):
    """Property: for any conversation, trained tokens decode to each assistant turn + <|im_end|>."""
    turns = [(u, a) for u, a in turns if u.strip() and a.strip() and EOT not in u + a and "<|im_start|>" not in u + a]
    if not turns:
        return
    messages = [{"role": "system", "content": "S"}] if with_system else []
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    ex = normalize(Row({"messages": messages}, "r"), "messages")
    ids, labels = tokenize(render(ex, tokenizer), tokenizer)
    trained_ids = [i for i, label in zip(ids, labels) if label != -100]
    # exactly the tokens of each answer followed by its end-of-turn, nothing else
    expected = [t for _, a in turns for t in tokenizer(a + EOT, add_special_tokens=False)["input_ids"]]
    assert trained_ids == expected
    # and they decode back to the answers wherever the tokenizer itself round-trips the text
    if all(tokenizer.decode(tokenizer(a, add_special_tokens=False)["input_ids"]) == a for _, a in turns):
        assert tokenizer.decode(trained_ids) == "".join(a + EOT for _, a in turns)


# --------------------------------------------------------------------------- bad rows and files


@pytest.mark.parametrize("row, fmt, message", [
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"instruction": "x", "output": 5}, "alpaca", "'output' must be a string"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages", "ends with a user turn"),
    ({"messages": [{"role": "wizard", "content": "a"}]}, "messages", "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}, "messages", "is empty"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"conversations": [{"from": "bot", "value": "a"}]}, "sharegpt", "unknown speaker 'bot'"),
])
def test_bad_rows_name_the_row_and_the_problem(row, fmt, message):
    with pytest.raises(UserError, match=message) as e:
        normalize(Row(row, "data/x.jsonl:7"), fmt)
    assert str(e.value).startswith("data/x.jsonl:7: ") and "\n" not in str(e.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=rf"{p}:2: malformed JSON"):
        read_source(DataSource(path=str(p)))


def test_non_utf8_bytes_are_a_one_line_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(UserError, match=rf"{p}:2: not valid UTF-8"):
        read_source(DataSource(path=str(p)))


def test_unknown_columns_and_empty_files_are_errors(tmp_path):
    with pytest.raises(UserError, match="cannot detect the data format"):
        detect_format(["question", "answer"])
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no rows"):
        load_examples([DataSource(path=str(empty))], None, 0, DataReport())


def test_json_csv_and_column_renames(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"q": "x", "a": "y"}]))
    (tmp_path / "b.csv").write_text("instruction,output\nx,y\n")
    rows = read_source(DataSource(path=str(tmp_path / "a.json"), columns={"q": "instruction", "a": "output"}))
    assert rows[0].data == {"instruction": "x", "output": "y"}
    assert read_source(DataSource(path=str(tmp_path / "b.csv")))[0].data == {"instruction": "x", "output": "y"}


def test_mixture_weights_and_max_samples(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    report = DataReport()
    ex = load_examples([DataSource(path=str(a), max_samples=4, weight=2.0), DataSource(path=str(b), weight=0.5)], None, 0, report)
    assert [s["used"] for s in report.sources] == [8, 5]
    assert len(ex) == 13
    assert len({e["text"] for e in ex if e["text"].startswith("a")}) == 4


def test_holdout_split_is_deterministic_and_disjoint():
    ex = [{"text": str(i)} for i in range(50)]
    tr1, ev1 = split_holdout(ex, 0.2, seed=3)
    tr2, ev2 = split_holdout(ex, 0.2, seed=3)
    assert ev1 == ev2 and len(ev1) == 10 and len(tr1) == 40
    assert not {e["text"] for e in tr1} & {e["text"] for e in ev1}
    assert split_holdout(ex, 0.2, seed=4)[1] != ev1


# --------------------------------------------------------------------------- datasets, lengths, cache


def _settings(path, **kw) -> DataSection:
    return DataSection(train=[DataSource(path=str(path))], **kw)


def test_overlong_examples_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    rows = [{"instruction": "x", "output": "short"}, {"instruction": "x", "output": "word " * 200}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, report = build_datasets(_settings(p, cache=False), tokenizer, 64, 0, progress=False)
    assert len(train) == 1 and report.dropped_overlong == 1
    train, _, report = build_datasets(_settings(p, cache=False, overlong="truncate"), tokenizer, 64, 0, progress=False)
    assert len(train) == 2 and report.truncated == 1 and max(len(x) for x in train["input_ids"]) == 64


def test_max_length_shorter_than_every_example_is_an_error(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(UserError, match="training.max_length: no training example is left"):
        build_datasets(_settings(p, cache=False), tokenizer, 8, 0, progress=False)


def test_truncation_that_leaves_no_loss_drops_the_example(tmp_path, tokenizer):
    rows = [{"instruction": "word " * 100, "output": "y"}, {"instruction": "x", "output": "y"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _, report = build_datasets(_settings(p, cache=False, overlong="truncate"), tokenizer, 40, 0, progress=False)
    assert len(train) == 1 and report.dropped_no_loss == 1


def test_duplicates_are_reported(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}] * 3)
    _, _, report = build_datasets(_settings(p, cache=False), tokenizer, 128, 0, progress=False)
    assert report.duplicates == 2
    assert any("2 duplicate" in line for line in report.lines())


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "a", "output": "b"}])
    root = tmp_path / "cache"
    s = _settings(p)
    _, _, r1 = build_datasets(s, tokenizer, 128, 0, cache_root=root, progress=False)
    _, _, r2 = build_datasets(s, tokenizer, 128, 0, cache_root=root, progress=False)
    assert r1.cache.startswith("written") and r2.cache.startswith("hit")
    # a changed file, setting or template is a new cache entry
    write_jsonl(p, [{"instruction": "x", "output": "z"}])
    t3, _, r3 = build_datasets(s, tokenizer, 128, 0, cache_root=root, progress=False)
    assert r3.cache.startswith("written") and len(t3) == 1
    _, _, r4 = build_datasets(_settings(p, train_on_prompt=True), tokenizer, 128, 0, cache_root=root, progress=False)
    assert r4.cache.startswith("written")
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = CHATML_TEMPLATE
    _, _, r5 = build_datasets(s, tok, 128, 0, cache_root=root, progress=False)
    assert r5.cache.startswith("written")
    assert len(list(root.iterdir())) == 4


def test_eval_split_comes_from_val_fraction_when_no_eval_file(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    train, evals, report = build_datasets(_settings(p, cache=False, val_fraction=0.25), tokenizer, 128, 0, progress=False)
    assert len(train) == 15 and len(evals) == 5 and report.examples == {"train": 15, "eval": 5}
