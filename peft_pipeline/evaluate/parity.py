"""Parity: do two models answer alike? Logits, losses and greedy choices, compared on the same tokens.

Shared by merge (merged vs base + adapter, and vs the adapter on the quantized base) and export
(the GGUF file vs the merged model it was written from): one definition of "equal" for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOLERANCE = 1e-3  # max |logit difference| allowed between merged and base + adapter, both float32
N_SAMPLES = 4  # examples from the run's data used for the checks
MAX_SAMPLE_TOKENS = 256  # longer examples are cut: the check needs tokens, not whole documents
GEN_TOKENS = 24  # greedy tokens generated per prompt

BUILTIN_PROMPTS = (
    "Write one sentence about the sea.",
    "What is 12 times 7? Answer with the number only.",
    "Name three colours, separated by commas.",
    "Translate 'good morning' into French.",
)


@dataclass
class Sample:
    """One example for the checks: its tokens, the loss mask, and the prompt for greedy generation."""

    ids: list[int]
    labels: list[int]  # -100 where no loss, as in training
    prompt: list[int]
    continuations: dict[str, list[int]] = field(default_factory=dict)  # greedy tokens after `prompt`, by model


def to_sample(example: dict, tokenizer, train_on_prompt: bool) -> Sample | None:
    """Render one normalized example with the data stage's template and mask; None if unusable."""
    from peft_pipeline.data.template import render, tokenize

    ids, labels = tokenize(render(example, tokenizer, train_on_prompt), tokenizer)
    if "messages" in example:
        msgs = example["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif "prompt" in example:
        prompt = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
    else:
        prompt = ids[: max(1, min(32, len(ids) // 2))]
    ids, labels, prompt = ids[:MAX_SAMPLE_TOKENS], labels[:MAX_SAMPLE_TOKENS], prompt[-MAX_SAMPLE_TOKENS:]
    return Sample(ids, labels, prompt) if len(ids) > 1 and prompt else None


def builtin_samples(tokenizer) -> list[Sample]:
    """Fixed chat prompts; the loss is then plain next-token loss over the whole prompt."""
    out = []
    for text in BUILTIN_PROMPTS[:N_SAMPLES]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(Sample(ids, list(ids), ids))
    return out


@dataclass
class Measured:
    """What one model does on the samples."""

    logits: list = field(default_factory=list)  # per sample, (tokens, vocab) float32 on CPU
    loss: float | None = None  # mean over the tokens that carry loss in training
    # continuation name -> per sample (continuation, logits at the positions that predict its tokens)
    probes: dict[str, list] = field(default_factory=dict)


def generate(model, samples: list[Sample], name: str, stop: list[int], tokenizer=None) -> None:
    """Greedy continuations of every prompt by `model` (GEN_TOKENS at most, ending at a stop token), by `name`."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        for s in samples:
            s.continuations[name] = greedy(model, torch.tensor([s.prompt], device=device), GEN_TOKENS, stop)


def measure(model, samples: list[Sample], probes: tuple[str, ...]) -> Measured:
    """Logits and loss on every sample, and logits along the named greedy continuations.

    Greedy decoding is a function of the prefix, so two models generate the same continuation
    exactly when their argmaxes agree at every position of one teacher-forced pass over it: one
    forward pass per model and prompt instead of GEN_TOKENS decoding steps.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = Measured(probes={name: [] for name in probes})
    total, count = 0.0, 0

    def forward(ids: list[int]):
        return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()

    with torch.inference_mode():
        for s in samples:
            logits = forward(s.ids)
            out.logits.append(logits)
            labels = torch.tensor(s.labels[1:])
            mask = labels != -100
            total += F.cross_entropy(logits[:-1][mask], labels[mask], reduction="sum").item() if mask.any() else 0.0
            count += int(mask.sum())
            for name in probes:
                cont = s.continuations[name]
                start = len(s.prompt) - 1  # logits at position i predict token i + 1
                out.probes[name].append((cont, forward(s.prompt + cont)[start:start + len(cont)]))
    out.loss = total / count if count else None
    return out


def compare(ref: Measured, got: Measured, probe: str, gate: bool = False, tolerance: float = TOLERANCE) -> dict:
    """Logit differences (examples and continuations), losses and greedy agreement of `got` against `ref`.

    With `gate`, also whether `got` passes: finite, max |diff| below the tolerance, same greedy choices.
    """
    import torch

    pairs = list(zip(ref.logits, got.logits)) + [(a, b) for (_, a), (_, b) in zip(ref.probes[probe], got.probes[probe])]
    diffs = [(a - b).abs() for a, b in pairs]
    max_diff = max(float(d.max()) for d in diffs)
    mean_diff = float(torch.cat([d.flatten() for d in diffs]).mean())
    greedy = [agreement(a, b, tolerance) for (_, a), (_, b) in zip(ref.probes[probe], got.probes[probe])]
    result = {
        "max_abs_diff": max_diff,
        "mean_abs_diff": mean_diff,
        "loss_reference": ref.loss,
        "loss": got.loss,
        "prompts": len(greedy),
        "greedy_identical": sum(g["identical"] for g in greedy),
        "greedy_ties": sum(g["tie"] for g in greedy),
        "greedy": greedy,
    }
    if gate:
        mismatched = [i for i, g in enumerate(greedy) if not g["identical"] and not g["tie"]]
        reasons = []
        if not all(bool(torch.isfinite(b).all()) for _, b in pairs):
            reasons.append("non-finite logits")
        if not max_diff < tolerance:
            reasons.append(f"max |logit diff| {max_diff:.3g} >= {tolerance:g}")
        if mismatched:
            at = [greedy[i]["diverges_at"] for i in mismatched]
            reasons.append(f"greedy generations differ on prompt(s) {mismatched} at new token(s) {at}")
        result["passed"] = not reasons
        result["reason"] = "; ".join(reasons) or None
    return result


def agreement(ref_logits, got_logits, tolerance: float) -> dict:
    """Whether two models make the same greedy choice at every step of one continuation.

    Along the reference's own greedy continuation this is "generates the same tokens". A
    divergence at a tie (the two tokens' reference logits closer than the tolerance) can flip
    under any rounding, so it is reported but does not fail the check; any other divergence does.
    """
    ref_choice, got_choice = ref_logits.argmax(-1).tolist(), got_logits.argmax(-1).tolist()
    at = next((k for k, (a, b) in enumerate(zip(ref_choice, got_choice)) if a != b), None)
    if at is None:
        return {"identical": True, "tie": False, "diverges_at": None}
    margin = abs(float(ref_logits[at][ref_choice[at]] - ref_logits[at][got_choice[at]]))
    return {"identical": False, "tie": margin < tolerance, "diverges_at": at}


def greedy(model, ids, n: int, stop: list[int] | None = None) -> list[int]:
    """Up to n argmax tokens after `ids` (1 x tokens) with a KV cache; with `stop`, ending at (and keeping) a stop token.

    Without `stop` both models of a comparison are compared on all n tokens (no early stop).
    """
    import torch

    stops = set(stop or ())
    with torch.inference_mode():
        out, tokens = model(input_ids=ids, use_cache=True), []
        while len(tokens) < n:
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt.item())
            if tokens[-1] in stops or len(tokens) == n:  # the last token needs no forward pass of its own
                break
            # transformers >= 5.2x names the KV cache `cache` (past_key_values is deprecated); older ones do not
            cache = {"cache": out.cache} if hasattr(out, "cache") else {"past_key_values": out.past_key_values}
            out = model(input_ids=nxt, use_cache=True, **cache)
    return tokens
