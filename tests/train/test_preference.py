"""DPO/KTO/ORPO and GRPO through the one training loop on tiny random llamas: what moves, what the
reference is, what is saved, what is logged."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import make_run, write_jsonl
from peft_pipeline.config import config_from_dict

PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
          "chosen": [{"role": "assistant", "content": str(2 * i)}],
          "rejected": [{"role": "assistant", "content": str(2 * i + 1)}]} for i in range(8)]
FAST = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
        "save_strategy": "no"}


def _cfg(tmp_path, base, method, rows=PAIRS, training=None, **extra):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    return config_from_dict({"method": method, "model": {"name": str(base)},
                             "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                             "data": {"train": [str(data)], "eval": [str(data)], "cache": False, "retention": None},
                             "training": {**FAST, **(training or {})}, "output_dir": str(tmp_path / "run"), **extra})


def _setup(cfg):
    from accelerate import PartialState

    from peft_pipeline.tasks import method_for
    from peft_pipeline.train.loop import check

    method = method_for(cfg)
    prep = check(cfg, method, progress=False)
    (tmp := __import__("pathlib").Path(cfg.output_dir)).mkdir(parents=True, exist_ok=True)
    return method.setup(cfg, prep, tmp, PartialState(cpu=True))


def test_dpo_step_moves_the_adapter_not_the_base_and_the_reference_is_no_second_model(tmp_path, tiny_base, one_thread):
    import torch

    trainer, facts = _setup(_cfg(tmp_path, tiny_base, "dpo"))
    model = trainer.model
    assert trainer.ref_model is None and facts["reference"] == "the base (adapter off)"
    # One copy of the base: beside it only LoRA tensors (the trained "default" and TRL's frozen "ref" copy).
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params == 2 * facts["trainable_params"] and base_params == facts["total_params"] - facts["trainable_params"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(".default." in n and "lora_" in n for n in moved)  # only the trained adapter
    assert not any("lora_" not in n for n in moved)  # base weights unchanged
    # The frozen "ref" adapter still equals the adapter-off base: LoRA B stays zero.
    assert all(torch.count_nonzero(p) == 0 for n, p in after.items() if "lora_B.ref" in n)


def test_dpo_tokens_are_the_ones_data_stage_marks(tmp_path, tiny_base, tokenizer, one_thread):
    from peft_pipeline.data.preference import pair_ids

    trainer, _ = _setup(_cfg(tmp_path, tiny_base, "dpo"))
    row = trainer.train_dataset[0]
    p, (c, r) = pair_ids(tokenizer, row["prompt"], [row["chosen"], row["rejected"]])
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (p, c, r)
    assert tokenizer.decode(row["chosen_ids"]) == "0<|im_end|>" and tokenizer.decode(row["rejected_ids"]) == "1<|im_end|>"


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_base):
    from peft_pipeline.tasks import train

    tmp = tmp_path_factory.mktemp("dpo")
    return train(_cfg(tmp, tiny_base, "dpo"), progress=False)


def test_dpo_run_dir_is_sfts_contract_adapter_holds_only_default(dpo_run):
    metrics = json.loads((dpo_run / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["method"] == "dpo" and metrics["global_steps"] == 2
    assert "eval_rewards/accuracies" in metrics
    assert not (dpo_run / "adapter" / "ref").exists()
    assert (dpo_run / "adapter" / "generation_config.json").is_file()
    logged = [json.loads(line) for line in (dpo_run / "log.jsonl").read_text().splitlines()]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(logged[0])


def test_dpo_run_merges_with_parity_and_evals_preference_accuracy(dpo_run, capsys, one_thread):
    from peft_pipeline.evaluate.run import evaluate
    from peft_pipeline.merge import merge

    merged = merge(dpo_run)
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["status"] == "passed" and report["parity"]["passed"]
    result = evaluate(dpo_run, compare_base=True, progress=False)
    pref = result["preference"]
    assert pref["base"]["n"] == pref["adapter"]["n"] == len(PAIRS)
    # The run's implicit reward (adapter vs base) is what DPO pushed up on these pairs.
    assert pref["adapter"]["reward_margin"] > 0
    assert "pairs: accuracy" in capsys.readouterr().out


def test_dpo_from_an_sft_run_uses_that_adapter_as_the_reference(tmp_path, tiny_base, tokenizer, one_thread):
    sft = make_run(tmp_path / "sft", tiny_base, tokenizer, [{"instruction": "a", "output": "b"}])
    trainer, facts = _setup(_cfg(tmp_path, tiny_base, "dpo", init_from=str(sft)))
    assert facts["reference"].startswith(str(sft)) and set(trainer.model.peft_config) == {"default", "ref"}
    trainer.train()
    # Step 1 compares the policy with itself: the random-B SFT adapter is the reference, not the base.
    first = trainer.state.log_history[0]
    assert first["rewards/chosen"] == 0.0 and first["loss"] == pytest.approx(0.6931, abs=1e-4)


def test_kto_and_orpo_train_through_the_same_loop(tmp_path, tiny_base, one_thread):
    from peft_pipeline.tasks import train

    for method in ("kto", "orpo"):
        run = train(_cfg(tmp_path / method, tiny_base, method), progress=False)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["method"] == method
        assert not (run / "adapter" / "ref").exists()


def test_grpo_reward_function_reaches_the_logs_with_generation_speed(tmp_path, tiny_base, monkeypatch, one_thread):
    from peft_pipeline.tasks import train

    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompts, completions, completion_ids, answer, **kw):\n"
        "    return [1.0 / (1 + len(ids)) for ids in completion_ids]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}?"}], "answer": str(2 * i)} for i in range(4)]
    cfg = _cfg(tmp_path, tiny_base, "grpo", rows, {"num_generations": 2, "max_completion_length": 6},
               rewards=[{"kind": "python", "function": "myrewards:brevity"}, {"kind": "exact_match", "weight": 2}])
    cfg.data.eval = []
    run = train(cfg, progress=False)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert 0 < entry["rewards/brevity/mean"] <= 1 and entry["rewards/exact_match/mean"] == 0.0
        assert entry["generation/tokens_per_s"] > 0 and 0 < entry["generation/time_share"] <= 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["generation"]["tokens"] > 0 and "rewards/brevity/mean" in metrics["rewards"]


def test_grpo_bad_reward_path_is_a_one_line_error_before_weights_load(tmp_path, tiny_base):
    from peft_pipeline.errors import UserError
    from peft_pipeline.tasks import method_for
    from peft_pipeline.train.loop import check

    cfg = _cfg(tmp_path, tiny_base, "grpo", [{"prompt": "2+2=", "answer": "4"}],
               rewards=[{"kind": "python", "function": "no_such_module_xyz:f"}])
    with pytest.raises(UserError, match=r"^rewards\[0\]\.function: cannot import 'no_such_module_xyz'") as e:
        check(cfg, method_for(cfg), progress=False)
    assert e.value.exit_code == 2


# --------------------------------------------------------------------------- DPO with the pipeline's other features


def test_dpo_with_qlora_trains_the_adapter_on_a_4bit_base(tmp_path, tiny_base, one_thread):
    import bitsandbytes as bnb
    import torch

    trainer, _ = _setup(_cfg(tmp_path, tiny_base, "dpo", quantization={"mode": "4bit"}))
    model = trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved and all(".default." in n and "lora_" in n for n in moved)  # 4-bit base and "ref" untouched
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


class _StopAt:
    """A callback that crashes the run at the end of step `step` (after that step's checkpoint is written)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == step:
                    raise RuntimeError(f"crash at step {step}")

        return Crash()


@pytest.mark.slow  # three short trainings: ~25 s on a shared core
def test_dpo_resumed_from_a_checkpoint_ends_with_the_uninterrupted_adapter(tmp_path, tiny_base, tokenizer, one_thread):
    from safetensors.torch import load_file

    from peft_pipeline.tasks import train

    # From an SFT run with random B: the frozen "ref" adapter differs from the base, so a resume that
    # loaded the wrong adapter into it (or into "default") would change every later step.
    sft = str(make_run(tmp_path / "sft", tiny_base, tokenizer, [{"instruction": "a", "output": "b"}]))
    steps = {"max_steps": 4, "per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 2}
    whole = train(_cfg(tmp_path / "a", tiny_base, "dpo", training=steps, init_from=sft), progress=False)
    cfg = _cfg(tmp_path / "b", tiny_base, "dpo", training=steps, init_from=sft)
    with pytest.raises(RuntimeError, match="crash at step 3"):
        train(cfg, progress=False, callbacks=[_StopAt(3)])
    assert (tmp_path / "b" / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    resumed = train(cfg, resume=True, progress=False)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(".ref." not in k for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, f"resumed DPO adapter differs by {diff}"
    losses = [[e["loss"] for e in map(json.loads, (r / "log.jsonl").read_text().splitlines()) if "loss" in e]
              for r in (whole, resumed)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and len(losses[0]) == 4  # no step logged twice


def test_dpo_early_stopping_stops_on_the_eval_metric_and_restores_the_best_checkpoint(tmp_path, tiny_base, one_thread):
    from peft_pipeline.tasks import train

    # greater_is_better on eval_loss makes every evaluation after the first a non-improvement (the loss
    # falls as DPO trains), so patience 1 stops at the second evaluation and step 2 must come back.
    cfg = _cfg(tmp_path, tiny_base, "dpo", training={"max_steps": 20, "save_strategy": "steps"},
               early_stopping={"patience": 1, "eval_steps": 2, "greater_is_better": True})
    run = train(cfg, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    es = metrics["early_stopping"]
    assert metrics["global_steps"] == 4 and es["stopped_early"] and es["best_step"] == 2
    assert metrics["best_checkpoint"].endswith("checkpoint-2") and metrics["best_restored"]
    evals = [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 4]
    assert evals[0]["eval_loss"] > evals[1]["eval_loss"]  # the premise: DPO lowers its eval loss
    assert metrics["eval_loss"] == pytest.approx(evals[0]["eval_loss"])  # the final eval ran on the step-2 adapter
    assert "eval_rewards/accuracies" in evals[0]  # DPO's own metrics are there to stop on as well
