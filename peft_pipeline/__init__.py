"""peft-pipeline: YAML in, LoRA/QLoRA adapter, verified merge and GGUF out."""

__version__ = "0.1.0"
