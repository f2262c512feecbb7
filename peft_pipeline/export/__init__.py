"""Export stage: run.py is the `export` verb; gguf.py writes and verifies GGUF files."""
