"""Forgetting check (retention.py): scoring, base vs adapter, the end-of-training hook and eval --retention."""

from __future__ import annotations

import json

import pytest

from peft_pipeline.evaluate.retention import BUNDLED, MAX_NEW_TOKENS, check, load
from peft_pipeline.errors import UserError
from peft_pipeline.evaluate.retention import Item, compare, is_correct, summary_line

from conftest import make_run, make_tiny_llama, write_jsonl

ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in ["apple", "river", "stone", "cloud"]]
PROMPTS = ["What is the capital of France?", "What is 2 + 2?", "What is the opposite of hot?", "Name a colour.",
           "Say hello.", "Count to three.", "What do bees make?", "Which animal says moo?"]


def test_answers_match_whole_words_after_normalizing():
    assert is_correct("The capital of France is PARIS.", ["Paris"])
    assert is_correct("It is four", ["4", "four"])
    assert not is_correct("It is 14.", ["4"])  # not inside a number
    assert not is_correct("about 3.09", ["3"]) and not is_correct("-18.0 degrees", ["0"])
    assert not is_correct("he scolded me", ["cold"])
    assert is_correct("H2O, of course", ["H2O"]) and is_correct("100 degrees", ["100"])


def test_compare_sorts_prompts_into_retained_lost_gained():
    items = [Item(p, [e], f"f:{i}") for i, (p, e) in enumerate([("a?", "x"), ("b?", "y"), ("c?", "z"), ("d?", "w")])]
    result = compare(items, base_answers=["x", "y", "no", "no"], adapter_answers=["x", "nope", "z", "no"])
    assert (result["n"], result["base"], result["adapter"]) == (4, 2, 2)
    assert result["retained"] == ["a?"] and result["lost"] == ["b?"] and result["gained"] == ["c?"]
    assert result["answers"][1] == {"prompt": "b?", "expected": ["y"], "base": "y", "adapter": "nope",
                                    "base_correct": True, "adapter_correct": False}
    assert summary_line(result) == "retention: 1/2 kept (base 2/4, adapter 2/4), lost: 'b?', gained: 'c?'"


def test_bundled_set_loads_and_holds_the_base_answers():
    items = load(BUNDLED)
    assert 30 <= len(items) <= 60
    rows = [json.loads(line) for line in BUNDLED.read_text().splitlines()]
    # every kept prompt was answered right by the embedded base (recorded by data/make_retention.py)
    assert all(is_correct(r["base_answer"], r["expected"]) for r in rows)


def test_bad_retention_files_name_the_line(tmp_path):
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"prompt": "a?", "expected": "x"}\n{"prompt": "b?"}\n')
    with pytest.raises(UserError, match=r"r.jsonl:2: 'expected' must be"):
        load(bad)
    bad.write_text('{"prompt": "a?", "expected": "x"\n')
    with pytest.raises(UserError, match=r"r.jsonl:1: malformed JSON"):
        load(bad)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny base whose greedy answers are words, not blank: with tied embeddings a random model echoes the newline."""
    return make_tiny_llama(tmp_path_factory.mktemp("untied") / "base", tokenizer, tie_word_embeddings=False)


def base_answers(model_dir, tokenizer, prompts) -> list[str]:
    """What the tiny base says to each prompt, greedy, as the check asks it."""
    from transformers import AutoModelForCausalLM

    from peft_pipeline.evaluate.generate import Prompt, Sampling, generate

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    got = generate(model, tokenizer, [Prompt(messages=[{"role": "user", "content": p}]) for p in prompts],
                   [tokenizer.eos_token_id], Sampling(max_new_tokens=MAX_NEW_TOKENS))
    return [a.text for a in got]


def own_answers_file(path, model_dir, tokenizer):
    """A retention file whose expected answers are what this base generates (so the base scores n/n)."""
    rows = [{"prompt": p, "expected": a} for p, a in zip(PROMPTS, base_answers(model_dir, tokenizer, PROMPTS))
            if a.strip() and is_correct(a, [a])]
    assert len(rows) >= 4
    return write_jsonl(path, rows), len(rows)


def test_random_adapter_loses_what_the_base_answered(tmp_path, base, tokenizer):
    from peft_pipeline.data.template import stop_token_ids
    from peft_pipeline.model.load import load_model
    from peft_pipeline.rundir import resolve

    file, n = own_answers_file(tmp_path / "own.jsonl", base, tokenizer)
    run = make_run(tmp_path, base, tokenizer, ROWS)  # LoRA B random: the adapter changes the outputs
    target = resolve(run)
    model = load_model(target)
    result = check(model, tokenizer, load(file), stop_token_ids(target, tokenizer))
    assert result["base"] == n  # adapter off: the base's own answers
    assert result["adapter"] < n and result["lost"]
    assert len(result["retained"]) + len(result["lost"]) == n and result["gained"] == []


def test_training_writes_the_retention_section(tmp_path, base, tokenizer, capsys):
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    file, n = own_answers_file(tmp_path / "own.jsonl", base, tokenizer)
    cfg = config_from_dict({
        "model": {"name": str(base)}, "lora": {"r": 4},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", ROWS)), "cache": False, "retention": str(file)},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_strategy": "no",
                     "max_length": 128},
        "output_dir": str(tmp_path / "run"),
    })
    run = train(cfg, progress=False)
    section = json.loads((run / "metrics.json").read_text())["retention"]
    assert section["file"] == str(file) and section["n"] == n and section["base"] == n
    assert len(section["retained"]) + len(section["lost"]) == n and len(section["answers"]) == n
    assert f"retention: {len(section['retained'])}/{n} kept" in capsys.readouterr().out
    # off for a base other than the embedded one unless asked: no section, no cost
    cfg2 = config_from_dict({**cfg.model_dump(mode="json"), "output_dir": str(tmp_path / "run2"),
                             "data": {**cfg.data.model_dump(mode="json"), "retention": "auto"}})
    assert "retention" not in json.loads((train(cfg2, progress=False) / "metrics.json").read_text())


def test_eval_retention_flag(tmp_path, base, tokenizer, capsys):
    from peft_pipeline.cli import main

    file, n = own_answers_file(tmp_path / "own.jsonl", base, tokenizer)
    run = make_run(tmp_path, base, tokenizer, ROWS)
    assert main(["eval", str(run), "--retention", str(file), "--no-progress"]) == 0
    section = json.loads((run / "eval.json").read_text())["retention"]
    assert section["base"] == n and section["lost"]
    assert f"retention: {len(section['retained'])}/{n} kept" in capsys.readouterr().out
    # summary shows it too
    assert main(["summary", str(run)]) == 0
    assert f"retention: {len(section['retained'])}/{n} kept" in capsys.readouterr().out
