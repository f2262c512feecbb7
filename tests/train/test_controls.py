"""Training controls (controls.py): early stopping, layer selection, top-layer fine-tuning, gradual
unfreezing, layer-wise learning rates, NEFTune on padding-free rows, weight decay, LoRA dropout."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from peft_pipeline.config import ConfigError, LoraSection, config_from_dict
from peft_pipeline.tasks import train

from conftest import make_tiny_llama, write_jsonl
from peft_pipeline.train import controls

ROWS = [{"instruction": f"Repeat the word {w}.", "output": w} for w in
        ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano"]]


@pytest.fixture(scope="module")
def base4(tmp_path_factory, tokenizer):
    """A 4-layer tiny llama (layer ranges need more than the shared 2-layer base)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny4") / "base", tokenizer, num_hidden_layers=4)


def cfg_dict(tmp_path, base, training=None, **sections):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    evals = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    training = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
                "save_steps": 1, "save_total_limit": 10, "max_length": 128, **(training or {})}
    return {
        "model": {"name": str(base)},
        "lora": {"r": 4, "target_modules": "all-linear", **sections.pop("lora", {})},
        "data": {"train": str(data), "eval": str(evals), "cache": False},
        "training": {k: v for k, v in training.items() if v is not None},  # None: leave the key out
        "output_dir": str(tmp_path / "run"),
        **sections,
    }


def problems_of(d) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert e.value.exit_code == 2
    return e.value.problems


def log_records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def layer_tensors(state: dict, layer: int) -> dict:
    return {k: v for k, v in state.items() if f".layers.{layer}." in k}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- config


def test_layer_ranges_expand_and_malformed_ones_name_the_key(tmp_path, tiny_base):
    assert LoraSection(layers_to_transform=[0, "10-12", 11]).layer_indices == [0, 10, 11, 12]
    assert LoraSection(layers_to_transform="3-4").layer_indices == [3, 4]
    assert LoraSection(layers_to_transform=2).layer_indices == [2]
    lora = LoraSection(layers_to_transform=[0, "2-3"])
    assert lora.layers_to_transform == [0, "2-3"]  # kept as written; the expansion is a property
    bad = problems_of(cfg_dict(tmp_path, tiny_base, lora={"layers_to_transform": [0, "5-2"]}))
    assert len(bad) == 1 and bad[0].startswith("lora.layers_to_transform") and "'5-2' is not a layer index" in bad[0]


def test_control_config_problems_are_reported_together(tmp_path, tiny_base):
    d = cfg_dict(tmp_path, tiny_base, training={"eval_strategy": "no", "metric_for_best_model": "loss"},
                 early_stopping={"patience": 2},
                 freeze={"method": "top_layers", "train_head": True, "unfreeze": [{"step": 2, "layers": 1}]})
    d["data"].pop("eval")
    bad = problems_of(d)
    assert "early_stopping.patience: evaluation requested but there is no eval data; set data.eval or data.val_fraction" in bad
    assert any(p.startswith("training.eval_strategy: 'no' conflicts with early_stopping, which sets eval_strategy: 'steps'")
               for p in bad)
    assert not any(p.startswith("training.metric_for_best_model") for p in bad)  # 'loss' == 'eval_loss'
    assert any(p.startswith("freeze.top_layers: method top_layers needs the number of top layers") for p in bad)
    assert any(p.startswith("freeze.unfreeze: a schedule needs freeze.top_layers") for p in bad)
    d2 = cfg_dict(tmp_path, tiny_base, freeze={"top_layers": 2, "train_head": True, "unfreeze": [{"step": 2, "layers": 1}]},
                  training={"save_steps": 7}, early_stopping={"patience": 1, "eval_steps": 5})
    bad = problems_of(d2)
    assert any(p.startswith("freeze.unfreeze[0].layers: 1 does not unfreeze anything") for p in bad)
    assert any(p.startswith("freeze.train_head: only for method top_layers") for p in bad)
    assert any(p.startswith("training.save_steps: 7 conflicts with early_stopping, which sets save_steps: 5") for p in bad)
    bad = problems_of(cfg_dict(tmp_path, tiny_base, freeze={"top_layers": 1, "unfreeze": [{"step": 2, "epoch": 1, "layers": 2}]}))
    assert bad == ["freeze.unfreeze[0]: Value error, set exactly one of step or epoch (got {'step': 2, 'epoch': 1, 'layers': 2})"]


def test_early_stopping_sets_the_trainer_arguments(tmp_path, tiny_base):
    cfg = config_from_dict(cfg_dict(tmp_path, tiny_base, training={"eval_steps": 3, "save_steps": None},
                                    early_stopping={"patience": 2}))
    args = cfg.sft_args
    assert (args["eval_strategy"], args["eval_steps"], args["save_steps"]) == ("steps", 3, 3)
    assert args["metric_for_best_model"] == "eval_loss" and args["greater_is_better"] is False
    assert args["load_best_model_at_end"] is True
    acc = config_from_dict(cfg_dict(tmp_path, tiny_base, training={"save_steps": None},
                                    early_stopping={"patience": 2, "metric": "eval_accuracy"}))
    assert acc.sft_args["greater_is_better"] is True  # not a loss: higher is better


def test_layer_counts_are_checked_against_the_architecture(tmp_path, tiny_base):
    from peft_pipeline.config import ModelSection
    from peft_pipeline.train.controls import model_problems
    from peft_pipeline.model.load import meta_model

    meta = meta_model(ModelSection(name=str(tiny_base)))
    cfg = config_from_dict(cfg_dict(tmp_path, tiny_base, freeze={"top_layers": 1, "unfreeze": [{"step": 2, "layers": 3}]},
                                    lora={"layers_to_transform": [0]}))
    assert model_problems(cfg, meta) == [
        "freeze.unfreeze[0].layers: 3 layers asked for, but LlamaForCausalLM has 2",
        "freeze.top_layers: the top 1 layers (1-1) hold no adapter (lora.layers_to_transform: [0]); nothing would train at the start",
    ]


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_counts_evaluations_without_improvement_beyond_the_threshold(tmp_path, capsys):
    from transformers import TrainerControl, TrainerState

    from peft_pipeline.train.controls import EarlyStopping

    log = tmp_path / "log.jsonl"
    cb = EarlyStopping(early_stopping_patience=2, early_stopping_threshold=0.05, log=str(log))
    args = SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False, load_best_model_at_end=True,
                           eval_strategy="steps")
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    stopped_at = None
    for step, loss in zip(range(10, 70, 10), [3.0, 2.0, 2.5, 1.99, 2.1, 2.2]):
        state.global_step = step
        cb.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if loss < (state.best_metric or float("inf")):  # what Trainer._determine_best_metric does after callbacks
            state.best_metric, state.best_global_step = loss, step
        if control.should_training_stop:
            stopped_at = step
            break
    # 2.5 does not improve; 1.99 beats 2.0 by only 0.01 <= 0.05: the second evaluation without improvement
    assert stopped_at == 40
    assert cb.stopped["best_metric"] == 1.99 and cb.stopped["best_step"] == 40  # the trainer keeps 1.99 as its best
    reason = "early stop at step 40: eval_loss 1.9900 has not improved on 2.0000 (step 20) by more than 0.05 for 2 evaluations (patience 2)"
    assert cb.stopped["reason"] == reason and reason in capsys.readouterr().out
    assert [r["event"] for r in map(json.loads, log.read_text().splitlines())] == ["early_stop"]


def test_early_stopping_run_stops_logs_why_and_restores_the_best_checkpoint(tmp_path, tiny_base):
    # A metric sequence we control: the eval loss falls as it trains, and greater_is_better: true makes every
    # evaluation after the first a non-improvement, so patience 1 stops at the second one (step 4) and the
    # step-2 adapter (the highest loss) is the best one, which must come back.
    d = cfg_dict(tmp_path, tiny_base, training={"max_steps": 20, "save_steps": None},
                 early_stopping={"patience": 1, "eval_steps": 2, "greater_is_better": True})
    run = train(config_from_dict(d), progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_steps"] == 4
    es = metrics["early_stopping"]
    assert es["stopped_early"] and es["step"] == 4 and es["evaluations"] == 2
    logged = [(r["step"], r["eval_loss"]) for r in log_records(run) if "eval_loss" in r]
    assert [step for step, _ in logged] == [2, 4, 4]  # two during training, then the final eval on the restored best
    evals = dict(logged[:2])
    assert evals[2] > evals[4]  # the premise: training lowers the loss
    assert es["best_step"] == 2 and metrics["best_metric"] == pytest.approx(evals[2])
    assert metrics["best_checkpoint"].endswith("checkpoint-2") and metrics["best_restored"]
    assert metrics["eval_loss"] == pytest.approx(evals[2]) == logged[2][1]  # the final eval ran on the restored adapter
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert same(saved, load_file(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert not same(saved, load_file(run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    assert [r["reason"] for r in log_records(run) if r.get("event") == "early_stop"] == [es["reason"]]


# --------------------------------------------------------------------------- freezing


def test_adapters_only_on_the_chosen_layers(tmp_path, base4):
    d = cfg_dict(tmp_path, base4, training={"max_steps": 2, "save_steps": 50}, lora={"layers_to_transform": [0, "2-3"]})
    run = train(config_from_dict(d), progress=False)
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in adapter} == {0, 2, 3}
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # every chosen layer trained


def test_top_layers_fine_tunes_only_the_top_layers_and_eval_reads_the_model(tmp_path, base4):
    from peft_pipeline.rundir import resolve
    from peft_pipeline.evaluate.run import evaluate

    d = cfg_dict(tmp_path, base4, training={"max_steps": 3, "save_steps": 50}, freeze={"method": "top_layers", "top_layers": 1})
    run = train(config_from_dict(d), progress=False)
    assert not (run / "adapter").exists()
    trained, base = load_file(run / "model" / "model.safetensors"), load_file(base4 / "model.safetensors")
    assert trained.keys() == base.keys()
    moved = {k for k in base if not torch.equal(trained[k], base[k])}
    assert moved and all(".layers.3." in k for k in moved)  # embeddings, norm, layers 0-2 bitwise unchanged
    assert len(moved) == len(layer_tensors(base, 3))  # every weight of the top layer moved
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_params"] == sum(v.numel() for v in layer_tensors(base, 3).values())
    target = resolve(run)
    assert (target.kind, target.model_path, target.run_dir) == ("merged", str(run / "model"), run)
    report = evaluate(run, progress=False)
    assert report["loss"]["merged"]["loss"] > 0 and (run / "eval.json").is_file()


def test_gradual_unfreezing_moves_a_layer_only_after_its_step_and_resume_restores_it(tmp_path, base4):
    # top layer from the start, the next one after 2 steps; layers 0-1 never
    freeze = {"method": "top_layers", "top_layers": 1, "unfreeze": [{"step": 2, "layers": 2}]}
    training = {"lr_scheduler_type": "constant"}
    run = train(config_from_dict(cfg_dict(tmp_path / "a", base4, training=training, freeze=freeze)), progress=False)
    base = load_file(base4 / "model.safetensors")
    ckpt = {s: load_file(run / "checkpoints" / f"checkpoint-{s}" / "model.safetensors") for s in (1, 2, 3, 4)}
    assert not same(layer_tensors(ckpt[1], 3), layer_tensors(base, 3))
    assert same(layer_tensors(ckpt[2], 2), layer_tensors(base, 2))  # frozen during steps 1-2
    assert not same(layer_tensors(ckpt[3], 2), layer_tensors(base, 2))  # trained in step 3
    for layer in (0, 1):
        assert same(layer_tensors(ckpt[4], layer), layer_tensors(base, layer))
    changes = [(r["step"], r["layers"], r["trainable_params"]) for r in log_records(run) if r.get("event") == "trainable"]
    per_layer = sum(v.numel() for v in layer_tensors(base, 3).values())
    assert changes == [(0, [3, 3], per_layer), (2, [2, 3], 2 * per_layer)]

    # stopped after step 1 (before the unfreeze) and resumed: the same weights as the uninterrupted run
    d = cfg_dict(tmp_path / "b", base4, training={**training, "max_steps": 1}, freeze=freeze)
    train(config_from_dict(d), progress=False)
    d["training"]["max_steps"] = 4
    resumed = train(config_from_dict(d), resume=True, progress=False)
    assert same(load_file(resumed / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors"))


def test_gradual_unfreezing_with_lora_trains_only_the_unfrozen_adapters(tmp_path, tiny_base):
    freeze = {"top_layers": 1, "unfreeze": [{"step": 2, "layers": 2}]}
    run = train(config_from_dict(cfg_dict(tmp_path, tiny_base, training={"max_steps": 3}, freeze=freeze)), progress=False)
    ckpt = {s: load_file(run / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (1, 2, 3)}
    assert same(layer_tensors(ckpt[1], 0), layer_tensors(ckpt[2], 0))  # layer 0's adapters frozen in steps 1-2
    assert not same(layer_tensors(ckpt[2], 0), layer_tensors(ckpt[3], 0))
    assert not same(layer_tensors(ckpt[1], 1), layer_tensors(ckpt[2], 1))
    metrics = json.loads((run / "metrics.json").read_text())
    counts = [c["trainable_params"] for c in metrics["trainable_changes"]]
    assert len(counts) == 2 and counts[1] == 2 * counts[0]


def test_layer_lr_decay_gives_each_depth_its_own_rate_through_the_schedule(tmp_path, base4):
    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        seen: list = []

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.seen.append([(g["layer_depth"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups])

    freeze = {"method": "top_layers", "top_layers": 2, "train_head": True, "layer_lr_decay": 0.5,
              "unfreeze": [{"step": 1, "layers": 4}]}
    d = cfg_dict(tmp_path, base4, training={"max_steps": 3, "save_steps": 50, "weight_decay": 0.1,
                                            "lr_scheduler_type": "linear"}, freeze=freeze)
    train(config_from_dict(d), progress=False, callbacks=[Spy()])
    assert len(Spy.seen) == 3
    first = Spy.seen[0]
    assert [depth for depth, _, _ in first] == [0, 0, 1, 1, 2, 2, 3, 3]  # decayed and not-decayed group per depth
    assert {wd for _, _, wd in first} == {0.1, 0.0}
    assert Spy.seen[0][0][1] > Spy.seen[1][0][1] > 0  # the linear schedule decays (to 0 after the last step)
    for groups in Spy.seen:  # LambdaLR scales every group's own rate: the ratios hold at every step
        top = groups[0][1]
        for depth, lr, _ in groups:
            assert lr == pytest.approx(top * 0.5 ** depth)


def test_freezing_schedules_refuse_several_processes(tiny_base, tmp_path):
    from peft_pipeline.train.controls import build_model, install
    from peft_pipeline.config import ModelSection, QuantizationSection
    from peft_pipeline.model.load import load_base

    cfg = config_from_dict(cfg_dict(tmp_path, tiny_base, freeze={"top_layers": 1, "unfreeze": [{"step": 2, "layers": 2}]}))
    model, plan = build_model(load_base(ModelSection(name=str(tiny_base)), QuantizationSection()), cfg, False)
    with pytest.raises(ConfigError, match="run on one process only \\(this launch has 2\\)"):
        install(SimpleNamespace(), cfg, plan, tmp_path, world=2)


# --------------------------------------------------------------------------- regularization


def test_packed_neftune_scales_noise_by_each_example_length():
    from peft_pipeline.train.controls import PackedNEFTune, segment_lengths

    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    assert segment_lengths(pos, (1, 8)).tolist() == [[3, 3, 3, 5, 5, 5, 5, 5]]
    assert segment_lengths(None, (2, 4)).tolist() == [[4] * 4] * 2  # no position ids: the row length

    emb = torch.nn.Embedding(10, 256)
    torch.nn.init.zeros_(emb.weight)
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: emb
    model.forward = lambda input_ids, position_ids=None: emb(input_ids)
    neft = PackedNEFTune(model, alpha=5.0)
    neft.on_train_begin(None, None, None)
    noise = model(torch.zeros(1, 8, dtype=torch.long), position_ids=pos)[0]  # zero embeddings: output = noise
    bound = torch.tensor([5.0 / (n * 256) ** 0.5 for n in [3, 3, 3, 5, 5, 5, 5, 5]])
    peak = noise.abs().amax(dim=-1)
    assert torch.all(peak <= bound + 1e-7) and torch.all(peak > 0.9 * bound)
    emb.eval()
    assert model(torch.zeros(1, 8, dtype=torch.long), position_ids=pos).abs().sum() == 0  # no noise in eval
    neft.on_train_end(None, None, None)
    emb.train()
    assert model(torch.zeros(1, 8, dtype=torch.long), position_ids=pos).abs().sum() == 0  # hooks removed


def test_neftune_and_weight_decay_change_padding_free_training(tmp_path, tiny_base, monkeypatch):
    from peft_pipeline.train.controls import segment_lengths

    seen = []  # (row width, longest example) of each noised batch

    def spy(position_ids, shape):
        lengths = segment_lengths(position_ids, shape)
        seen.append((shape[1], int(lengths.max())))
        return lengths

    segment_lengths = segment_lengths
    monkeypatch.setattr(controls, "segment_lengths", spy)

    def run(name, **training):
        d = cfg_dict(tmp_path / name, tiny_base, training={"max_steps": 2, "save_steps": 50, "padding_free": True, **training})
        r = train(config_from_dict(d), progress=False)
        return [x["loss"] for x in log_records(r) if "loss" in x], load_file(r / "adapter" / "adapter_model.safetensors")

    plain_loss, plain = run("plain")
    noisy_loss, _ = run("neftune", neftune_noise_alpha=50.0)
    assert all(torch.isfinite(torch.tensor(noisy_loss)))
    assert noisy_loss[0] != plain_loss[0]  # the very first forward already sees the noise
    # one padding-free row per batch of 4 examples: the noise was scaled by each example's length, not the row's
    assert len(seen) == 2 and all(longest < width for width, longest in seen)
    _, decayed = run("decay", weight_decay=0.5)
    # decoupled decay shrinks the randomly initialized lora_A matrices on top of the gradient update
    a_norm = lambda s: sum(v.norm() for k, v in s.items() if "lora_A" in k)  # noqa: E731
    assert a_norm(decayed) < a_norm(plain)


def test_lora_dropout_is_active_in_training_only(tiny_base):
    from peft_pipeline.config import ModelSection, QuantizationSection
    from peft_pipeline.model.adapter import attach_adapter
    from peft_pipeline.model.load import load_base

    model = attach_adapter(load_base(ModelSection(name=str(tiny_base)), QuantizationSection()),
                           LoraSection(r=4, dropout=0.5), quantized=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # B = 0 would hide the dropout
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
