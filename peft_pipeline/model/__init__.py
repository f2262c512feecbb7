"""Model stage: the base's weights (quantized or not), adapters on it, attention kernels.

load.py loads a base for training or a run's model for inference; adapter.py checks and attaches
LoRA; attention.py registers `sdpa_varlen` for padding-free rows.
"""
