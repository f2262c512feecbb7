"""GGUF files checked in llama.cpp itself against the merged model they were made from.

The reference is the merged model in transformers (float32): its greedy answer to each probe, and
its top-1/top-2 logit margin at every step of that answer. llama_probe.mjs then runs each GGUF the
way a llama.cpp user does (the GGUF's chat template, its end-of-generation tokens, greedy) and also
evaluates the reference answer teacher-forced, giving llama.cpp's argmax at each of its positions.

Per GGUF: top-1 agreement (share of reference answer positions, stop token included, where
llama.cpp's argmax is the reference token), greedy identical (probes whose llama.cpp answer equals the
reference token for token), ties (the others, when they first differ where the reference's top two
logits are closer than TIE_MARGIN: a choice any rounding can flip) and the task score of its answers.
Rules: f16 and bf16 must reproduce every greedy answer, ties aside; any type below MIN_TOP1 agreement
is broken. Other lossy types are reported, not gated.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from peft_pipeline.errors import UserError

TIE_MARGIN = 0.05  # logits; reference top-1 minus top-2 below this is a near-tie
MIN_TOP1 = 0.5  # below this share of agreeing positions a quantized file is broken, not merely lossy
EXACT_TYPES = ("f16", "bf16")  # must reproduce the merged model's greedy answers
PROBE_TOKENS = 24  # new tokens per built-in probe prompt (test prompts get eval's max_new_tokens)
PROBE_SCRIPT = Path(__file__).with_name("llama_probe.mjs")


def threads() -> int:
    """llama.cpp threads: OMP_NUM_THREADS, else half the cores, at most 4 (its own default oversubscribes)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class Probe:
    """One prompt and the merged model's greedy answer to it."""

    messages: list[dict] | None
    text: str | None
    prompt_ids: list[int]
    answer: list[int]  # greedy tokens, the stop token included when it stopped
    margins: list[float]  # reference top-1 minus top-2 logit at each answer position
    stopped: bool
    max_tokens: int
    expected: str | None = None  # the test answer (test prompts only)

    def job(self) -> dict:
        job = {"messages": self.messages} if self.messages is not None else {"text": self.text}
        return {**job, "max_tokens": self.max_tokens, "forced": self.prompt_ids + self.answer,
                "start": len(self.prompt_ids)}


def reference(model_dir: Path, tok, prompts: list, stop: list[int], max_new_tokens: int) -> list[Probe]:
    """The merged model's greedy answers and logit margins (transformers, float32, one prompt at a time)."""
    import torch
    from transformers import AutoModelForCausalLM

    from peft_pipeline.evaluate.generate import encode
    from peft_pipeline.evaluate.parity import greedy

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p, n in prompts:
        ids = encode(p, tok)
        answer = greedy(model, torch.tensor([ids]), n, stop)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0, len(ids) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        out.append(Probe(p.messages, p.text, ids, answer, (top2[:, 0] - top2[:, 1]).tolist(),
                         bool(answer) and answer[-1] in stop, n, p.expected))
    return out


def run_probe(inst, files: list[Path], probes: list[Probe]) -> list[dict]:
    """llama_probe.mjs on every file (one node process); its per-file answers."""
    request = {"entry": str(inst.node_package / "dist" / "index.js"), "threads": threads(),
               "models": [str(f) for f in files], "jobs": [p.job() for p in probes]}
    r = subprocess.run(["node", str(PROBE_SCRIPT)], input=json.dumps(request), capture_output=True, text=True)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise UserError(f"llama.cpp (node-llama-cpp) could not run the GGUF: {(err or ['no output'])[-1][:400]}")
    return json.loads(r.stdout)["models"]


def compare(quant: str, probes: list[Probe], answer: dict, stop: list[int], tok) -> dict:
    """One GGUF's answers against the reference: agreement, greedy identical / ties, task score, pass or fail."""
    from peft_pipeline.evaluate.metrics import score

    agree = positions = identical = ties = same_prompt = 0
    diverged = []
    for i, (p, got) in enumerate(zip(probes, answer["results"])):
        agree += sum(a == b for a, b in zip(got["argmax"], p.answer))
        positions += len(p.answer)
        same_prompt += got["prompt_ids"] == p.prompt_ids
        at = _first_difference(p, got, stop)
        if at is None:
            identical += 1
        elif at < len(p.margins) and p.margins[at] < TIE_MARGIN:
            ties += 1
        else:
            diverged.append({"probe": i, "at_token": at, "reference": tok.decode(p.answer)[:200], "llama_cpp": got["text"][:200]})
    top1 = agree / max(positions, 1)
    result = {"top1_agreement": top1, "positions": positions, "greedy_identical": identical, "greedy_ties": ties,
              "probes": len(probes), "prompt_tokens_identical": same_prompt, "diverged": diverged[:5],
              "seconds": answer["seconds"], "seconds_by_step": answer.get("spent")}
    tests = [(p, got) for p, got in zip(probes, answer["results"]) if p.expected is not None]
    if tests:
        result["test_scores"] = score([got["text"].strip() for _, got in tests], [p.expected for p, _ in tests])
    reasons = []
    if quant in EXACT_TYPES and diverged:
        reasons.append(f"{len(diverged)} of {len(probes)} greedy answers differ from the merged model (not at a near-tie)")
    if top1 < MIN_TOP1:
        reasons.append(f"top-1 agreement {top1:.1%} < {MIN_TOP1:.0%}: broken, not merely lossy")
    result["status"] = "failed" if reasons else "ok"
    result["reason"] = "; ".join(reasons) or None
    return result


def _first_difference(p: Probe, got: dict, stop: list[int]) -> int | None:
    """Index of the first answer token where llama.cpp's greedy answer leaves the reference (None: same answer).

    Both sides are compared up to and including their end: the reference's stop token, llama.cpp's
    end of generation (its EOG tokens are not returned, so an early end shows as a shorter answer).
    """
    ref = [t for t in p.answer if t not in stop]
    tokens = got["tokens"]
    for k, (a, b) in enumerate(zip(ref, tokens)):
        if a != b:
            return k
    if len(ref) == len(tokens) and (p.stopped == got["stopped"] or len(ref) == p.max_tokens):
        return None
    return min(len(ref), len(tokens))
