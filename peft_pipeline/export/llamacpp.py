"""llama.cpp, as installed by `make llama-cpp`: its converter, its quantizer and its runtime, driven from here.

What comes from where (nothing is compiled, nothing of llama.cpp is re-implemented):
  - convert_hf_to_gguf.py + gguf-py (llama.cpp's sources, from the git bundle node-llama-cpp ships):
    HF model dir -> f16/bf16 GGUF, run as a subprocess on this venv's torch/transformers;
  - libllama.so (node-llama-cpp's prebuilt linux-x64 CPU binaries): `llama_model_quantize`, called
    through ctypes with `llama_model_quantize_default_params()`, for q8_0 and the k-quants;
  - node-llama-cpp's runtime: llama_probe.mjs loads each GGUF and answers the probes (verify.py).
This module is the glue: find the install, run the converter, call the quantizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from peft_pipeline.errors import UserError

ENV_VAR = "PEFT_PIPELINE_LLAMA_CPP"  # a directory laid out as `make llama-cpp` lays out .llama/
# --quant name -> llama.cpp's enum llama_ftype (include/llama.h). f16 and bf16 come from the converter.
QUANTS = {"f16": 1, "bf16": 32, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15}
CONVERTER_TYPES = ("f16", "bf16")


def parse_quants(text: str) -> list[str]:
    """--quant f16,q8_0,q4_k_m as a list, in order, without repeats; an unknown name is a usage error."""
    names = [q.strip().lower() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUANTS]
    if unknown or not names:
        raise UserError(f"--quant: {', '.join(repr(q) for q in unknown) or 'nothing given'} is not a GGUF type "
                        f"this exporter writes; use a comma list of {', '.join(QUANTS)}", exit_code=2)
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Install:
    """Paths of one llama.cpp install (see the Makefile's llama-cpp target)."""

    root: Path

    @property
    def converter(self) -> Path:
        return self.root / "llama.cpp" / "convert_hf_to_gguf.py"

    @property
    def python_deps(self) -> Path:
        return self.root / "python"  # sentencepiece + protobuf for the converter (pip --target)

    @property
    def node_package(self) -> Path:
        return self.root / "node_modules" / "node-llama-cpp"

    @property
    def lib_dir(self) -> Path:
        return self.root / "node_modules" / "@node-llama-cpp" / "linux-x64" / "bins" / "linux-x64"

    def libllama(self) -> Path:
        found = sorted(self.lib_dir.glob("libllama*.so"))  # libllama.v0.5.0.so: the name carries the release
        found = [p for p in found if "common" not in p.name]
        if not found:
            raise UserError(f"{self.lib_dir}: no libllama*.so; reinstall with `make llama-cpp`")
        return found[0]

    def missing(self) -> list[str]:
        """What a usable install lacks (empty when complete)."""
        need = [self.converter, self.root / "llama.cpp" / "gguf-py", self.python_deps, self.node_package / "package.json",
                self.lib_dir]
        gone = [str(p) for p in need if not p.exists()]
        if shutil.which("node") is None:
            gone.append("node (Node.js >= 20 on PATH)")
        return gone


def locate() -> Install:
    """The llama.cpp install: $PEFT_PIPELINE_LLAMA_CPP, else .llama/ in this checkout, else in the current dir."""
    env = os.environ.get(ENV_VAR)
    candidates = [Path(env)] if env else [Path(__file__).resolve().parents[2] / ".llama", Path.cwd() / ".llama"]
    for root in candidates:
        inst = Install(root.resolve())
        if not inst.missing():
            return inst
    where = f"{ENV_VAR}={env}" if env else str(candidates[0])
    gone = Install(candidates[0].resolve()).missing()
    raise UserError(f"llama.cpp for GGUF export is not installed at {where} (missing {gone[0]}); "
                    f"run `make llama-cpp` (about 15 s, 92 MB) or set {ENV_VAR} to such a directory")


# config.json keys transformers 5 no longer writes but llama.cpp's converter (written against transformers
# 4.57) reads by name; model_type -> key -> how to get it from the new config. Without it a merged GPT-2
# fails with KeyError 'n_ctx' (measured). GPT-NeoX's 'rotary_pct' cannot be put back this way (the
# converter reads the config through transformers 5's AutoConfig, which moves it into rope_parameters):
# export/llama_convert.py adds it to what the converter reads.
LEGACY_KEYS = {
    "gpt2": {"n_ctx": lambda c: c.get("n_positions")},
}


def convert(inst: Install, model_dir: Path, out_file: Path, outtype: str = "f16", name: str | None = None,
            tokenizer_model: Path | None = None) -> dict:
    """llama.cpp's convert_hf_to_gguf.py: HF model dir -> one f16/bf16 GGUF, written atomically.

    `tokenizer_model`: the base's SentencePiece tokenizer.model, for a merged dir saved without one
    (the converter wants it for gemma, phi3 and other SentencePiece families).
    """
    import tempfile
    import time

    from peft_pipeline.paths import atomic_file

    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"the converter writes {CONVERTER_TYPES}, not {outtype}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(inst.python_deps), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="convert-") as staging, atomic_file(Path(out_file)) as tmp:
        source = _converter_view(Path(model_dir), Path(staging), tokenizer_model)
        # Through llama_convert.py: the converter unchanged, with config keys transformers 5 renamed put back.
        cmd = [sys.executable, str(Path(__file__).with_name("llama_convert.py")), str(inst.converter), str(source),
               "--outtype", outtype, "--outfile", str(tmp)]
        if name:
            cmd += ["--model-name", name]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0 or not tmp.is_file():
            raise UserError(f"{model_dir}: llama.cpp's convert_hf_to_gguf.py failed: {_last_error(r.stderr)}")
    return {"tool": "convert_hf_to_gguf.py", "outtype": outtype, "seconds": round(time.time() - started, 1)}


def _converter_view(model_dir: Path, staging: Path, tokenizer_model: Path | None) -> Path:
    """`model_dir` as the converter expects it: itself, or links to its files plus what it lacks
    (the legacy config keys above, the base's tokenizer.model). The merged dir is never modified."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    legacy = {k: get(config) for k, get in LEGACY_KEYS.get(config.get("model_type"), {}).items() if k not in config}
    legacy = {k: v for k, v in legacy.items() if v is not None}
    add_sp = tokenizer_model is not None and tokenizer_model.is_file() and not (model_dir / "tokenizer.model").exists()
    if not legacy and not add_sp:
        return model_dir
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (staging / f.name).symlink_to(f.resolve())
    (staging / "config.json").write_text(json.dumps({**config, **legacy}, indent=2))
    if add_sp:
        (staging / "tokenizer.model").symlink_to(tokenizer_model.resolve())
    return staging


def _last_error(stderr: str) -> str:
    """The line of a converter traceback that says what went wrong."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln.split(":")[0]]
    return (errors or lines or ["(no output)"])[-1][:400]


def quantize(inst: Install, src: Path, dst: Path, quant: str, threads: int) -> dict:
    """llama.cpp's llama_model_quantize (libllama via ctypes): f16 GGUF -> `quant`, written atomically.

    Tensors whose rows are not a multiple of the type's block (256 for k-quants) get a fallback type
    chosen by llama.cpp, tensor by tensor; their count is returned as `fallback_tensors`.
    """
    import re
    import time

    from peft_pipeline.paths import atomic_file

    lib, logs = _libllama(inst), []
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.nthread = QUANTS[quant], threads
    started = time.time()
    with _captured_logs(lib, logs), atomic_file(Path(dst)) as tmp:
        rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), _byref(params))
        if rc != 0 or not tmp.is_file():
            raise UserError(f"{src}: llama_model_quantize to {quant} failed (code {rc}): {''.join(logs[-3:]).strip()}")
    text = "".join(logs)
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    return {"tool": "llama_model_quantize", "ftype": QUANTS[quant], "seconds": round(time.time() - started, 1),
            "fallback_tensors": int(fallback.group(1)) if fallback else 0,
            "tensors": int(fallback.group(2)) if fallback else None}


# ------------------------------------------------------------------------------------------ ctypes


def _params_struct():
    """struct llama_model_quantize_params, field for field as in the bundled include/llama.h."""
    import ctypes as c

    class QuantizeParams(c.Structure):
        _fields_ = [("nthread", c.c_int32), ("ftype", c.c_int), ("output_tensor_type", c.c_int),
                    ("token_embedding_type", c.c_int), ("allow_requantize", c.c_bool),
                    ("quantize_output_tensor", c.c_bool), ("only_copy", c.c_bool), ("pure", c.c_bool),
                    ("keep_split", c.c_bool), ("dry_run", c.c_bool), ("imatrix", c.c_void_p),
                    ("kv_overrides", c.c_void_p), ("tt_overrides", c.c_void_p), ("prune_layers", c.c_void_p),
                    ("max_buf_size", c.c_size_t)]

    return QuantizeParams


_LIBS: dict = {}


def _libllama(inst: Install):
    """libllama loaded once per process, with the signatures this module calls."""
    import ctypes as c

    path = inst.libllama()
    if path not in _LIBS:
        lib = c.CDLL(str(path))  # its RUNPATH $ORIGIN finds libggml*.so beside it
        lib.llama_model_quantize_default_params.restype = _params_struct()
        lib.llama_model_quantize.argtypes = [c.c_char_p, c.c_char_p, c.c_void_p]
        lib.llama_model_quantize.restype = c.c_uint32
        lib.llama_log_set.argtypes = [c.c_void_p, c.c_void_p]
        lib.llama_backend_init()
        _LIBS[path] = lib
    return _LIBS[path]


def _byref(params):
    import ctypes as c

    return c.cast(c.pointer(params), c.c_void_p)


class _captured_logs:
    """llama.cpp's log lines go to `into` instead of stderr (one line per tensor otherwise)."""

    def __init__(self, lib, into: list[str]):
        import ctypes as c

        self.lib = lib
        self.callback = c.CFUNCTYPE(None, c.c_int, c.c_char_p, c.c_void_p)(
            lambda level, text, _: into.append(text.decode(errors="replace")))

    def __enter__(self):
        import ctypes as c

        self.lib.llama_log_set(c.cast(self.callback, c.c_void_p), None)

    def __exit__(self, *exc):
        self.lib.llama_log_set(None, None)  # back to llama.cpp's default (stderr)
