"""Losses the loop trains: each an nn.Module whose forward(model, batch) returns (loss, metrics)."""
