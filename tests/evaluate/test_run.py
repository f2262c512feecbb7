"""Eval stage: loss/perplexity against a hand computation, eval.json contents (base vs adapter),
run/adapter/merged targets, and one-line errors with exit codes on bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama, write_jsonl
from peft_pipeline.cli import main
from peft_pipeline.evaluate.run import evaluate, load_loss_data, validation_loss
from peft_pipeline.evaluate.generate import Sampling, generate, read_prompts
from test_generate import ROWS, TEST_ROWS, make_run


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory, tokenizer) -> Path:
    """A tiny llama with its own LM head, so greedy answers vary (a tied one repeats the last token)."""
    return make_tiny_llama(tmp_path_factory.mktemp("untied") / "base", tokenizer, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, untied_base, tokenizer) -> Path:
    """A run dir shared by the read-only tests of this module."""
    return make_run(tmp_path_factory.mktemp("evalrun"), untied_base, tokenizer)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- loss -------------------------------------------------------------------------------------


def manual_loss(model, columns) -> tuple[float, int]:
    """Mean over every labelled position of -log p(label | tokens before it), one example at a time."""
    nll, n = 0.0, 0
    for ids, labels in zip(columns["input_ids"], columns["labels"]):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(1, len(ids)):
            if labels[t] != -100:
                nll -= logp[t - 1, labels[t]].item()
                n += 1
    return nll / n, n


def test_loss_and_perplexity_equal_a_manual_computation(tiny_run, tokenizer):
    from peft_pipeline.data.template import load_tokenizer
    from peft_pipeline.model.load import load_model
    from peft_pipeline.rundir import resolve

    target = resolve(tiny_run)
    tok = load_tokenizer(target.tokenizer_dir, padding_side="left")
    data = load_loss_data(target, tok, None, None, progress=False)  # the config's data.eval
    columns = data["columns"]
    assert len(columns["input_ids"]) == len(ROWS) - 1
    assert len({len(x) for x in columns["input_ids"]}) > 1  # batches need padding
    model = load_model(target)
    expected, n_tokens = manual_loss(model, columns)
    # Only answer tokens (and the closing <|im_end|>) carry loss.
    assert n_tokens == sum(sum(label != -100 for label in ls) for ls in columns["labels"])
    for batch_size in (1, 3, 8):  # token-weighted: the batching must not change the number
        got = validation_loss(model, columns, tok.pad_token_id, batch_size=batch_size)
        assert got["tokens"] == n_tokens and got["examples"] == len(ROWS) - 1
        assert got["loss"] == pytest.approx(expected, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_loss_on_a_given_file_uses_the_run_template_and_masks(tiny_run, tmp_path):
    from peft_pipeline.data.template import load_tokenizer
    from peft_pipeline.rundir import resolve
    from peft_pipeline.data.formats import Row, normalize
    from peft_pipeline.data.template import render, tokenize

    target = resolve(tiny_run)
    tok = load_tokenizer(target.tokenizer_dir, padding_side="left")
    path = write_jsonl(tmp_path / "extra.jsonl", ROWS[:2])
    data = load_loss_data(target, tok, str(path), limit=None, progress=False)
    want = [tokenize(render(normalize(Row(r, "x"), "alpaca"), tok), tok) for r in ROWS[:2]]
    assert data["columns"]["input_ids"] == [ids for ids, _ in want]
    assert data["columns"]["labels"] == [labels for _, labels in want]
    assert load_loss_data(target, tok, str(path), limit=1, progress=False)["columns"]["input_ids"] == [want[0][0]]


# --- eval.json ----------------------------------------------------------------------------------


def test_eval_compare_base_writes_every_prediction(tmp_path, untied_base, tokenizer, capsys):
    from peft_pipeline.data.template import load_tokenizer, stop_token_ids
    from peft_pipeline.model.load import load_model
    from peft_pipeline.rundir import resolve

    run = make_run(tmp_path, untied_base, tokenizer)
    assert main(["eval", str(run), "--compare-base", "--max-new-tokens", "6", "--batch-size", "3"]) == 0
    report = json.loads((run / "eval.json").read_text())

    assert report["models"] == ["base", "adapter"]
    preds = report["predictions"]
    assert len(preds) == len(TEST_ROWS)
    assert [p["expected"] for p in preds] == [r["output"] for r in TEST_ROWS]
    for p in preds:
        assert set(p) >= {"where", "prompt", "expected", "base", "adapter", "stopped"}
        assert p["prompt"][-1]["role"] == "user" and set(p["stopped"]) == {"base", "adapter"}
    for name in ("base", "adapter"):
        m = report["generation"]["metrics"][name]
        assert m["n"] == len(TEST_ROWS) and m["kind"] == "json"
        assert {"exact_match", "normalized_match", "json", "stopped_rate", "mean_new_tokens"} <= set(m)
        assert report["loss"][name]["tokens"] > 0
        assert report["loss"][name]["perplexity"] == pytest.approx(math.exp(report["loss"][name]["loss"]))

    # The predictions are what generate() gives; base = the adapter switched off = the plain base model.
    target = resolve(run)
    tok = load_tokenizer(target.tokenizer_dir, padding_side="left")
    prompts = read_prompts(target.config.data.test)
    stop = stop_token_ids(target, tok)
    adapter = generate(load_model(target), tok, prompts, stop, Sampling(max_new_tokens=6))
    base_model = load_model(target, with_adapter=False)
    base = generate(base_model, tok, prompts, stop, Sampling(max_new_tokens=6))
    assert [p["adapter"] for p in preds] == [a.text for a in adapter]
    assert [p["base"] for p in preds] == [b.text for b in base]
    assert [p["base"] for p in preds] != [p["adapter"] for p in preds]  # the random LoRA changes answers
    columns = load_loss_data(target, tok, None, None, progress=False)["columns"]
    assert report["loss"]["base"]["loss"] == pytest.approx(validation_loss(base_model, columns, tok.pad_token_id)["loss"], rel=1e-5)
    assert report["loss"]["base"]["loss"] != pytest.approx(report["loss"]["adapter"]["loss"], rel=1e-4)

    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "adapter"]
    assert any(line.startswith("val loss") for line in out.splitlines())
    assert any(line.startswith("json.all_fields_correct") for line in out.splitlines())
    assert f"{Path(target.config.data.test)}:1" in out  # an example row


def test_eval_on_adapter_dir_and_merged_dir(tmp_path, tiny_run, tokenizer, capsys):
    # An adapter dir inside a run: settings from the run's config.yaml, report in the run dir.
    report = evaluate(tiny_run / "adapter", sampling=Sampling(max_new_tokens=3), limit=2, progress=False)
    assert report["target"]["kind"] == "adapter" and report["models"] == ["adapter"]
    assert len(report["predictions"]) == 2 and report["loss"]["adapter"]["examples"] == 2
    assert json.loads((tiny_run / "eval.json").read_text()) == json.loads(json.dumps(report, default=str))

    # A merged model dir: no config to read, so data and prompts come from the flags.
    merged = make_tiny_llama(tmp_path / "merged", tokenizer, tie_word_embeddings=False)
    prompts = write_jsonl(tmp_path / "p.jsonl", TEST_ROWS[:2])
    report = evaluate(merged, data=str(prompts), prompts=str(prompts), sampling=Sampling(max_new_tokens=3), progress=False)
    assert report["models"] == ["merged"] and (merged / "eval.json").is_file()
    assert len(report["predictions"]) == 2 and report["loss"]["merged"]["examples"] == 2
    capsys.readouterr()
    assert main(["eval", str(merged)]) == 2  # nothing to evaluate without a config or flags
    assert "nothing to evaluate" in one_line_error(capsys)


def test_eval_label_task_prints_a_confusion_matrix(tmp_path, tiny_run, capsys):
    rows = [{"instruction": f"Sentiment of review {i}?", "output": lab} for i, lab in enumerate(["positive", "negative"] * 3)]
    prompts = write_jsonl(tmp_path / "labels.jsonl", rows)
    report = evaluate(tiny_run, prompts=str(prompts), sampling=Sampling(max_new_tokens=2), progress=False)
    metrics = report["generation"]["metrics"]["adapter"]
    assert metrics["kind"] == "label" and metrics["label"]["confusion_matrix"]["labels"] == ["negative", "positive"]
    assert "confusion matrix (adapter)" in capsys.readouterr().out


# --- bad input ----------------------------------------------------------------------------------


def test_malformed_prompts_line_is_one_line_with_file_and_line(tmp_path, tiny_run, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TEST_ROWS[0]) + "\n" + json.dumps(TEST_ROWS[1])[:-5] + "\n")
    assert main(["eval", str(tiny_run), "--prompts", str(bad)]) == 1
    assert f"{bad}:2: malformed JSON" in one_line_error(capsys)

    no_answer = write_jsonl(tmp_path / "open.jsonl", [TEST_ROWS[0], {"instruction": "Say hi."}])
    assert main(["eval", str(tiny_run), "--prompts", str(no_answer)]) == 1
    assert f"{no_answer}:2: missing field 'output'" in one_line_error(capsys)


def test_run_dir_without_adapter_and_missing_paths(tmp_path, tiny_run, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tiny_run / "config.yaml", unfinished / "config.yaml")
    assert main(["eval", str(unfinished)]) == 1
    assert "no adapter/" in one_line_error(capsys)

    assert main(["eval", str(tmp_path / "nope")]) == 1
    assert "does not exist" in one_line_error(capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 1
    assert "holds no adapter" in one_line_error(capsys)


def test_usage_errors_exit_2(tmp_path, tiny_run, tokenizer, capsys):
    merged = make_tiny_llama(tmp_path / "merged", tokenizer)
    capsys.readouterr()
    assert main(["eval", str(merged), "--compare-base"]) == 2
    assert "--compare-base" in one_line_error(capsys)
    assert main(["eval", str(tiny_run), "--batch-size", "0"]) == 2
    assert "--batch-size" in one_line_error(capsys)
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    assert e.value.code == 2


def test_missing_data_test_file_says_how_to_fix(tmp_path, tiny_run, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "moved"
    shutil.copytree(tiny_run, run)
    cfg = (run / "config.yaml").read_text().replace(str(Path(tiny_run).parent / "data" / "test.jsonl"), "data/test.jsonl")
    (run / "config.yaml").write_text(cfg)
    assert main(["eval", str(run)]) == 1
    err = one_line_error(capsys)
    assert "data.test: data/test.jsonl not found" in err and "--prompts" in err
