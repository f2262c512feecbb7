"""Self-replay (data.replay.path: self): replay rows whose answers are the base's own, asked before training.

The bundled replay set's questions (data/make_replay.py) are put to the base, greedy, as the forgetting
check asks; each answer that ends (stop token within MAX_NEW_TOKENS) becomes a replay row. Training on
them pulls the adapter toward what the base already says, in its own words, rather than toward the
bundled set's short template answers. The rows are cached per base, tokenizer, template and system
prompt (<cache>/replay-self/KEY.jsonl), so a rerun, a resume and every trial of a sweep reuse them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from peft_pipeline.config import RunConfig

MAX_NEW_TOKENS = 64  # the base's answers to the replay questions are a sentence or two; unfinished ones are left out


def resolve(cfg: RunConfig, path: str, tokenizer) -> RunConfig:
    """`cfg` with data.replay.path 'self' replaced by the generated file (the same cfg when replay is not 'self')."""
    replay = cfg.data.replay
    if replay is None or replay.path != "self":
        return cfg
    file = self_replay_file(cfg, path, tokenizer)
    data = cfg.data.model_copy(update={"replay": replay.model_copy(update={"path": str(file), "format": "alpaca"})})
    return cfg.model_copy(update={"data": data})


def self_replay_file(cfg: RunConfig, path: str, tokenizer) -> Path:
    """The cached self-replay rows for this base (generated on first use)."""
    from peft_pipeline.data.build import REPLAY_BUNDLED
    from peft_pipeline.paths import atomic_file, cache_dir, file_digest

    questions = [json.loads(line)["instruction"] for line in REPLAY_BUNDLED.read_text(encoding="utf-8").splitlines()]
    weights = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    key = hashlib.sha256(json.dumps([path, [file_digest(w) for w in weights], str(tokenizer.chat_template),
                                     cfg.data.system_prompt, file_digest(REPLAY_BUNDLED), MAX_NEW_TOKENS]).encode())
    file = cache_dir() / "replay-self" / f"{key.hexdigest()[:20]}.jsonl"
    if file.is_file():
        return file
    rows = ask_base(cfg, path, tokenizer, questions)
    if not rows:
        from peft_pipeline.errors import UserError

        raise UserError(f"data.replay.path: self: the base finished none of its {len(questions)} answers within "
                        f"{MAX_NEW_TOKENS} tokens (does it emit its stop token?); use path: bundled", exit_code=2)
    with atomic_file(file) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"[peft-pipeline] self-replay: {len(rows)} of {len(questions)} base answers kept (finished within "
          f"{MAX_NEW_TOKENS} tokens) -> {file}", flush=True)
    return file


def ask_base(cfg: RunConfig, path: str, tokenizer, questions: list[str]) -> list[dict[str, str]]:
    """The base's finished greedy answers to `questions`, as alpaca rows."""
    import torch

    from peft_pipeline.data.template import stop_ids
    from peft_pipeline.evaluate.generate import Prompt, Sampling, generate
    from peft_pipeline.evaluate.retention import rng_kept
    from peft_pipeline.model.load import load_base

    model = load_base(cfg.model, cfg.quantization, path).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    prompts = [Prompt(messages=system + [{"role": "user", "content": q}]) for q in questions]
    with rng_kept():
        got = generate(model, tokenizer, prompts, stop_ids(tokenizer), Sampling(max_new_tokens=MAX_NEW_TOKENS),
                       int(cfg.sft_args.get("per_device_eval_batch_size", 8)), desc="Self-replay (base)")
    del model
    return [{"instruction": q, "output": a.text.strip()} for q, a in zip(questions, got) if a.stopped and a.text.strip()]
