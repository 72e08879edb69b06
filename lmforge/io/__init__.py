"""Checkpoints in and out: streaming safetensors, Hugging Face names and config.json, GGUF, the public API."""
