"""Padding-free batches (the default): no attention across documents, the same losses as unpacked.

A padding-free batch is every row of the batch concatenated into one sequence, with position_ids
restarting at 0 at each document and no attention_mask (TRL's DataCollatorForLanguageModeling with
padding_free=True). sdpa_varlen (the CPU default, model.register_sdpa_varlen) runs attention on each
document's slice; transformers turns the restarts into a block-diagonal causal mask for sdpa and
eager, but only without a KV cache (use_cache=False, as TRL's compute_loss passes it): with a
cache the restarts are not looked at and documents attend to each other. Tolerances: fp32 on CPU, so per-document logits agree to 1e-4 and losses to 1e-5 (summation
order differs between a long and a short sequence); a document that could see its neighbours
changes its loss by more than 1e-2 (the control below shows the test would notice).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from peft_pipeline.config import TRAINING_DEFAULTS, config_from_dict
from peft_pipeline.tasks import train
from peft_pipeline.train.preflight import needs_gradient_checkpointing
from peft_pipeline.train.sft import make_sft_config

from conftest import write_jsonl

LENGTHS = (9, 31, 2, 17, 48)  # a 2-token document too: one trained token


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Random documents of uneven length; the first third of each is prompt (label -100)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, len(tokenizer), (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def collate(examples, tokenizer, padding_free: bool):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(examples)


def load(path, attn: str):
    from transformers import AutoModelForCausalLM

    from peft_pipeline.model.attention import register_sdpa_varlen

    register_sdpa_varlen()  # what model.resolve_attention does before a load that uses it
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def doc_loss(logits: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """Mean next-token loss of one document from its own slice of logits."""
    target = torch.tensor(labels[1:])
    return F.cross_entropy(logits[:-1], target, ignore_index=-100)


def split(logits: torch.Tensor, examples) -> list[torch.Tensor]:
    """The flattened row's logits cut back into documents at the boundaries."""
    return list(logits.split([len(e["input_ids"]) for e in examples]))


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "eager"])
def test_padding_free_batch_equals_each_document_alone(tiny_base, tokenizer, examples, attn):
    model = load(tiny_base, attn)
    batch = collate(examples, tokenizer, padding_free=True)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]

    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
    for ex, got, want in zip(examples, split(packed, examples), alone):
        assert torch.allclose(got, want, atol=1e-4), (attn, len(ex["input_ids"]), (got - want).abs().max())
        assert abs(doc_loss(got, ex["labels"]) - doc_loss(want, ex["labels"])) < 1e-5

    # Control: the same row with a plain causal mask (attention_mask given, so no packing is detected)
    # lets each document see the ones before it, and the test above would have caught that.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits[0]
    later = list(zip(examples, split(leaky, examples), alone))[1:]
    leak = max(abs(doc_loss(got, ex["labels"]) - doc_loss(want, ex["labels"])) for ex, got, want in later)
    if attn == "sdpa_varlen":
        assert leak < 1e-5  # it splits wherever the positions restart, mask or not: documents never mix
    else:
        assert leak > 1e-2


def test_sdpa_varlen_gradients_equal_each_document_alone(tiny_base, tokenizer, examples):
    # Training needs the backward pass right too: the packed row's gradients are the sum of the documents'.
    batch = collate(examples, tokenizer, padding_free=True)
    grads = {}
    for name in ("packed", "alone"):
        model = load(tiny_base, "sdpa_varlen")
        if name == "packed":
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            pieces = split(logits, examples)
        else:
            pieces = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
        sum(doc_loss(p, e["labels"]) for p, e in zip(pieces, examples)).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["packed"].keys() == grads["alone"].keys() and grads["packed"]
    for n, g in grads["packed"].items():
        ref = grads["alone"][n]  # fp32 sums in another order: agree to 1e-4 of the largest entry
        assert (g - ref).abs().max() <= 1e-4 * ref.abs().max(), (n, (g - ref).abs().max(), ref.abs().max())


def test_document_starts():
    from peft_pipeline.model.attention import document_starts

    q = torch.zeros(1, 2, 7, 4)
    assert document_starts(torch.tensor([[0, 1, 2, 0, 1, 0, 1]]), q, q) == [0, 3, 5]
    assert document_starts(torch.tensor([[0, 1, 2, 3, 4, 5, 6]]), q, q) is None  # one document
    assert document_starts(torch.tensor([[1, 1, 0, 1, 2, 3, 4]]), q, q) is None  # left padding (generate)
    assert document_starts(torch.tensor([[0, 1, 2, 0, 1, 0, 1]]), q, torch.zeros(1, 2, 9, 4)) is None  # a cache
    assert document_starts(torch.tensor([[0, 1, 2, 0, 1, 0, 1]] * 2), torch.zeros(2, 2, 7, 4), q) is None  # padded
    assert document_starts(None, q, q) is None


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "eager"])
def test_padding_free_batch_loss_equals_the_padded_batch(tiny_base, tokenizer, examples, attn):
    model = load(tiny_base, attn)
    free = collate(examples, tokenizer, padding_free=True)
    padded = collate(examples, tokenizer, padding_free=False)
    assert padded["input_ids"].shape == (len(LENGTHS), max(LENGTHS))
    # The same tokens carry loss (after the shift): each document's own, none across a boundary.
    assert (free["labels"][:, 1:] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        loss_free = model(**free, use_cache=False).loss  # as the trainer calls it: cu_seq_lens etc. included
        loss_padded = model(**padded, use_cache=False).loss
    assert abs(loss_free - loss_padded) < 1e-5, (loss_free, loss_padded)


ROWS = [{"instruction": "Repeat: " + " ".join(["word"] * n), "output": " ".join(["ok"] * (1 + n % 5))}
        for n in (1, 40, 3, 12, 60, 2, 25, 7)]  # long-tailed lengths, so padding matters


def run_cfg(tmp_path, tiny_base, name, **training):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return config_from_dict({
        "model": {"name": str(tiny_base)},
        "lora": {"r": 4, "dropout": 0.0},  # no dropout: both runs must see identical computations
        "data": {"train": str(data), "cache": False},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
                     "save_strategy": "no", "max_length": 256, **training},
        "output_dir": str(tmp_path / name),
    })


@pytest.mark.slow
def test_training_padding_free_matches_padded_loss_trajectory(tmp_path, tiny_base):
    runs = {}
    for padding_free in (True, False):
        run = train(run_cfg(tmp_path, tiny_base, f"pf-{padding_free}", padding_free=padding_free), progress=False)
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        runs[padding_free] = ([r["loss"] for r in log if "loss" in r], json.loads((run / "metrics.json").read_text()))
    (free, free_metrics), (padded, padded_metrics) = runs[True], runs[False]
    assert len(free) == len(padded) == 4
    # Same batches, same masks, fp32: the trajectories agree to float summation order.
    assert free == pytest.approx(padded, abs=1e-4), (free, padded)
    assert free[-1] < free[0]  # and it trained
    # Real tokens seen agree too, though pad == EOS here: padding-free counts every token of its row.
    assert free_metrics["trained_tokens"] == padded_metrics["trained_tokens"] > 0


def test_defaults_are_padding_free_and_switch_off(tmp_path, tiny_base):
    assert TRAINING_DEFAULTS["padding_free"] is True
    args = make_sft_config(run_cfg(tmp_path, tiny_base, "a"), torch.float32)
    # TRL refuses padding-free with max_length set (it would not truncate); the data stage already did.
    assert args.padding_free and args.max_length is None
    assert args.include_num_input_tokens_seen == "all"
    from peft_pipeline.config import ModelSection
    from peft_pipeline.model.load import resolve_attention

    assert resolve_attention(ModelSection()) == "sdpa_varlen"  # CPU (no flash-attn): SDPA split by document
    assert resolve_attention(ModelSection(attn_implementation="sdpa")) == "sdpa"
    # CPU: no Liger, no gradient checkpointing unless asked for.
    assert not args.use_liger_kernel and not args.gradient_checkpointing

    off = make_sft_config(run_cfg(tmp_path, tiny_base, "b", padding_free=False, gradient_checkpointing=True), torch.float32)
    assert not off.padding_free and off.max_length == 256
    assert off.include_num_input_tokens_seen == "non_padding" and off.gradient_checkpointing


def test_gradient_checkpointing_estimate(monkeypatch, tiny_base):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)  # 2 layers, hidden 64, intermediate 128, fp32
    per_token = 2 * (16 * 64 + 6 * 128) * 4  # bytes of activations, layers x values x fp32
    logits = model.config.vocab_size * (4 + 8)  # fp32 logits and their fp32 loss copy, per token
    weights = sum(p.numel() * 4 for p in model.parameters())
    args = {"per_device_train_batch_size": 8, "max_length": 1024}
    need = weights + 8 * 1024 * (per_token + logits)  # preflight.activation_bytes, no checkpointing
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for total, expected in ((int(need / 0.9) + 1, False), (int(need / 0.9) - 1, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, t=total: SimpleNamespace(total_memory=t))
        assert needs_gradient_checkpointing(args, model) is expected
