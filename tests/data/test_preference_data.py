"""Preference rows: detection, one-line row errors, rendering through the chat template, scored tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, write_jsonl
from peft_pipeline.config import config_from_dict
from peft_pipeline.data import preference
from peft_pipeline.data.formats import Row
from peft_pipeline.errors import UserError

USER = [{"role": "user", "content": "What is 2+2?"}]


def pair(chosen="4", rejected="5", prompt=USER):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@pytest.mark.parametrize("row, message", [
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": "4"}]}, "missing field 'rejected'"),
    (pair(rejected=""), "rejected[0] (assistant) is empty"),
    ({"prompt": "2+2=", "chosen": "4", "rejected": "  "}, "empty rejected"),
    (pair(chosen="4", rejected=" 4"), "chosen and rejected are the same answer"),
    ({"prompt": "2+2=", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}, "all be strings or all message lists"),
])
def test_bad_pair_is_one_line_naming_file_and_line(row, message):
    with pytest.raises(UserError) as e:
        preference.read_pair(Row(row, "pairs.jsonl:7"))
    text = str(e.value)
    assert text.startswith("pairs.jsonl:7: ") and message in text and "\n" not in text


def test_ultrafeedback_and_implicit_prompt_rows_read_as_the_same_pair():
    explicit = preference.read_pair(Row(pair(), "f:1"))
    ultrafeedback = preference.read_pair(Row({"prompt": USER, "chosen": USER + pair()["chosen"],
                                              "rejected": USER + pair()["rejected"]}, "f:2"))
    implicit = preference.read_pair(Row({"chosen": USER + pair()["chosen"], "rejected": USER + pair()["rejected"]}, "f:3"))
    assert explicit == ultrafeedback == implicit


def test_pair_renders_as_inference_sees_it_and_scores_exactly_each_answer_and_its_end_of_turn(tokenizer):
    r = preference.render_row(preference.read_pair(Row(pair(chosen='{"a": 1}', rejected='{"a": 2}'), "f:1")), tokenizer)
    assert r["prompt"] == tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert r["chosen"] == '{"a": 1}<|im_end|>' and r["rejected"] == '{"a": 2}<|im_end|>'
    p, (c, rj) = preference.pair_ids(tokenizer, r["prompt"], [r["chosen"], r["rejected"]])
    assert p == tokenizer(r["prompt"])["input_ids"]  # the prompt tokenized alone, as at generation time
    assert tokenizer.decode(c) == '{"a": 1}<|im_end|>' and tokenizer.decode(rj) == '{"a": 2}<|im_end|>'
    assert c[-1] == rj[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # trained to stop, once (no 2nd EOS)
    # string rows stay raw text (as SFT's prompt/completion) and are closed by EOS
    s = preference.render_row({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, tokenizer)
    assert s == {"prompt": "2+2=", "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}


def _cfg(tmp_path, method, rows, **extra):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return config_from_dict({"method": method, "data": {"train": [str(path)]}, "output_dir": str(tmp_path / "run"),
                             **extra})


def test_kto_gets_pairs_unpaired_with_labels_interleaved(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, "kto", [pair(str(i), str(i + 1)) for i in range(4)])
    data = preference.load(cfg, tokenizer)
    assert data.kind == "unpaired" and len(data.train) == 8
    assert [r["label"] for r in data.train] == [True, False] * 4  # every batch of 2+ holds both labels


def test_grpo_reads_alpaca_rows_as_prompt_and_reference_answer(tmp_path, tokenizer):
    row = json.loads((REPO / "data/orders/test.jsonl").read_text().splitlines()[0])
    cfg = _cfg(tmp_path, "grpo", [row], rewards=[{"kind": "exact_match"}])
    (r,) = preference.load(cfg, tokenizer).train
    assert r["answer"] == row["output"]
    assert r["prompt"].endswith("<|im_start|>assistant\n") and row["input"] in r["prompt"]


def test_sft_rows_given_to_dpo_name_the_file(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, "dpo", [{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match=r"rows.jsonl: cannot detect preference rows from columns \['instruction', 'output'\]"):
        preference.load(cfg, tokenizer)


def test_inspect_marks_the_tokens_each_side_is_scored_on(tmp_path, tiny_base, capsys):
    from peft_pipeline.data.inspect import inspect

    cfg = _cfg(tmp_path, "dpo", [pair(chosen="yes", rejected="no")], model={"name": str(tiny_base)})
    assert inspect(cfg, n=1, plain=True) == 0
    out = capsys.readouterr().out
    assert "(chosen: 2 scored tokens)" in out and "<|im_start|>assistant\n[[yes<|im_end|>]]" in out
    assert "<|im_start|>assistant\n[[no<|im_end|>]]" in out


def test_cli_names_the_bad_row_in_one_line_with_exit_code_2(tmp_path, tiny_base):
    rows = [pair(), {"prompt": USER, "chosen": pair()["chosen"], "rejected": pair()["chosen"]}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: dpo\nmodel: {{name: {tiny_base}}}\ndata: {{train: {data}}}\noutput_dir: {tmp_path}/run\n")
    r = subprocess.run([sys.executable, "-m", "peft_pipeline", "validate", str(cfg), "--no-progress"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {data}:2: chosen and rejected are the same answer; a pair needs two "
                                "different ones (fix or drop the row)")


def test_bundled_pairs_are_what_make_pairs_writes_and_every_row_reads(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_pairs", REPO / "data" / "make_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for split in ("train", "validation", "test"):
        committed = REPO / "data" / "orders-pairs" / f"{split}.jsonl"
        assert (tmp_path / "orders-pairs" / f"{split}.jsonl").read_bytes() == committed.read_bytes()
        for i, line in enumerate(committed.read_text().splitlines(), 1):
            r = preference.read_pair(Row(json.loads(line), f"{committed}:{i}"))  # raises on a bad pair
            assert json.loads(r["chosen"][0]["content"]) != json.loads(r["rejected"][0]["content"])


def test_onpolicy_pairs_keep_only_wrong_answers_once_and_every_committed_row_reads():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_onpolicy_pairs", REPO / "data" / "make_onpolicy_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ref = '{"customer": "Mei Ito", "item": "mugs", "quantity": 3, "city": "Oslo"}'
    prompt = [{"role": "user", "content": "Extract..."}]
    records = [{"where": "o.jsonl:1", "prompt": prompt, "completion": f" {ref}\n", "expected": ref},  # right: dropped
               {"where": "o.jsonl:2", "prompt": prompt, "completion": ref.replace("Mei Ito", "Mei"), "expected": ref},
               {"where": "o.jsonl:2", "prompt": prompt, "completion": ref.replace("Mei Ito", "Mei"), "expected": ref},
               {"where": "o.jsonl:3", "prompt": prompt, "completion": "Mei, 3 mugs", "expected": ref, "stopped": False}]
    pairs = module.make_pairs(records)
    assert [(p["source"], p["mistake"], p["stopped"]) for p in pairs] == [("o.jsonl:2", "customer", True),
                                                                         ("o.jsonl:3", "not_json", False)]
    assert pairs[0]["chosen"][0]["content"] == ref and pairs[0]["rejected"][0]["content"] == ref.replace("Mei Ito", "Mei")
    for split in ("train", "validation", "test"):
        committed = REPO / "data" / "orders-pairs" / f"onpolicy-{split}.jsonl"
        for i, line in enumerate(committed.read_text().splitlines(), 1):
            r = preference.read_pair(Row(json.loads(line), f"{committed}:{i}"))
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
