"""Held-out preference scores for `eval`: does the model score the chosen answer above the rejected one?

For each pair, the log-probability of each completion given the prompt (summed over the completion's
tokens, with the ids TRL's DPO trains on: data.preference.pair_ids) under each model:
  accuracy       share of pairs with logp(chosen) > logp(rejected)
  margin         mean of logp(chosen) - logp(rejected), in nats
and, when the base is scored too (--compare-base: the same weights with the adapter off), DPO's own
view with the base as reference:
  reward_accuracy  share of pairs whose implicit reward (adapter logp - base logp) is higher for chosen
  reward_margin    mean of that reward difference, in nats (DPO's rewards/margins divided by beta)
Pairs come from --pairs FILE, else from the run's held-out pairs (data.eval, or val_fraction of train).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from peft_pipeline.errors import UserError


def load_pairs(target, pairs: str | None, limit: int | None) -> dict | None:
    """Rendered held-out pairs ({prompt, chosen, rejected} strings) and where they came from, or None."""
    from peft_pipeline.config import DataSource
    from peft_pipeline.data.build import split_holdout
    from peft_pipeline.data.preference import read_rows

    cfg = target.config
    seed = cfg.seed if cfg is not None else 42
    described: list[str] = []
    if pairs is not None:
        if not Path(pairs).expanduser().is_file():
            raise UserError(f"--pairs: {pairs} not found", exit_code=2)
        rows, source = read_rows([DataSource(path=pairs)], "dpo", seed, described), pairs
    elif cfg is not None and cfg.method in ("dpo", "orpo", "cpo", "kto") and (cfg.data.eval or cfg.data.val_fraction):
        if cfg.data.eval:
            rows = read_rows(cfg.data.eval, cfg.method, seed, described)
            source = ", ".join(s.path for s in cfg.data.eval)
        else:
            rows = split_holdout(read_rows(cfg.data.train, cfg.method, seed, described), cfg.data.val_fraction, seed)[1]
            source = f"val_fraction={cfg.data.val_fraction} of train"
        rows = [r for r in rows if "chosen" in r]  # KTO's rated completions have no pair to compare
    else:
        return None
    if not rows:
        raise UserError(f"{source}: no preference pairs (prompt/chosen/rejected) to score", exit_code=2)
    return {"source": source, "rows": rows[:limit] if limit else rows}


def render_pairs(rows: list[dict], tokenizer, system_prompt: str | None) -> list[dict]:
    """Each pair rendered with the run's chat template (the tokenizer saved with the adapter)."""
    from peft_pipeline.data.preference import render_row

    return [render_row(r, tokenizer, system_prompt) for r in rows]


def completion_logps(model, tokenizer, rendered: list[dict], batch_size: int = 8, progress: bool = False,
                     desc: str = "Pairs") -> list[tuple[float, float]]:
    """(logp chosen, logp rejected) per pair, each summed over the completion's tokens."""
    from tqdm.auto import tqdm

    from peft_pipeline.data.preference import pair_ids

    seqs: list[tuple[list[int], int]] = []  # (prompt + completion ids, prompt length)
    for r in rendered:
        p, (c, rj) = pair_ids(tokenizer, r["prompt"], [r["chosen"], r["rejected"]])
        seqs += [(p + c, len(p)), (p + rj, len(p))]
    out: list[float] = []
    for start in tqdm(range(0, len(seqs), batch_size), desc=desc, disable=not progress, file=sys.stderr):
        out += _batch_logps(model, seqs[start:start + batch_size], tokenizer.pad_token_id or 0)
    return list(zip(out[0::2], out[1::2]))


def _batch_logps(model, batch: list[tuple[list[int], int]], pad_id: int) -> list[float]:
    """Summed log-probabilities of each sequence's tokens after its prompt (right padding, positions 0..n-1)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(batch):
        x[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
        scored[i, n_prompt:len(ids)] = True
    with torch.inference_mode():
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
    # Position t predicts token t+1.
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
    return (logps * scored[:, 1:].to(device)).sum(-1).tolist()


def summarize(logps: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Accuracy and margin per model; DPO's implicit-reward accuracy and margin when the base was scored."""
    out: dict[str, Any] = {}
    for name, pairs in logps.items():
        n = len(pairs)
        out[name] = {"accuracy": sum(c > r for c, r in pairs) / n, "margin": sum(c - r for c, r in pairs) / n, "n": n}
    trained = [name for name in logps if name != "base"]
    if "base" in logps and trained:
        base, mine = logps["base"], logps[trained[-1]]
        diffs = [(c - bc) - (r - br) for (c, r), (bc, br) in zip(mine, base)]
        out[trained[-1]]["reward_accuracy"] = sum(d > 0 for d in diffs) / len(diffs)
        out[trained[-1]]["reward_margin"] = sum(diffs) / len(diffs)
    return out


def score_models(model, tokenizer, names: list[str], pairs: dict, system_prompt: str | None, batch_size: int,
                 progress: bool) -> dict[str, Any]:
    """report["preference"]: the pairs' source and each model's scores ("base" = the adapter switched off)."""
    from peft_pipeline.evaluate.generate import adapter_off

    rendered = render_pairs(pairs["rows"], tokenizer, system_prompt)
    logps = {}
    for name in names:
        with adapter_off(model, name == "base"):
            logps[name] = completion_logps(model, tokenizer, rendered, batch_size, progress, f"Pairs ({name})")
    return {"data": pairs["source"], **summarize(logps)}
