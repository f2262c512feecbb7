"""Export stage: run.py is the `export` verb; llamacpp.py drives llama.cpp (convert, quantize), verify.py checks
each GGUF in llama.cpp (with llama_probe.mjs), handoff.py writes the Ollama Modelfile and README."""
