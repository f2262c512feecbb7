"""Classification task on a tiny llama: labels from a column, a head trained in full, metrics, eval, refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peft_pipeline import cli
from peft_pipeline.data.labelled import load_data, read_labelled
from peft_pipeline.evaluate.classify import score_split
from peft_pipeline.model.load import load_classifier
from peft_pipeline.train.classify import attach_adapter
from peft_pipeline.config import ConfigError, DataSource, config_from_dict
from peft_pipeline.errors import UserError
from peft_pipeline.tasks import train

from conftest import REPO, write_jsonl

FILLER = "the a of to and in is it for on with as at by from this that we you they".split()
KEYWORDS = {"apple": "fruit", "hammer": "tool", "violin": "music"}


def keyword_rows(n: int, seed: int) -> list[dict]:
    """Filler words with one keyword at a random position; the keyword decides the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(sorted(KEYWORDS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), key)
        rows.append({"text": " ".join(words), "label": KEYWORDS[key]})
    return rows


def cls_cfg(tmp_path, base, train_rows, eval_rows, **training) -> dict:
    return {
        "task": "classification",
        "model": {"name": str(base)},
        "lora": {"r": 8},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", train_rows)),
                 "eval": str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))},
        "training": {"max_steps": 150, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "logging_steps": 10,
                     "save_steps": 75, "max_length": 64, **training},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.fixture(scope="module")
def keyword_run(tmp_path_factory, tiny_base):
    """One tiny run on the keyword task, shared by the tests that inspect its run dir."""
    tmp = tmp_path_factory.mktemp("cls")
    cfg = config_from_dict(cls_cfg(tmp, tiny_base, keyword_rows(96, 0), keyword_rows(30, 1)))
    return train(cfg, progress=False)


# --------------------------------------------------------------------------- data and labels


def test_labels_come_from_the_column_sorted_or_as_configured(tmp_path, tokenizer):
    rows = [{"msg": "hello there", "y": "greet"}, {"msg": "bye now", "y": "leave"}, {"msg": "hi", "y": "greet"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = config_from_dict({"task": "classification", "data": {"train": str(path), "eval": str(path)},
                            "classification": {"text_column": "msg", "label_column": "y"}})
    data = load_data(cfg, tokenizer)
    assert data.labels == ["greet", "leave"]
    assert data.train["labels"] == [0, 1, 0]
    assert data.train["input_ids"][1] == tokenizer("bye now")["input_ids"]  # raw text, no chat template
    # configured order is the head's order; integer labels become strings
    cfg = config_from_dict({**cfg.model_dump(), "classification": {"text_column": "msg", "label_column": "y",
                                                                   "labels": ["leave", "greet", "other"]}})
    assert load_data(cfg, tokenizer).train["labels"] == [1, 0, 1]
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    got = read_labelled(DataSource(path=str(ints)), cfg.classification.model_copy(
        update={"text_column": "text", "label_column": "label"}))
    assert [label for _, label, _ in got] == ["1", "0"]


def test_columns_rename_and_csv(tmp_path, tokenizer):
    csv = tmp_path / "t.csv"
    csv.write_text("sentence,intent\nwhere is it,track\nstop it,cancel\n")
    cfg = config_from_dict({"task": "classification", "data": {"train": [{"path": str(csv), "columns":
                                                                          {"sentence": "text", "intent": "label"}}]}})
    data = load_data(cfg, tokenizer)
    assert data.labels == ["cancel", "track"] and data.train["labels"] == [1, 0]
    assert data.train["where"] == [f"{csv}:2", f"{csv}:3"]


def test_missing_label_column_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "intent": "y"}])
    cfg = config_from_dict({"task": "classification", "data": {"train": str(path)}})
    with pytest.raises(UserError) as e:
        load_data(cfg, tokenizer)
    assert str(e.value).startswith(f"{path}:2: missing column 'label' (classification.label_column; columns here: "
                                   "intent, text)")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_bad_labels_name_their_row(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}])
    cfg = config_from_dict({"task": "classification", "data": {"train": str(train_path), "eval": str(eval_path)}})
    with pytest.raises(UserError, match=rf"^{eval_path}:2: label 'z' is not a class of this classifier \(x, y\)"):
        load_data(cfg, tokenizer)
    cfg = config_from_dict({**cfg.model_dump(), "classification": {"labels": ["x", "w"]}})
    with pytest.raises(UserError, match=rf"^{train_path}:2: label 'y' is not one of classification.labels"):
        load_data(cfg, tokenizer)
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": 1.5}])
    with pytest.raises(UserError, match=rf"^{bad}:1: label 'label' must be a non-empty string or an integer, got 1.5"):
        read_labelled(DataSource(path=str(bad)), cfg.classification)
    one = write_jsonl(tmp_path / "o.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    cfg = config_from_dict({"task": "classification", "data": {"train": str(one)}})
    with pytest.raises(UserError, match=r"only the label \['x'\]; a classifier needs at least 2"):
        load_data(cfg, tokenizer)


def test_config_problems_for_classification_reported_at_once(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(ConfigError) as e:
        config_from_dict({"task": "classification", "quantization": {"mode": "8bit"},
                          "data": {"train": [{"path": str(path), "format": "alpaca"}], "test": str(path)},
                          "classification": {"labels": ["a", "a"], "label_column": "text"},
                          "training": {"packing": True}})
    problems = e.value.problems
    assert any(p.startswith("quantization.mode: 8bit is not supported with task: classification") for p in problems)
    assert any(p.startswith("data.train[0].format: 'alpaca' is an SFT format") for p in problems)
    assert any(p.startswith("data.test: generation prompts do not apply") for p in problems)
    assert any(p.startswith("classification.labels: duplicate labels ['a']") for p in problems)
    assert any(p.startswith("classification.label_column: equals text_column") for p in problems)
    assert any(p.startswith("training.packing: an SFT setting") for p in problems)
    # the same keys are fine for the default task
    config_from_dict({"data": {"train": str(path)}, "training": {"packing": True}})


# --------------------------------------------------------------------------- metrics on known predictions


class FixedLogits(torch.nn.Module):
    """Returns preset logits per row (looked up by the row's first token), whatever the batch order."""

    def __init__(self, by_first_token: dict[int, list[float]]):
        super().__init__()
        self.by_first_token = by_first_token
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": torch.tensor([self.by_first_token[int(r[0])] for r in input_ids])})()


def test_score_split_on_known_predictions():
    labels = ["a", "b", "c"]
    # rows: true a,a,b,b,c,c ; predicted a,b,b,b,a,c (argmax of the logits below)
    logits = {1: [2, 0, 0], 2: [0, 2, 0], 3: [0, 2, 0], 4: [0, 2, 0], 5: [2, 0, 0], 6: [0, 0, 2]}
    cols = {"input_ids": [[1, 9], [2], [3, 9, 9], [4], [5, 9], [6]], "labels": [0, 0, 1, 1, 2, 2]}
    m = score_split(FixedLogits(logits), cols, labels, pad_id=9, batch_size=4)
    assert m["predicted"] == ["a", "b", "b", "b", "a", "c"]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a 1/2, b 2/3, c 1; recall a 1/2, b 1, c 1/2
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    f1 = [1 / 2, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    nll = torch.nn.functional.cross_entropy(torch.tensor([logits[i] for i in range(1, 7)], dtype=torch.float),
                                            torch.tensor([0, 0, 1, 1, 2, 2]))
    assert m["loss"] == pytest.approx(nll.item())


# --------------------------------------------------------------------------- a tiny run


def test_head_trained_in_full_lora_on_the_body_base_unchanged(keyword_run, tiny_base):
    adapter = keyword_run / "adapter"
    assert {p.name for p in keyword_run.iterdir()} >= {"adapter", "checkpoints", "config.yaml", "log.jsonl", "metrics.json"}
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and "score" in conf["modules_to_save"]
    assert json.loads((adapter / "classification.json").read_text())["labels"] == ["fruit", "music", "tool"]
    saved = load_file(adapter / "adapter_model.safetensors")
    head = saved["base_model.model.score.weight"]
    assert head.shape == (3, 64)  # the whole head (labels x hidden) is saved, not a low-rank update of it
    assert not any("score" in k and "lora_" in k for k in saved)  # no LoRA on the head
    b = [v for k, v in saved.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # LoRA B started at zero and moved

    # the head moved from its seeded initialization: rebuild the untrained model the same way
    from transformers import set_seed

    cfg = config_from_dict(yaml.safe_load((keyword_run / "config.yaml").read_text()))
    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(adapter)
    set_seed(cfg.seed)
    fresh = attach_adapter(load_classifier(cfg, str(tiny_base), ["fruit", "music", "tool"],
                                                             tok.pad_token_id), cfg)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "score.modules_to_save" in n for n in trainable)
    init = fresh.base_model.model.score.modules_to_save["default"].weight
    assert not torch.allclose(init, head)

    # the frozen body on disk is what we started from
    base = load_file(tiny_base / "model.safetensors")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_classifier(cfg, str(tiny_base), ["fruit", "music", "tool"],
                                                                  tok.pad_token_id), adapter)
    checked = 0
    for name, p in reloaded.base_model.model.named_parameters():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base:
            assert torch.equal(p, base[key]), name
            checked += 1
    assert checked > 10


def test_tiny_run_learns_the_keyword_task(keyword_run):
    m = json.loads((keyword_run / "metrics.json").read_text())
    assert m["status"] == "complete" and m["task"] == "classification" and m["labels"] == ["fruit", "music", "tool"]
    assert m["before"]["accuracy"] < 0.6  # a random head: about chance (1/3)
    assert m["eval"]["accuracy"] >= 0.9 and m["eval"]["macro_f1"] >= 0.9
    assert m["eval"]["n"] == 30 and sum(map(sum, m["eval"]["confusion_matrix"]["matrix"])) == 30
    assert m["global_steps"] == 150 and m["head_params"] == 3 * 64
    log = [json.loads(line) for line in (keyword_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][:3] == [10, 20, 30]


def test_eval_on_the_run_dir_gives_the_metrics_json_numbers(keyword_run, capsys):
    metrics = json.loads((keyword_run / "metrics.json").read_text())["eval"]
    assert cli.main(["eval", str(keyword_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix:" in out and "true \\ pred  fruit  music  tool" in out
    report = json.loads((keyword_run / "eval.json").read_text())
    got = report["classification"]["adapter"]
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert got[key] == metrics[key], key
    assert got["confusion_matrix"] == metrics["confusion_matrix"]
    assert got["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    assert len(report["predictions"]) == 30 and {"prompt", "expected", "adapter"} <= set(report["predictions"][0])
    # --data FILE: another labelled file, the run's columns
    other = write_jsonl(keyword_run.parent / "other.jsonl", keyword_rows(12, 7))
    assert cli.main(["eval", str(keyword_run), "--data", str(other), "--no-progress"]) == 0
    report = json.loads((keyword_run / "eval.json").read_text())
    assert report["classification"]["data"] == str(other) and report["classification"]["adapter"]["n"] == 12


def test_eval_with_an_unknown_label_is_one_line_exit_2(keyword_run, capsys):
    bad = write_jsonl(keyword_run.parent / "bad.jsonl", [{"text": "apple of", "label": "fruit"},
                                                         {"text": "a spoon", "label": "cutlery"}])
    assert cli.main(["eval", str(keyword_run), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}:2: label 'cutlery' is not a class of this classifier (fruit, music, tool); "
                   "it never appears in the training data"]


@pytest.mark.parametrize("argv,says", [
    (["eval", "{run}", "--compare-base"], "--compare-base does not apply to a classification run: the base has no trained head"),
    (["merge", "{run}"], "merge is not supported for task: classification"),
    (["export", "{run}"], "GGUF holds language models, not a classification head; use --format adapter"),
    (["generate", "{run}", "--prompt", "hi"], "it predicts labels, not text"),
])
def test_stages_that_do_not_apply_refuse_in_one_line(keyword_run, capsys, argv, says):
    assert cli.main([a.format(run=keyword_run) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {keyword_run}") and says in err[0]


def test_bundled_classify_config_reads_the_bundled_intents(monkeypatch, tokenizer):
    from peft_pipeline.config import load_config

    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "classify.yaml")
    assert cfg.task == "classification"
    data = load_data(cfg, tokenizer)
    assert data.labels == ["cancel", "change_address", "complaint", "refund", "track"]
    assert len(data.train["input_ids"]) == 300 and len(data.eval["input_ids"]) == 100
    assert max(map(len, data.train["input_ids"])) <= cfg.max_length  # nothing dropped
