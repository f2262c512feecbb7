"""peft-pipeline: YAML in, LoRA/QLoRA adapter, verified merge and GGUF out."""

from peft_pipeline.console import quiet_bitsandbytes

__version__ = "0.1.0"

# Before anything imports bitsandbytes (peft imports it whenever it is installed, quantized or not):
# its CPU backend's install hint is replaced by one line of ours where 4-bit is actually used.
quiet_bitsandbytes()
