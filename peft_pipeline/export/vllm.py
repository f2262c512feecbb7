"""Will vLLM serve this adapter? What its LoRA loader refuses or needs a flag for, found before a server tries.

vLLM loads a PEFT adapter directory with `--enable-lora --lora-modules name=DIR`, checks it against its
own LoRA rules when the first request arrives (vllm/lora/peft_helper.py, vllm/config/lora.py), and a
refusal there kills the engine mid-service (vllm #9280). check_adapter reads adapter_config.json and
the weights' names, no model, and lists each finding as one of:
  refused  vLLM will not load it: modules_to_save, DoRA, a bias, a rank above 512, an architecture
           whose vLLM implementation has no LoRA support; the fix is usually to serve the merged model
  flag     it loads with a server flag: a rank above the default --max-lora-rank 16
  warning  it may load, or load differently: LoRA on embeddings or the LM head, on a vision tower
write_vllm_check puts them in vllm_check.json beside adapter_config.json and says them on the console.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft_pipeline.console import say
from peft_pipeline.errors import UserError

DEFAULT_MAX_LORA_RANK = 16  # vllm/config/lora.py LoRAConfig.max_lora_rank
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values --max-lora-rank accepts
# vLLM's own implementations of these architectures do not declare LoRA support (SupportsLoRA).
NO_VLLM_LORA = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings", "embed_in")
TOWER_NAMES = ("vision_tower", "vision_model", "multi_modal_projector", "visual")


def finding(level: str, key: str, message: str) -> dict:
    """One finding: level (refused | flag | warning), the adapter_config key it concerns, what to do."""
    return {"level": level, "key": key, "message": message}


def read_adapter(adapter_dir: Path) -> tuple[dict, list[str]]:
    """adapter_config.json and the names of the tensors in the adapter's weights."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; is this a PEFT adapter directory?")
    config = json.loads(config_file.read_text())
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return config, []
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return config, list(f.keys())


def base_model_type(config: dict) -> str | None:
    """The base's model_type, when adapter_config.json names a local directory holding its config.json."""
    base = config.get("base_model_name_or_path")
    path = Path(base).expanduser() / "config.json" if base else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("model_type")


def check_adapter(adapter_dir: str | Path, model_type: str | None = None) -> list[dict]:
    """Every reason vLLM would refuse, need a flag for, or warn about this adapter (empty: it loads as is)."""
    adapter_dir = Path(adapter_dir)
    config, keys = read_adapter(adapter_dir)
    out: list[dict] = []
    if not keys:
        out.append(finding("refused", "weights", "no adapter_model.safetensors beside adapter_config.json"))
    saved = config.get("modules_to_save")
    if saved:
        out.append(finding("refused", "modules_to_save", f"{saved} trained in full: vLLM only loads adapters with "
                           "modules_to_save None (vllm #9280); serve the merged model (`peft-pipeline merge RUN`) "
                           "or retrain without lora.modules_to_save"))
    if config.get("use_dora"):
        out.append(finding("refused", "use_dora", "vLLM does not support DoRA; serve the merged model or retrain with "
                           "lora.use_dora: false"))
    if config.get("bias", "none") != "none":
        out.append(finding("refused", "bias", f"bias '{config['bias']}': vLLM does not load adapter biases; "
                           "retrain with lora.bias: none or serve the merged model"))
    out += rank_findings(int(config.get("r", 0)), config.get("rank_pattern") or {})
    out += target_findings(config.get("target_modules"), keys)
    model_type = model_type or base_model_type(config)
    if model_type in NO_VLLM_LORA:
        out.append(finding("refused", "base_model", f"vLLM's {NO_VLLM_LORA[model_type]} ({model_type}) has no LoRA "
                           "support; serve the merged model"))
    return out


def rank_findings(r: int, pattern: dict) -> list[dict]:
    """A rank (or a per-module rank) above vLLM's default limit: the --max-lora-rank to pass, or a refusal."""
    top = max([r, *(int(v) for v in pattern.values())])
    if top <= DEFAULT_MAX_LORA_RANK:
        return []
    fits = [v for v in MAX_LORA_RANKS if v >= top]
    if not fits:
        return [finding("refused", "r", f"rank {top} is above the largest --max-lora-rank vLLM accepts "
                        f"({MAX_LORA_RANKS[-1]}); serve the merged model")]
    return [finding("flag", "r", f"rank {top} is above vLLM's default --max-lora-rank {DEFAULT_MAX_LORA_RANK}: "
                    f"start the server with --max-lora-rank {fits[0]}")]


def target_findings(targets, keys: list[str]) -> list[dict]:
    """LoRA on embeddings / the LM head (supported for some architectures only) or on a vision tower."""
    names = set(targets) if isinstance(targets, list) else set()
    lora_modules = {k.split(".lora_")[0] for k in keys if ".lora_" in k}
    leaves = names | {m.rsplit(".", 1)[-1] for m in lora_modules}
    out = []
    embedded = sorted(n for n in leaves if n in EMBEDDING_NAMES)
    if embedded:
        out.append(finding("warning", "target_modules", f"LoRA on {embedded}: vLLM applies LoRA to the decoder's "
                           "linear layers; embedding and LM-head LoRA load for some architectures only"))
    tower = sorted({t for m in lora_modules for t in TOWER_NAMES if f".{t}." in f".{m}."})
    if tower:
        out.append(finding("warning", "target_modules", f"LoRA inside {tower}: vLLM ignores or refuses vision-tower "
                           "LoRA unless started with --enable-tower-connector-lora (some models only)"))
    return out


def write_vllm_check(adapter_dir: str | Path, model_type: str | None = None) -> dict:
    """check_adapter, written to ADAPTER_DIR/vllm_check.json and said on the console; returns the record."""
    from peft_pipeline.paths import write_json_atomic

    adapter_dir = Path(adapter_dir)
    findings = check_adapter(adapter_dir, model_type)
    flags = " ".join(f["message"].rsplit("start the server with ", 1)[-1] for f in findings if f["level"] == "flag")
    servable = not any(f["level"] == "refused" for f in findings)
    record = {"servable": servable, "findings": findings,
              "serve": f"vllm serve BASE --enable-lora --lora-modules adapter={adapter_dir} {flags}".strip()
              if servable else None}
    write_json_atomic(adapter_dir / "vllm_check.json", record)
    for f in findings:
        say(f"vllm: {f['level']}: {f['key']}: {f['message']}")
    say(f"vllm: {'loads with: ' + record['serve'] if servable else 'this adapter will not load in vLLM'} "
        f"(details in {adapter_dir / 'vllm_check.json'})")
    return record
