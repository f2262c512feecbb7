"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built from a config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach a hub; fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PEFT_PIPELINE_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models run faster, and on a busy 2-core machine
    OpenMP's waits for a descheduled second thread made them 10x slower (subprocesses: sub_env)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def decoded_runs(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """Contiguous runs of trained tokens (label != -100), decoded."""
    runs, cur = [], []
    for i, label in zip(ids, labels):
        if label != -100:
            cur.append(i)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_run(tmp_path: Path, base: Path, tokenizer, rows: list[dict], test_rows: list[dict] | None = None,
             quantization: str = "none", seed: int = 1) -> Path:
    """A run dir as `train` writes it (config.yaml + adapter/), with random LoRA B weights.

    A freshly initialized LoRA is a no-op (B = 0), which would make merge and eval checks pass
    trivially; random B makes the adapter's outputs differ from the base's.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_pipeline.config import RunConfig
    from peft_pipeline.train.loop import save_adapter

    run = tmp_path / "run"
    data = tmp_path / "data"
    section = {"train": [str(write_jsonl(data / "train.jsonl", rows))],
               "eval": [str(write_jsonl(data / "eval.jsonl", rows[1:] or rows))], "cache": False}
    if test_rows:
        section["test"] = str(write_jsonl(data / "test.jsonl", test_rows))
    cfg = RunConfig.model_validate({"model": {"name": str(base)}, "quantization": {"mode": quantization},
                                    "data": section, "training": {"max_length": 256}, "output_dir": str(run)})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    save_adapter(get_peft_model(model, lora), tokenizer, run / "adapter")
    return run


# Tiny configs per family (issue #15): 2 layers, hidden 64, and what each family needs on top to
# build at that size and to convert with llama.cpp as its real checkpoints do (gemma's default
# head_dim is 256; Phi-2 and GPT-2 have no GQA and a 4x MLP; GPT-2 configs carry n_ctx). Gemma 2/3
# windows are small enough that a packed document outgrows them; Mistral's is v0.1's, larger than any
# test context. The vocabulary is the real tokenizer's 49152 tokens, so the embedding dominates.
_TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 4096},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16},
    "phi3": {},
    "phi": {"num_key_value_heads": 4, "intermediate_size": 256},
    "olmo2": {},
    "smollm3": {},
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 1024, "n_ctx": 1024},
    "gpt_neox": {"tie_word_embeddings": False},
}
FAMILIES = [*FAMILY_CONFIGS, "gemma3"]


def family_config(model_type: str, tokenizer, **overrides):
    """A transformers config of `model_type` at test size, with the tokenizer's vocabulary and special ids."""
    from transformers import AutoConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if model_type == "gemma3":  # multimodal: the text decoder plus a one-layer SigLIP tower on 28-pixel images
        text = {**_TINY, **ids, **FAMILY_CONFIGS["gemma3_text"]}
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    **{k: v for k, v in ids.items() if k != "vocab_size"})
    base = {} if model_type == "gpt2" else dict(_TINY)
    return AutoConfig.for_model(model_type, **{**base, **ids, **FAMILY_CONFIGS[model_type], **overrides})


def make_tiny_family(path: Path, tokenizer, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of `model_type` with the given tokenizer (gemma3: image-text-to-text).

    A tokenizer loaded from a make_spm_tokenizer dir brings its tokenizer.model along, as the real
    checkpoints of SentencePiece families ship it (transformers 5 saves without it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    cfg = family_config(model_type, tokenizer, **overrides)
    auto = AutoModelForImageTextToText if model_type == "gemma3" else AutoModelForCausalLM
    model = auto.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    spm = Path(tokenizer.name_or_path) / "tokenizer.model"
    if spm.is_file():
        shutil.copy(spm, path / "tokenizer.model")
    return path


# Families whose real checkpoints ship a SentencePiece tokenizer.model, which llama.cpp's converter reads
# their vocabulary from (SmolLM2's BPE tokenizer.json cannot stand in for it), and the HF tokenizer class
# their checkpoints declare: Gemma's adds no space prefix; Phi-3's is Llama's, with the prefix at the start
# and after each special token, as llama.cpp's SentencePiece tokenizer does for it.
SPM_FAMILIES = {"gemma": "GemmaTokenizer", "gemma2": "GemmaTokenizer", "phi3": "LlamaTokenizer"}

# A SentencePiece model trained on the orders data, normalized as Gemma's and Llama's are (identity, spaces
# kept), with ChatML's turn markers as control pieces (special tokens in HF and llama.cpp alike).
_SPM_SCRIPT = """\
import sentencepiece as spm, sys
from pathlib import Path
from transformers import AutoTokenizer
corpus, out, template, llama = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]).read_text(), sys.argv[4] == "1"
pieces = {} if llama else {"bos_piece": "<bos>", "eos_piece": "<eos>"}  # Gemma's names: GemmaTokenizer adds <bos>
spm.SentencePieceTrainer.train(input=corpus, model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
                               pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, minloglevel=2,
                               normalization_rule_name="identity", remove_extra_whitespaces=False,
                               add_dummy_prefix=llama, control_symbols=["<|im_start|>", "<|im_end|>"], **pieces)
tok = AutoTokenizer.from_pretrained(out)  # the class in tokenizer_config.json makes tokenizer.json from the .model
if template:
    tok.chat_template = template
tok.save_pretrained(out)
"""


def make_spm_tokenizer(path: Path, chat_template: str | None = None, tokenizer_class: str = "GemmaTokenizer") -> Path:
    """A small SentencePiece tokenizer at `path`: tokenizer.model and the HF files made from it.

    Vocabulary of 400 BPE pieces with byte fallback, trained on data/orders; EOS is `<|im_end|>`,
    so with SmolLM2's ChatML template (`chat_template`) the pipeline trains and stops as it does on
    SmolLM2. sentencepiece comes from llama.cpp's install (not the venv), in a subprocess because
    transformers decides at import time whether it has it; skips when that install is missing.
    """
    from peft_pipeline.errors import UserError
    from peft_pipeline.export.llamacpp import locate

    try:
        deps = locate().python_deps
    except UserError as e:
        pytest.skip(f"a SentencePiece tokenizer needs sentencepiece from llama.cpp's install: {e}")
    path.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (REPO / "data" / "orders" / "train.jsonl").read_text().splitlines()]
    (path / "corpus.txt").write_text("\n".join(f"{r['input']} {r['output']}" for r in rows) * 3)
    (path / "chat_template.txt").write_text(chat_template or "")
    llama = tokenizer_class == "LlamaTokenizer"
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<s>" if llama else "<bos>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "pad_token": "<pad>", **({"legacy": True} if llama else {"add_bos_token": True})}))
    subprocess.run([sys.executable, "-c", _SPM_SCRIPT, str(path / "corpus.txt"), str(path), str(path / "chat_template.txt"),
                    "1" if llama else "0"], env={**os.environ, "PYTHONPATH": str(deps)}, check=True, capture_output=True)
    for scratch in ("corpus.txt", "chat_template.txt", "tokenizer.vocab"):
        (path / scratch).unlink(missing_ok=True)
    if llama:  # transformers 5 saves without `legacy`, and rebuilds a LlamaTokenizer without it as non-legacy
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    return path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, tokenizer):
    """tiny_family(model_type) -> a cached tiny random model dir of that family (read-only by convention).

    SmolLM2's tokenizer, except SPM_FAMILIES: a SentencePiece one (make_spm_tokenizer, built once) as their
    real checkpoints have.
    """
    from transformers import AutoTokenizer

    made: dict[str, Path] = {}
    spm: dict[str, object] = {}  # tokenizer class -> tokenizer

    def get(model_type: str) -> Path:
        if model_type not in made:
            tok = tokenizer
            if model_type in SPM_FAMILIES:
                cls = SPM_FAMILIES[model_type]
                if cls not in spm:
                    spm[cls] = AutoTokenizer.from_pretrained(make_spm_tokenizer(
                        tmp_path_factory.mktemp("spm"), tokenizer.chat_template, cls))
                tok = spm[cls]
            made[model_type] = make_tiny_family(tmp_path_factory.mktemp(model_type) / "base", tok, model_type)
        return made[model_type]

    return get
