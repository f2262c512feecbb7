"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built from a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never reach a hub; fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PEFT_PIPELINE_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def base_dir() -> Path:
    """The embedded base as a safetensors dir (converted once per cache)."""
    from peft_pipeline.paths import embedded_base_dir

    return embedded_base_dir()


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    """The real SmolLM2 tokenizer (chatml template, EOS <|im_end|>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def make_tiny_llama(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer random llama with the real tokenizer: a base model for fast tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """A tiny random llama dir shared by the session (read-only by convention)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", tokenizer)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
