"""GRPO rewards: the built-ins on known answers, user functions by import path, scoring generations."""

from __future__ import annotations

import pytest

from peft_pipeline.config import RewardSpec
from peft_pipeline.errors import UserError
from peft_pipeline.evaluate import rewards
from peft_pipeline.evaluate.preference import summarize

REF = '{"customer": "Mei", "quantity": 3}'


def run(kind, completions, ids=None, **spec):
    fn = rewards.build(RewardSpec(kind=kind, **spec))
    return fn(prompts=["p"] * len(completions), completions=completions,
              completion_ids=ids or [[0] * 5 for _ in completions], answer=[REF] * len(completions))


def test_builtin_rewards_score_known_answers():
    good, reordered, wrong_value, missing, prose = (
        REF, '{"quantity": 3, "customer": "Mei"}', '{"customer": "Mei", "quantity": 4}', '{"customer": "Mei"}', "Mei, 3")
    assert run("exact_match", [f"  {good}\n", reordered, prose]) == [1.0, 0.0, 0.0]
    assert run("json_valid", [good, missing, prose]) == [1.0, 1.0, 0.0]
    assert run("json_fields", [reordered, wrong_value, missing, prose]) == [1.0, 1.0, 0.0, 0.0]
    # partial credit: the share of the reference's fields right (a reordered object is all right)
    assert run("json_values", [reordered, wrong_value, missing, prose]) == [1.0, 0.5, 0.5, 0.0]
    assert run("regex", ["order 12", "none"], pattern=r"\d+") == [1.0, 0.0]
    assert run("length", ["a", "b"], ids=[[0] * 4, [0] * 12], max_tokens=8) == [0.0, -0.5]
    # messages completions (conversational prompts) are read the same way
    assert run("exact_match", [[{"role": "assistant", "content": REF}]]) == [1.0]


def test_reward_is_named_by_its_label_for_the_logs():
    assert rewards.build(RewardSpec(kind="json_valid")).__name__ == "json_valid"
    assert rewards.build(RewardSpec(kind="regex", pattern="x", name="has_x")).__name__ == "has_x"
    assert rewards.build(RewardSpec(kind="python", function="json:dumps")).__name__ == "dumps"


def test_bad_import_path_is_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"^rewards\[2\]\.function: json has no function 'nope'$"):
        rewards.import_function("json:nope", "rewards[2].function")


def test_score_weights_and_skips_rewards_that_do_not_apply():
    specs = [RewardSpec(kind="exact_match", weight=2.0), RewardSpec(kind="json_fields")]
    got = rewards.score(specs, ["p", "p"], [REF, "x"], [[1], [1]], [REF, "not json"])
    assert got["exact_match"] == 0.5 and got["json_fields"] == 1.0  # None (reference not JSON) left out
    assert got["reward"] == pytest.approx((2.0 + 1.0 + 0.0) / 2)


def test_preference_summary_accuracy_margin_and_implicit_reward():
    logps = {"base": [(-2.0, -1.0), (-1.0, -3.0)], "adapter": [(-1.0, -2.0), (-1.0, -4.0)]}
    s = summarize(logps)
    assert s["base"] == {"accuracy": 0.5, "margin": 0.5, "n": 2}
    assert s["adapter"]["accuracy"] == 1.0 and s["adapter"]["margin"] == 2.0
    # implicit reward: (adapter - base) on chosen minus on rejected: (1 - -1) = 2 and (0 - -1) = 1
    assert s["adapter"]["reward_accuracy"] == 1.0 and s["adapter"]["reward_margin"] == 1.5
