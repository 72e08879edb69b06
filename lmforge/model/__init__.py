"""The model: its config, the one Transformer, the tensors a config implies, and decoding."""
