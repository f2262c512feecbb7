"""Tools that drive the stages rather than being one: the benchmark, FLOPs/MFU accounting, sweeps."""
