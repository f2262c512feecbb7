"""Forgetting check (retention.py): scoring, base vs adapter, the reference asked before training for any base,
the end-of-training hook, the evaluation-time metric, early stopping on it, and eval --retention."""

from __future__ import annotations

import json

import pytest

from peft_pipeline.evaluate.retention import BUNDLED, MAX_NEW_TOKENS, REFERENCE, check, load, rng_kept
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
    # the same number with zero decimals is right; other decimals are another number
    assert is_correct("approximately 100.0 degrees", ["100"]) and is_correct("at 100.00.", ["100"])
    assert not is_correct("about 100.5 degrees", ["100"]) and not is_correct("100.05", ["100"])
    assert not is_correct("1,000 people", ["1"])


def test_compare_sorts_prompts_into_retained_lost_gained():
    items = [Item(p, [e], f"f:{i}") for i, (p, e) in enumerate([("a?", "x"), ("b?", "y"), ("c?", "z"), ("d?", "w")])]
    result = compare(items, base_answers=["x", "y", "no", "no"], adapter_answers=["x", "nope", "z", "no"])
    assert (result["n"], result["base"], result["adapter"]) == (4, 2, 2)
    assert result["retained"] == ["a?"] and result["lost"] == ["b?"] and result["gained"] == ["c?"]
    assert result["answers"][1] == {"prompt": "b?", "expected": ["y"], "base": "y", "adapter": "nope",
                                    "base_correct": True, "adapter_correct": False, "same": False}
    assert (result["kept"], result["same"]) == (1, 2)  # a? and d? answered as the base did
    assert summary_line(result) == "retention: 1/2 kept (base 2/4, adapter 2/4), lost: 'b?', gained: 'c?'"


def test_prompts_without_expected_answers_are_scored_against_the_base():
    items = [Item("a?", [], "f:1"), Item("b?", [], "f:2"), Item("c?", ["x"], "f:3")]
    result = compare(items, base_answers=["Paris.", "four", "x"], adapter_answers=["paris", "4", "no"])
    # the base's answer is the key: normalized equality keeps a?, loses b?; c? has its own key
    assert (result["base"], result["adapter"], result["kept"], result["same"]) == (3, 1, 1, 1)
    assert result["lost"] == ["b?", "c?"]


def test_rng_kept_leaves_every_generator_where_it_was():
    import random

    import numpy as np
    import torch

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    with rng_kept():
        random.random(), np.random.rand(5), torch.rand(7), torch.randn(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_bundled_set_loads_and_holds_the_base_answers():
    items = load(BUNDLED)
    assert 30 <= len(items) <= 60
    rows = [json.loads(line) for line in BUNDLED.read_text().splitlines()]
    # every kept prompt was answered right by the embedded base (recorded by data/make_retention.py)
    assert all(is_correct(r["base_answer"], r["expected"]) for r in rows)


def test_bad_retention_files_name_the_line(tmp_path):
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"prompt": "a?", "expected": "x"}\n{"prompt": "b?", "expected": []}\n{"prompt": "c?", "expected": 3}\n')
    with pytest.raises(UserError, match=r"r.jsonl:3: 'expected' must be"):
        load(bad)
    bad.write_text('{"prompt": "a?", "expected": "x"}\n{"prompt": "b?"}\n')
    assert [it.expected for it in load(bad)] == [["x"], []]  # no expected: the base's answer is the key
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


def train_config(tmp_path, base, name: str, **data):
    from peft_pipeline.config import config_from_dict

    return config_from_dict(train_dict(tmp_path, base, name, **data))


def train_dict(tmp_path, base, name: str, **data) -> dict:
    return {
        "model": {"name": str(base)}, "lora": {"r": 4},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", ROWS)), "cache": False, **data},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_strategy": "no",
                     "max_length": 128},
        "output_dir": str(tmp_path / name),
    }


def test_training_writes_the_retention_section(tmp_path, base, tokenizer, capsys):
    from peft_pipeline.tasks import train

    file, n = own_answers_file(tmp_path / "own.jsonl", base, tokenizer)
    run = train(train_config(tmp_path, base, "run", retention=str(file)), progress=False)
    section = json.loads((run / "metrics.json").read_text())["retention"]
    assert section["file"] == str(file) and section["n"] == n and section["base"] == n
    assert len(section["retained"]) + len(section["lost"]) == n and len(section["answers"]) == n
    assert section["kept"] == len(section["retained"])
    assert f"retention: {len(section['retained'])}/{n} kept" in capsys.readouterr().out


def test_any_base_is_checked_against_its_own_answers_asked_before_training(tmp_path, base, tokenizer):
    """'auto' (the default) on a base other than the embedded one: the bundled prompts, the base's answers as reference."""
    from peft_pipeline.tasks import train

    mine = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": p} for p in PROMPTS[:4]])  # no expected answers
    for name, setting, prompts in (("auto", "auto", [it.prompt for it in load(BUNDLED)]), ("mine", str(mine), PROMPTS[:4])):
        run = train(train_config(tmp_path, base, name, retention=setting), progress=False)
        reference = [json.loads(line) for line in (run / REFERENCE).read_text().splitlines()]
        # the reference is what the untrained base says, asked exactly as the check asks
        assert [r["prompt"] for r in reference] == prompts
        assert [r["base"] for r in reference] == base_answers(base, tokenizer, prompts)
        section = json.loads((run / "metrics.json").read_text())["retention"]
        assert section["n"] == len(prompts) and section["reference"] == str(run / REFERENCE)
        assert [a["base"] for a in section["answers"]] == [r["base"] for r in reference]
    assert section["base"] == 4  # no expected answers: every base answer is right by definition
    assert section["kept"] == section["same"]  # ... and kept means answered as the base did
    off = train(train_config(tmp_path, base, "off", retention=None), progress=False)
    assert "retention" not in json.loads((off / "metrics.json").read_text()) and not (off / REFERENCE).exists()


def test_top_layers_training_gets_the_check_too(tmp_path, base, tokenizer):
    """No adapter to switch off: the reference asked before training is the base."""
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    file, n = own_answers_file(tmp_path / "own.jsonl", base, tokenizer)
    cfg = train_config(tmp_path, base, "top", retention=str(file))
    cfg = config_from_dict({**cfg.model_dump(mode="json"), "freeze": {"method": "top_layers", "top_layers": 1}})
    run = train(cfg, progress=False)
    section = json.loads((run / "metrics.json").read_text())["retention"]
    assert section["base"] == n and len(section["answers"]) == n
    # eval --retention on it: no adapter to switch off, so the saved reference is the base
    from peft_pipeline.cli import main

    assert main(["eval", str(run), "--retention", "--no-progress"]) == 0
    again = json.loads((run / "eval.json").read_text())["retention"]
    assert again["file"] == str(run / REFERENCE) and again["answers"] == section["answers"]


def test_merged_model_is_checked_against_its_runs_reference(tmp_path, base, tokenizer):
    """A merged dir has no adapter to switch off: eval --retention finds the reference its run saved before
    training (merge_report.json names the run), and the merged model answers as the adapter did."""
    from peft_pipeline.cli import main
    from peft_pipeline.tasks import train

    file, n = own_answers_file(tmp_path / "own.jsonl", base, tokenizer)
    run = train(train_config(tmp_path, base, "run", retention=str(file)), progress=False)
    trained = json.loads((run / "metrics.json").read_text())["retention"]
    merged = tmp_path / "elsewhere" / "merged"  # not under the run: found through merge_report.json
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    assert main(["eval", str(merged), "--retention", "--no-progress"]) == 0
    section = json.loads((merged / "eval.json").read_text())["retention"]
    assert section["file"] == str(run / REFERENCE) and section["n"] == n
    assert [a["base"] for a in section["answers"]] == [a["base"] for a in trained["answers"]]
    assert [a["adapter"] for a in section["answers"]] == [a["adapter"] for a in trained["answers"]]
    assert main(["eval", str(base), "--retention", "--no-progress"]) == 2  # a bare model: no run, no reference


def test_retention_at_evaluations_drives_early_stopping(tmp_path, base, tokenizer, capsys):
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.tasks import train

    file, n = own_answers_file(tmp_path / "own.jsonl", base, tokenizer)
    data = train_dict(tmp_path, base, "es", retention=str(file), retention_eval=True,
                      eval=str(write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])))
    data["training"].update(max_steps=6, learning_rate=5e-2, save_strategy="steps")
    data["early_stopping"] = {"patience": 1, "metric": "retention", "eval_steps": 2}
    run = train(config_from_dict(data), progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    scored = [r for r in log if "eval_retention" in r]
    assert scored and all(0 <= r["eval_retention"] <= n for r in scored)
    assert [r["step"] for r in scored] == sorted({r["step"] for r in log if "eval_loss" in r})[:len(scored)]
    metrics = json.loads((run / "metrics.json").read_text())
    # higher is better for retention: the best checkpoint holds the most kept prompts seen at any evaluation
    assert metrics["best_metric"] == max(r["eval_retention"] for r in scored)
    assert "retention " in capsys.readouterr().out


def test_retention_eval_needs_evaluations(tmp_path, base):
    from peft_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.retention_eval: scores at evaluations"):
        train_config(tmp_path, base, "x", retention_eval=True)


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
