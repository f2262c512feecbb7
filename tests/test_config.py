"""Config: schema, overrides, every problem reported at once with key paths, every bundled YAML valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peft_pipeline.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config
from peft_pipeline.errors import UserError

from conftest import REPO, write_jsonl


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x", "output": "y"}])


def write_cfg(tmp_path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # configs name data files relative to the repo root
    overrides = []
    if "\ninit_from:" in path.read_text():  # a run to start from: a finished one on the same base, made here
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        (tmp_path / "config.yaml").write_text("model: {name: smollm2-135m-instruct}\n")
        overrides = [f"init_from={tmp_path}"]
    cfg = load_config(path, overrides)
    assert cfg.data.train, "every bundled config trains on something"
    head = path.read_text().splitlines()[:3]
    assert head[0].startswith("#"), "configs start with a comment block saying what they train and how to run"


def test_defaults_and_resolved_yaml_round_trip(tmp_path, train_file):
    cfg = load_config(write_cfg(tmp_path, f"data:\n  train: {train_file}\n"))
    assert cfg.model.trust_remote_code is False
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.sft_args["learning_rate"] == 2e-4
    # the saved copy re-loads to the same config (training defaults written out)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.model_dump() == {**cfg.model_dump(), "training": again.training}
    assert again.sft_args == cfg.sft_args


def test_overrides_parse_yaml_scalars(tmp_path, train_file):
    p = write_cfg(tmp_path, f"data:\n  train: {train_file}\n")
    cfg = load_config(p, ["training.max_steps=5", "lora.target_modules=[q_proj, v_proj]",
                          "output_dir=/tmp/run1", "quantization.double_quant=false", "model.chat_template=null"])
    assert cfg.training["max_steps"] == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.output_dir == "/tmp/run1" and cfg.quantization.double_quant is False
    # YAML 1.1 would read `no` as False; TRL's strategy values must arrive as written
    cfg = load_config(p, ["training.eval_strategy=no", "training.save_strategy=no"])
    assert cfg.training["eval_strategy"] == "no" and cfg.training["save_strategy"] == "no"


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path, train_file):
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4", which the optimizer then chokes on.
    p = write_cfg(tmp_path, f"data:\n  train: {train_file}\ntraining:\n  learning_rate: 1e-4\n  weight_decay: 1E-2\n")
    cfg = load_config(p)
    assert cfg.training["learning_rate"] == 1e-4 and isinstance(cfg.training["learning_rate"], float)
    assert cfg.training["weight_decay"] == 0.01
    cfg = load_config(p, ["training.learning_rate=2e-5", "training.max_steps=5", "output_dir=run1e5"])
    assert cfg.training["learning_rate"] == 2e-5 and cfg.training["max_steps"] == 5 and cfg.output_dir == "run1e5"


def test_bad_override_syntax_is_a_usage_error():
    with pytest.raises(UserError) as e:
        apply_overrides({}, ["training.max_steps"])
    assert e.value.exit_code == 2 and "key.sub=value" in str(e.value)


def test_all_problems_are_reported_at_once_with_key_paths_lines_and_hints(tmp_path, train_file):
    p = write_cfg(tmp_path, f"""
modle:
  name: x
lora:
  r: -1
  dropuot: 0.1
quantization:
  mode: 3bit
data:
  train: {train_file}
training:
  max_step: 5
  learning_rate: fast
  output_dir: elsewhere
""")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert e.value.exit_code == 2
    assert "modle (line 2): unknown key (did you mean model?)" in msg
    assert "lora.r (line 5): Input should be greater than 0" in msg
    assert "lora.dropuot (line 6): unknown key (did you mean dropout?)" in msg
    assert "quantization.mode (line 8)" in msg
    # schema problems come first; training keys are checked once the schema is clean
    fixed = p.read_text().replace("modle", "model").replace("r: -1", "r: 8").replace("dropuot", "dropout").replace("3bit", "4bit")
    p.write_text(fixed)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "training.max_step (line 12): not a trl.SFTConfig field (did you mean max_steps?)" in msg
    assert "training.learning_rate (line 13): " in msg and "'fast'" in msg
    assert "training.output_dir (line 14): set by the pipeline" in msg
    assert len(e.value.problems) == 3


@pytest.mark.parametrize("data, expected", [
    ({"lora": {"init": "loftq"}, "quantization": {"mode": "4bit"}}, "lora.init: loftq quantizes"),
    ({"lora": {"use_dora": True}, "quantization": {"mode": "8bit"}}, "lora.use_dora: DoRA is not supported on 8-bit"),
    ({"training": {"eval_strategy": "steps"}}, "training.eval_strategy: evaluation requested but there is no eval data"),
    ({"model": {"chat_template": "nope.jinja"}}, "model.chat_template: 'nope.jinja' is neither"),
    ({"data": {"train": "missing/file.jsonl"}}, "data.train[0].path: missing/file.jsonl does not exist"),
    ({"data": {"train": []}}, "data.train: no training data"),
])
def test_impossible_combinations(train_file, data, expected):
    data = {"data": {"train": str(train_file)}, **{k: v for k, v in data.items() if k != "data"},
            **({"data": data["data"]} if "data" in data else {})}
    with pytest.raises(ConfigError, match=None) as e:
        config_from_dict(data)
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_quantization_without_bitsandbytes_is_refused(train_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"train": str(train_file)}, "quantization": {"mode": "4bit"}})
    assert "quantization.mode: 4bit needs bitsandbytes" in str(e.value)


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    p = write_cfg(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match=r"cfg.yaml:1: .*tags that build objects are refused") as e:
        load_config(p)
    assert e.value.exit_code == 2


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"cfg.yaml:3: invalid YAML: .*starts at line 2"):
        load_config(write_cfg(tmp_path, "model:\n  name: [unclosed\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_sources_shorthand_accepts_strings_and_lists(train_file):
    cfg = config_from_dict({"data": {"train": [str(train_file), {"path": str(train_file), "weight": 0.5}]}})
    assert [s.weight for s in cfg.data.train] == [1.0, 0.5]
    assert isinstance(cfg, RunConfig)


def test_training_is_checked_against_the_methods_trl_config_every_problem_at_once(tmp_path, train_file):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    other = tmp_path / "other"
    (other / "adapter").mkdir(parents=True)
    (other / "adapter" / "adapter_config.json").write_text("{}")
    (other / "config.yaml").write_text("model: {name: HuggingFaceTB/SmolLM2-360M-Instruct}\n")
    text = (f"method: kto\ninit_from: {other}\ndata:\n  train: {pairs}\nrewards: [{{kind: exact_match}}]\n"
            "training:\n  beta: 0.2\n  max_prompt_length: 64\n  packing: true\n  per_device_train_batch_size: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(write_cfg(tmp_path, text))
    msg = str(e.value)
    assert "training.packing (line 9): not a trl.KTOConfig field (method: kto)" in msg
    assert "training.max_prompt_length (line 8): TRL 1.x has no such field" in msg
    assert "training.per_device_train_batch_size (line 10): KTO estimates its KL term" in msg
    assert "rewards (line 5): rewards score generations for method: grpo" in msg
    assert f"init_from (line 2): {other} was trained on model.name 'HuggingFaceTB/SmolLM2-360M-Instruct'" in msg
    assert "beta" not in msg  # a KTOConfig field


def test_grpo_needs_a_reward_and_the_saved_config_reloads(tmp_path, train_file):
    with pytest.raises(ConfigError, match="method grpo needs at least one reward"):
        load_config(write_cfg(tmp_path, f"method: grpo\ndata:\n  train: {train_file}\n"))
    cfg = load_config(write_cfg(tmp_path, f"method: grpo\ndata:\n  train: {train_file}\nrewards: [{{kind: json_valid}}]\n"))
    assert "max_length" not in cfg.sft_args and "padding_free" not in cfg.sft_args  # no such GRPOConfig fields
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.sft_args == cfg.sft_args and again.rewards == cfg.rewards
