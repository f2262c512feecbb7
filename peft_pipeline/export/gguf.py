"""Export stage: a merged model directory in, one GGUF file out, and a check that it round-trips.

Owns the GGUF writer (`write_gguf`: hyperparameters, tokenizer and tensors under llama.cpp's keys,
names and layouts, f16 or q8_0) and its verification (`verify_gguf`: load the file back through
transformers' GGUF loader and compare logits, greedy generations and tokenization with the source).

Supported: config.json `model_type` llama, mistral (written as llama, as llama.cpp's own converter
does) and qwen2, with a byte-level BPE tokenizer (GPT-2 style: SmolLM, Llama 3, Qwen2, Mistral Nemo).
SentencePiece tokenizers (Llama 2, Mistral 7B v0.x) need llama.cpp's convert_hf_to_gguf.py.

transformers' GGUF reader ignores three things llama.cpp reads, so verify_gguf reports a difference
for models that use them although the file is right for llama.cpp: llama3 and linear rope scaling
(Llama 3.1/3.2 have the former) and llama attention biases.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peft_pipeline.errors import UserError
from peft_pipeline.evaluate.parity import chat_probe, default_prompts, greedy
from peft_pipeline.paths import atomic_file

# config.json model_type -> GGUF architecture. llama.cpp has no separate mistral graph: its converter
# writes MistralForCausalLM as llama and ignores the sliding window, and so do we.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
QUANTS = ("f16", "q8_0")

# llama.cpp's llama graph applies rope to adjacent pairs (GPT-J style); HF rotates the two halves of
# each head. Its converter permutes q/k rows to match, and transformers' loader undoes exactly that.
# qwen2 runs with NEOX (halves) rope in llama.cpp, so its rows stay in HF order.
_PERMUTE_QK = {"llama"}

# The few strings verify_gguf tokenizes on both sides: digits, whitespace runs, non-Latin text,
# contractions and an emoji are where pre-tokenizers disagree first.
_PROBE_TEXTS = (
    "Hello world! The year 2024 had 365 days.",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "naïve café, Ünïcödé, 我想在apple工作, нещо на Български 🦙",
    "I've been 'told he's there, 'RE you sure? 3.14159 33333",
)


def write_gguf(
    model_dir: Path, out_file: Path, quant: str = "f16", progress: bool = True, name: str | None = None
) -> Path:
    """Write the HF causal-LM in `model_dir` as one GGUF file at `out_file` (atomically); return its path."""
    import gguf
    import numpy as np
    from tqdm.auto import tqdm

    model_dir, out_file = Path(model_dir), Path(out_file)
    qtype = _quant_type(quant)
    config = _load_config(model_dir)
    arch = GGUF_ARCH[config.model_type]

    writer = gguf.GGUFWriter(path=None, arch=arch)
    _add_general(writer, name or model_dir.resolve().name, qtype)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, model_dir, config)
    with _SafetensorsSource(model_dir) as source, atomic_file(out_file) as tmp:
        tensors = _plan_tensors(source, config, arch, qtype)
        for t in tensors:
            # Element shapes with a float dtype: GGUFWriter would reinterpret a uint8 shape as bytes.
            writer.add_tensor_info(t.name, t.shape, np.float32, t.nbytes, raw_dtype=t.qtype)
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # One tensor in memory at a time: a 7B model exports in about one layer's worth of RAM.
            for t in tqdm(tensors, desc=f"GGUF {quant}", unit="tensor", disable=not progress):
                writer.write_tensor_data(gguf.quants.quantize(t.load(), t.qtype))
        finally:
            writer.close()
    return out_file


# ---------------------------------------------------------------------------------------------------
# Checking the inputs


def _quant_type(quant: str):
    import gguf

    types = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if quant not in types:
        raise UserError(f"--quant: '{quant}' is not a GGUF type this exporter writes; use one of {', '.join(QUANTS)}",
                        exit_code=2)
    return types[quant]


def _load_config(model_dir: Path):
    """The model's config, after the checks that need only config.json (cheap, before any weights)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir}: no config.json; export needs a merged model directory "
                        "(run `peft-pipeline merge` first)")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type not in GGUF_ARCH:
        raise UserError(
            f"{config_file}: model_type '{model_type}' has no GGUF writer here; supported: "
            f"{', '.join(sorted(GGUF_ARCH))} (for others use llama.cpp's convert_hf_to_gguf.py)"
        )
    if raw.get("quantization_config"):
        raise UserError(f"{config_file}: the weights are quantized ({raw['quantization_config'].get('quant_method')}); "
                        "export needs the full-precision merged model (`peft-pipeline merge` writes one)")
    from transformers import AutoConfig

    # AutoConfig, not the raw JSON: it folds old keys (rope_theta, rope_scaling) into rope_parameters.
    return AutoConfig.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------------
# Metadata


def _add_general(writer, name: str, qtype) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    file_type = {gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
                 gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_hyperparameters(writer, config) -> None:
    """The `{arch}.*` keys llama.cpp sizes its graph from (and transformers rebuilds a config from)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    # Written even when equal to hidden/heads: Mistral Nemo's head_dim is not, and llama.cpp reads it here.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def _rope_parameters(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    # default/linear are metadata keys; llama3 becomes a rope_freqs tensor (see _rope_freqs_tensor).
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"config.json: rope type '{rope_type}' is not written by this exporter (default, linear and "
                        "llama3 are); use llama.cpp's convert_hf_to_gguf.py")
    return rope


def _add_tokenizer(writer, model_dir: Path, config) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template, as llama.cpp's converter writes them for GPT-2 style BPE."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{model_dir}: no tokenizer.json (fast tokenizer); save the tokenizer with transformers >= 4.40")
    spec = json.loads(tok.backend_tokenizer.to_str())
    pre = _pre_tokenizer_name(spec, model_dir)  # first: it is the check that refuses tokenizers
    tokens, types = _vocab(tok, config.vocab_size, model_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(spec))
    for kind, token_id in _special_token_ids(tok, model_dir, config).items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = _adds_bos_eos(tok)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = tok.chat_template
    if isinstance(template, dict):  # several named templates: GGUF keeps the default plus named extras
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


def _vocab(tok, vocab_size: int, model_dir: Path) -> tuple[list[str], list[int]]:
    """One token string and type per embedding row; rows with no token get llama.cpp's `[PADn]` filler."""
    import gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has id {max(by_id)} but the embedding only {vocab_size} rows; "
                        "resize the embeddings before merging")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            # llama.cpp matches CONTROL tokens whole and never emits them as text; `<|...|>` tokens some
            # tokenizers forget to flag special are control tokens all the same (as in its converter).
            control = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_name(spec: dict, model_dir: Path) -> str:
    """The llama.cpp `tokenizer.ggml.pre` whose split regex is the one this tokenizer.json uses.

    llama.cpp's converter hashes a probe text's token ids and looks the hash up in its own table; that
    table is its to maintain, so we read the pre-tokenizer's structure instead. Each name below maps in
    llama.cpp (llama-vocab.cpp) and in transformers' GGUF reader to the same split as the JSON.
    """
    model = spec.get("model", {})
    where, elsewhere = model_dir / "tokenizer.json", "use llama.cpp's convert_hf_to_gguf.py"
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        kind = f"{model.get('type')}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
        raise UserError(f"{where}: only byte-level BPE tokenizers (GPT-2 style) are written here, this one is {kind}; {elsewhere}")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # NFC (Qwen2) is skipped by llama.cpp's converter as well
        raise UserError(f"{where}: normalizer '{normalizer}' has no llama.cpp equivalent; {elsewhere}")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
            return "starcoder"  # digits one by one, then GPT-2's regex: llama.cpp's starcoder/smollm
        if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
            name = _known_split_regexes().get(steps[0].get("pattern", {}).get("Regex"))
            if name:
                return name
    raise UserError(f"{where}: pre-tokenizer {kinds or 'none'} has no llama.cpp name known to this exporter "
                    f"(known: GPT-2, StarCoder/SmolLM, Llama 3, Qwen2, Tekken, GPT-4o); {elsewhere}")


def _known_split_regexes() -> dict[str, str]:
    """Split regex -> llama.cpp pre name, from the table transformers' GGUF reader splits with.

    Taking the strings from the reader means a file we label reads back with exactly this regex.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
    except ImportError:  # an older transformers: no Split-style tokenizer is recognised, a UserError says so
        return {}
    names = ("llama-bpe", "qwen2", "tekken", "gpt-4o")  # llama.cpp's own names for these splits
    return {splits[n]: n for n in names if n in splits}


def _merges(spec: dict) -> list[str]:
    """BPE merges as llama.cpp stores them: "left right", one string per merge, in rank order."""
    merges = spec.get("model", {}).get("merges") or []
    # tokenizers >= 0.20 writes pairs; a space inside a part is spelled U+0120 in the string form.
    return [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in merges]


def _special_token_ids(tok, model_dir: Path, config) -> dict[str, int]:
    """bos/eos/unk/pad ids. EOS is the token generation stops on: generation_config.json's, when it
    lists one, preferring the tokenizer's eos when that is among several (an instruct model's end of turn)."""
    ids = {"bos": tok.bos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    stop = []
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        stop = json.loads(gen_file.read_text()).get("eos_token_id") or []
        stop = [stop] if isinstance(stop, int) else list(stop)
    fallback = tok.eos_token_id if tok.eos_token_id is not None else getattr(config, "eos_token_id", None)
    ids["eos"] = fallback if (not stop or fallback in stop) else stop[0]
    return {k: int(v) for k, v in ids.items() if isinstance(v, int)}


def _adds_bos_eos(tok) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, read off the tokenizer's behaviour rather than its config keys."""
    with_special = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(plain)
    add_bos = extra and tok.bos_token_id is not None and with_special[0] == tok.bos_token_id
    add_eos = extra and tok.eos_token_id is not None and with_special[-1] == tok.eos_token_id
    return add_bos, add_eos


# ---------------------------------------------------------------------------------------------------
# Tensors


@dataclass
class _Tensor:
    name: str  # llama.cpp's name, e.g. blk.3.attn_q.weight
    shape: tuple[int, ...]  # torch order (rows, cols); GGUFWriter reverses it into ggml order
    qtype: object  # gguf.GGMLQuantizationType it is stored as
    load: Callable  # -> float32 numpy array in llama.cpp's layout

    @property
    def nbytes(self) -> int:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]  # (values per block, bytes per block)
        return math.prod(self.shape) // block * type_size


class _SafetensorsSource:
    """The model's safetensors files (one or sharded), opened lazily: a tensor is read when loaded."""

    def __init__(self, model_dir: Path):
        self.files = sorted(Path(model_dir).glob("*.safetensors"))
        if not self.files:
            raise UserError(f"{model_dir}: no *.safetensors files; export reads safetensors only (what save_pretrained writes)")
        self._stack = contextlib.ExitStack()
        self.handles: dict[str, object] = {}

    def __enter__(self):
        from safetensors import safe_open

        for f in self.files:
            handle = self._stack.enter_context(safe_open(f, framework="pt", device="cpu"))
            for key in handle.keys():
                self.handles[key] = handle
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[key].get_slice(key).get_shape())

    def loader(self, key: str, transform: Callable | None = None) -> Callable:
        def load():
            import torch

            w = self.handles[key].get_tensor(key).to(torch.float32)  # bf16 has no numpy dtype
            return (transform(w) if transform else w).numpy()

        return load


def _plan_tensors(source: _SafetensorsSource, config, arch: str, qtype) -> list[_Tensor]:
    """Every tensor to write: llama.cpp name, stored type and a loader, in llama.cpp's order."""
    import gguf

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    tensors, unmapped, where = [], [], source.files[0].parent
    for key in source.handles:
        if key.endswith("rotary_emb.inv_freq"):  # recomputed from rope.freq_base by every runtime
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:  # absent output = reuse token_embd
            continue
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(key)
            continue
        shape = source.shape(key)
        load = source.loader(key, _qk_transform(name, config, arch))
        tensors.append(_Tensor(name, shape, _stored_type(shape, qtype), load))
    if unmapped:
        raise UserError(f"{where}: {len(unmapped)} tensors have no llama.cpp name (first: {unmapped[0]}); "
                        "export needs a merged model, not an adapter or a PEFT-wrapped checkpoint")
    if not config.tie_word_embeddings and not any(t.name == "output.weight" for t in tensors):
        raise UserError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight; the checkpoint is incomplete")
    if (freqs := _rope_freqs_tensor(config)) is not None:
        tensors.append(freqs)
    return sorted(tensors, key=_write_order)


def _stored_type(shape: tuple[int, ...], qtype):
    import gguf

    # llama.cpp keeps 1-D tensors (norms, biases) in f32: its kernels take them only so, and they are tiny.
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    # Q8_0 packs each row in blocks of 32 values; a row that does not divide stays f16 (as llama.cpp does).
    if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _qk_transform(name: str, config, arch: str) -> Callable | None:
    """llama.cpp's q/k row permutation (see _PERMUTE_QK), for weights and biases alike."""
    if arch not in _PERMUTE_QK or not re.search(r"\.attn_[qk]\.", name):
        return None
    heads = config.num_attention_heads
    if ".attn_k." in name:
        heads = getattr(config, "num_key_value_heads", None) or heads

    def permute(w):
        # Per head: rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] -> [x_0, y_0, x_1, y_1, ...].
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return permute


def _rope_freqs_tensor(config) -> _Tensor | None:
    """Llama 3.1+'s frequency-dependent rope scaling, as llama.cpp takes it: a `rope_freqs` tensor of
    per-dimension divisors, computed here from transformers' own llama3 rope so the two agree."""
    rope = _rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    import gguf
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    factors = (plain / scaled).to(torch.float32).numpy()
    return _Tensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors)


def _write_order(t: _Tensor) -> tuple:
    """token_embd and rope_freqs, then blocks in numeric order (safetensors sorts blk.10 before blk.2), then output."""
    m = re.match(r"blk\.(\d+)\.", t.name)
    if m:
        return (1, int(m.group(1)), t.name)
    return (0 if t.name.startswith(("token_embd", "rope_freqs")) else 2, 0, t.name)




# ---------------------------------------------------------------------------------------------------
# Verification


def verify_gguf(
    model_dir: Path,
    gguf_file: Path,
    prompts: list[str] | list[list[int]] | None = None,
    max_new_tokens: int = 16,
) -> dict:
    """Load `gguf_file` back with transformers and compare it with the HF model in `model_dir`.

    Returns max_abs_logit_diff (over every prompt position), top1_agreement (fraction of positions
    whose argmax agrees), greedy_identical (all `max_new_tokens` greedy tokens equal, no early stop),
    tokenizer_identical (same ids for the prompts and probe texts, special tokens included) and
    chat_template_identical.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_file = Path(model_dir), Path(gguf_file).resolve()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    with alone(gguf_file) as (gg_dir, gg_name):
        gg_tok = AutoTokenizer.from_pretrained(gg_dir, gguf_file=gg_name)
        gg = AutoModelForCausalLM.from_pretrained(gg_dir, gguf_file=gg_name, dtype=torch.float32).eval()
    prompts = list(prompts) if prompts is not None else default_prompts(hf_tok)
    texts = [p for p in prompts if isinstance(p, str)]
    batches = [hf_tok(p)["input_ids"] if isinstance(p, str) else [int(i) for i in p] for p in prompts]

    probes = list(texts) + list(_PROBE_TEXTS) + chat_probe(hf_tok)
    tokenizer_identical = all(hf_tok(t)["input_ids"] == gg_tok(t)["input_ids"] for t in probes)

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    max_diff, agree, positions, greedy_identical = 0.0, 0, 0, True
    with torch.no_grad():
        for ids in batches:
            x = torch.tensor([ids])
            a, b = hf(x).logits[0], gg(x).logits[0]
            max_diff = max(max_diff, (a - b).abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += a.shape[0]
            greedy_identical &= greedy(hf, x, max_new_tokens) == greedy(gg, x, max_new_tokens)
    return {
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / max(positions, 1),
        "greedy_identical": bool(greedy_identical),
        "tokenizer_identical": bool(tokenizer_identical),
        "chat_template_identical": hf_tok.chat_template == gg_tok.chat_template,
        "prompts": len(batches),
        "max_new_tokens": max_new_tokens,
    }


@contextlib.contextmanager
def alone(gguf_file: Path):
    """(directory, name) holding only a link to `gguf_file`.

    Loading a GGUF from a directory that also holds tokenizer_config.json or chat_template.jinja
    mixes those files into the result (transformers reads them too), so a check run beside the HF
    files would test them rather than the GGUF.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gguf-verify-") as tmp:
        (Path(tmp) / gguf_file.name).symlink_to(gguf_file)
        yield tmp, gguf_file.name
