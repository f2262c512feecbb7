"""Replay (data.replay): general rows mixed into training at a fraction, seeded, counted in the data report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from peft_pipeline.config import ConfigError, DataSection, config_from_dict
from peft_pipeline.data.build import REPLAY_BUNDLED, build_datasets, fingerprint
from peft_pipeline.evaluate.retention import BUNDLED as RETENTION_BUNDLED

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in
        ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano"] * 5]  # 40 task rows


def section(tmp_path, replay) -> DataSection:
    return DataSection.model_validate({"train": str(write_jsonl(tmp_path / "train.jsonl", ROWS)), "cache": False,
                                       "replay": replay})


def decoded_prompts(ds, tokenizer) -> list[str]:
    return [tokenizer.decode(ids).split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0] for ids in ds["input_ids"]]


def test_replay_mixes_the_fraction_seeded_and_reports_both_sources(tmp_path, tokenizer):
    train, _, report = build_datasets(section(tmp_path, 0.2), tokenizer, 256, seed=7, progress=False)
    # 0.2 of the mixture: 10 replay rows for 40 task rows
    assert len(train) == 50
    assert [(s.get("replay", False), s["rows"], s["used"]) for s in report.sources] == [
        (False, 40, 40), (True, sum(1 for _ in REPLAY_BUNDLED.open()), 10)]
    assert any(line.startswith("data: replay ") and line.endswith("-> 10 used") for line in report.lines())
    prompts = decoded_prompts(train, tokenizer)
    assert sum(not p.startswith("Repeat the word") for p in prompts) == 10
    again = decoded_prompts(build_datasets(section(tmp_path, 0.2), tokenizer, 256, seed=7, progress=False)[0], tokenizer)
    other = decoded_prompts(build_datasets(section(tmp_path, 0.2), tokenizer, 256, seed=8, progress=False)[0], tokenizer)
    assert again == prompts and other != prompts  # the seed picks the replay rows
    # replay changes the tokens, so the cache key; no replay keeps the key it always had
    assert fingerprint(section(tmp_path, 0.2), tokenizer, 256, 7) != fingerprint(section(tmp_path, None), tokenizer, 256, 7)


def test_replay_from_a_file_repeats_a_small_set(tmp_path, tokenizer):
    own = write_jsonl(tmp_path / "own.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                               for q, a in (("Say hi.", "Hi."), ("Say bye.", "Bye."))])
    train, _, report = build_datasets(section(tmp_path, {"fraction": 0.5, "path": str(own)}), tokenizer, 256, seed=7,
                                      progress=False)
    assert report.sources[1] == {"path": str(own), "format": "messages", "rows": 2, "used": 40, "replay": True}
    prompts = decoded_prompts(train, tokenizer)
    assert prompts.count("Say hi.") == prompts.count("Say bye.") == 20


def test_replay_settings_are_checked(tmp_path):
    base = {"data": {"train": str(write_jsonl(tmp_path / "t.jsonl", ROWS))}}
    assert config_from_dict({**base, "data": {**base["data"], "replay": 0.3}}).data.replay.fraction == 0.3
    with pytest.raises(ConfigError) as e:
        config_from_dict({**base, "data": {**base["data"], "replay": {"fraction": 1.5, "path": "nope/x.jsonl"}}})
    assert "data.replay.fraction" in str(e.value)
    with pytest.raises(ConfigError, match=r"data.replay.path.*nope/x.jsonl does not exist"):
        config_from_dict({**base, "data": {**base["data"], "replay": {"fraction": 0.2, "path": "nope/x.jsonl"}}})


def test_bundled_replay_set_is_the_script_output_and_never_asks_a_retention_question():
    sys.path.insert(0, str(ROOT / "data"))
    import make_replay

    rows = [json.loads(line) for line in REPLAY_BUNDLED.read_text().splitlines()]
    assert rows == make_replay.rows() and 300 <= len(rows) <= 500
    assert len({r["instruction"] for r in rows}) == len(rows)
    assert make_replay.overlaps(rows, RETENTION_BUNDLED) == []
    # the check does catch a retention question, reworded or not
    assert make_replay.overlaps([{"instruction": "Which city is the capital of France?"}], RETENTION_BUNDLED)


@pytest.mark.slow
def test_self_replay_trains_on_the_base_own_answers_cached(tmp_path, tokenizer, monkeypatch):
    import peft_pipeline.evaluate.generate as gen
    from peft_pipeline.config import config_from_dict
    from peft_pipeline.errors import UserError
    from peft_pipeline.tasks import train

    from conftest import make_tiny_llama

    monkeypatch.setenv("PEFT_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("peft_pipeline.train.self_replay.MAX_NEW_TOKENS", 4)  # 346 questions: keep it short
    # untied embeddings: a random tiny model then answers with words, not an echoed newline
    base = make_tiny_llama(tmp_path / "base", tokenizer, tie_word_embeddings=False)
    cfg = config_from_dict({
        "model": {"name": str(base)}, "lora": {"r": 4},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", ROWS)), "cache": False, "retention": None,
                 "replay": {"fraction": 0.2, "path": "self"}, "val_fraction": 0.1},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", "max_length": 256},
        "output_dir": str(tmp_path / "run"),
    })
    # a random model never says its stop token, and unfinished answers are no replay rows
    with pytest.raises(UserError, match="the base finished none of its 346 answers within 4 tokens"):
        train(cfg, progress=False)
    real, seen = gen.generate, {}

    def stops_every_second(*args, **kwargs):  # as if the base had finished every other answer
        got = real(*args, **kwargs)
        seen["answers"] = [a.text for a in got]
        for i, a in enumerate(got):
            a.stopped = i % 2 == 0
        return got

    monkeypatch.setattr(gen, "generate", stops_every_second)
    run = train(config_from_dict({**cfg.model_dump(mode="json"), "output_dir": str(tmp_path / "run1")}), progress=False)
    files = list((tmp_path / "cache" / "replay-self").glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    questions = [json.loads(line)["instruction"] for line in REPLAY_BUNDLED.read_text().splitlines()]
    # the base's own greedy answers to the bundled questions, the unfinished ones left out
    assert [r["instruction"] for r in rows] == [q for i, (q, a) in enumerate(zip(questions, seen["answers"]))
                                                 if i % 2 == 0 and a.strip()]
    assert [r["output"] for r in rows] == [a.strip() for i, a in enumerate(seen["answers"]) if i % 2 == 0 and a.strip()]
    report = json.loads((run / "metrics.json").read_text())["data"]
    assert report["sources"][1]["replay"] and report["sources"][1]["path"] == str(files[0])
    assert report["sources"][1]["used"] == 10  # 0.2 of the mixture for 40 task rows
    # eval rebuilds the held-out split from the same mixture: the self-replay file the run trained on
    from peft_pipeline.cli import main

    assert main(["eval", str(run), "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())["loss"]["data"] == "val_fraction=0.1 of train"
    # the config as written still says 'self'; a second run reuses the cached answers
    assert "path: self" in (run / "config.yaml").read_text()
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("asked the base again"))
    train(config_from_dict({**cfg.model_dump(mode="json"), "output_dir": str(tmp_path / "run2")}), progress=False)
