"""Inspect stage: the trained tokens it shows are the trainer's, its warnings fire on bad data and templates."""

from __future__ import annotations

import re

import yaml

from peft_pipeline.cli import main
from peft_pipeline.config import config_from_dict
from peft_pipeline.data.inspect import SHADES, collect, mark_ansi, mark_plain, template_checks, text_histogram

from conftest import write_jsonl

ROWS = [{"instruction": "question", "output": "answer"},
        {"instruction": "Name a colour.", "output": "Blue is a colour that many people like a lot."}]
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Drops system messages and ignores add_generation_prompt: both must be flagged.
BAD_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}"
)


def cfg_dict(tmp_path, tiny_base, rows=ROWS, **extra):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    d = {"model": {"name": str(tiny_base)}, "data": {"train": str(data), "cache": False},
         "training": {"max_length": 128}, "output_dir": str(tmp_path / "run")}
    for key, value in extra.items():
        section, name = key.split("__")
        d[section][name] = value
    return d


def write_cfg(tmp_path, d) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_plain_form_marks_exactly_the_answer_and_its_end_of_turn(tmp_path, tiny_base):
    ins, tok = collect(config_from_dict(cfg_dict(tmp_path, tiny_base)), n=1)
    ids, labels = ins.examples[0]
    text = mark_plain(ids, labels, tok)
    assert re.findall(r"\[\[(.*?)\]\]", text, flags=re.S) == ["answer<|im_end|>"]
    assert text.replace("[[", "").replace("]]", "") == tok.decode(ids)
    assert "<|im_start|>user\nquestion<|im_end|>" in text
    assert ins.trained[0] == sum(label != -100 for label in labels) == len(tok("answer<|im_end|>")["input_ids"])
    assert not ins.warnings  # SmolLM2's default system prompt is a note, not a warning
    assert any("default system prompt" in n for n in ins.notes)


def test_ansi_form_shades_the_same_tokens(tmp_path, tiny_base):
    ins, tok = collect(config_from_dict(cfg_dict(tmp_path, tiny_base)), n=2)
    for ids, labels in ins.examples:
        coloured = mark_ansi(ids, labels, tok)
        assert SHADES[0] in coloured
        assert ANSI.sub("", coloured) == tok.decode(ids)
    # each trained token of the first example gets its own shaded piece
    ids, labels = ins.examples[0]
    assert len(re.findall(r"\x1b\[30;(?:42|102)m", mark_ansi(ids, labels, tok))) == ins.trained[0]


def test_counts_histogram_and_exit_code_0(tmp_path, tiny_base, capsys):
    path = write_cfg(tmp_path, cfg_dict(tmp_path, tiny_base))
    assert main(["inspect", path, "--plain", "--n", "1", "--png", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "train.jsonl (alpaca): 2 rows -> 2 examples" in out
    assert "formats: alpaca 2" in out
    assert "examples: 2 train, 0 eval" in out
    assert "[[answer<|im_end|>]]" in out and "train example 1" not in out
    assert "no warnings" in out
    assert (tmp_path / "plots" / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_truncated_answers_warn_about_the_missing_end_of_turn_and_exit_1(tmp_path, tiny_base, capsys):
    d = cfg_dict(tmp_path, tiny_base, rows=[ROWS[0], ROWS[0]], data__overlong="truncate")
    ins, tok = collect(config_from_dict(d), n=2)
    cut = len(ins.examples[0][0]) - 2  # both lose "<|im_end|>\n"; "answer" stays
    d["training"]["max_length"] = cut
    path = write_cfg(tmp_path, d)
    assert main(["inspect", path, "--plain"]) == 1
    out = capsys.readouterr().out
    assert "warning: data: 2 training examples have a trained span without the end-of-turn token '<|im_end|>'" in out
    assert "2 truncated" in out


def test_examples_with_no_trained_token_warn(tmp_path, tiny_base, capsys):
    rows = ROWS + [{"instruction": "word " * 60, "output": "short"}]
    d = cfg_dict(tmp_path, tiny_base, rows=rows, data__overlong="truncate")
    d["training"]["max_length"] = 50  # the long prompt fills it before the answer starts
    assert main(["inspect", write_cfg(tmp_path, d), "--plain"]) == 1
    assert "warning: data: 1 examples have no trained token and were dropped" in capsys.readouterr().out


def test_a_template_that_drops_the_system_turn_and_the_generation_prompt_warns(tmp_path, tiny_base, tokenizer, capsys):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = BAD_TEMPLATE
    warnings, _ = template_checks(tok)
    assert any("drops the system message" in w for w in warnings)
    assert any("ignores add_generation_prompt" in w for w in warnings)
    assert template_checks(tokenizer)[0] == []

    template = tmp_path / "bad.jinja"
    template.write_text(BAD_TEMPLATE)
    path = write_cfg(tmp_path, cfg_dict(tmp_path, tiny_base, model__chat_template=str(template)))
    assert main(["inspect", path, "--plain"]) == 1
    assert "warning: chat template: drops the system message" in capsys.readouterr().out


def test_config_errors_exit_2_before_anything_loads(tmp_path, tiny_base, capsys):
    d = cfg_dict(tmp_path, tiny_base)
    d["data"]["train"] = str(tmp_path / "missing.jsonl")
    assert main(["inspect", write_cfg(tmp_path, d)]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert main(["inspect", write_cfg(tmp_path, cfg_dict(tmp_path, tiny_base)), "--n", "-1"]) == 2
    assert "--n: must be 0 or more" in capsys.readouterr().err


def test_text_histogram_puts_every_example_in_a_bucket():
    lengths = [10, 11, 12, 20, 35, 35, 99]
    lines = text_histogram(lengths, bins=5, width=10)
    assert sum(int(line.split()[-1]) for line in lines) == len(lengths)
    assert lines[0].strip().startswith("10-")
    assert text_histogram([]) == ["  (no examples)"]
