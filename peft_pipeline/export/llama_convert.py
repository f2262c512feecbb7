"""llama.cpp's convert_hf_to_gguf.py, run unchanged, with the config keys it reads by their old names put back.

The converter (written against transformers 4.57) reads a model's config through AutoConfig, and
transformers 5 renamed some keys: GPT-NeoX's `rotary_pct` became `rope_parameters.partial_rotary_factor`,
so every GPT-NeoX saved or loaded by transformers 5 (real Pythia checkpoints too) failed with
KeyError 'rotary_pct'. Writing the key into config.json does not help (AutoConfig moves it again), so
this wraps the converter's `ModelBase.load_hparams` instead. Usage, in the converter's subprocess:
`python llama_convert.py CONVERTER_PY ARGS...`. It imports nothing from peft_pipeline.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def legacy_keys(hparams: dict) -> dict:
    """Old-name keys the converter reads that a transformers 5 config dict lacks (only those it can derive)."""
    rope = hparams.get("rope_parameters") or {}
    added = {}
    if "rotary_pct" not in hparams and "partial_rotary_factor" in rope:
        added["rotary_pct"] = rope["partial_rotary_factor"]
    return added


def main(argv: list[str]) -> None:
    converter = Path(argv[0]).resolve()
    sys.path.insert(0, str(converter.parent))
    from conversion.base import ModelBase  # llama.cpp's, beside the converter

    load = ModelBase.load_hparams

    def load_hparams(dir_model, is_mistral_format):
        hparams = load(dir_model, is_mistral_format)
        return {**hparams, **legacy_keys(hparams)} if isinstance(hparams, dict) else hparams

    ModelBase.load_hparams = staticmethod(load_hparams)
    sys.argv = [str(converter), *argv[1:]]
    runpy.run_path(str(converter), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
