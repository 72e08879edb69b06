"""Tasks: what a batch is, how training batches are drawn, and the fixed validation batches.

A task gives the loop global batches as dicts of tensors whose first dimension is the sequence; every rank draws the
same global batch and keeps its rows (rank::world), so N ranks compute what one process computes. Its sampler state
is part of every checkpoint, so a resume continues with the very next batch.

    head                 the model head the task trains ("lm": next-token logits)
    next_batch()         the next global training batch
    val_batches(split)   the fixed validation (or test) batches (the same on every call, rank and run)
    tokens_per_step      tokens in one global batch (what FLOPs are counted on)
    check_model(model)   refuse a model the data does not fit (vocabulary, tokenizer), before anything is written
    state_dict() / load_state_dict()
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lmforge.data.tokens import BatchSampler, TokenDataset, check_tokenizer_matches
from lmforge.train.recipe import TrainConfig


class TokenWindows:
    """Language-model pre-training on a token dataset (`lmforge data`): random windows of train.seq_len tokens
    from the train split, {"input_ids": x, "labels": x shifted by one}, each (B, T)."""

    head = "lm"

    def __init__(self, path: str | Path, tc: TrainConfig):
        self.train = TokenDataset(path, "train")
        self.val = TokenDataset(path, "val")
        self.tc = tc
        self.sampler = BatchSampler(self.train, tc.batch_size, tc.seq_len, tc.seed)
        self.tokens_per_step = tc.batch_size * tc.seq_len

    @property
    def tokenizer_files(self) -> dict[str, bytes]:
        return self.train.tokenizer_files

    def check_model(self, model) -> None:
        check_tokenizer_matches(self.train.manifest, model.config.vocab_size, getattr(model, "tokenizer_files", None))

    def next_batch(self) -> dict[str, Tensor]:
        x, y = self.sampler.next_batch()  # (B, T) each
        return {"input_ids": x, "labels": y}

    def val_batches(self, split: str = "val") -> list[dict[str, Tensor]]:
        """The fixed evaluation batches of the val split, or of the test split (read only when asked for)."""
        data = self.val if split == "val" else TokenDataset(self.train.folder, split)
        batches = data.val_batches(self.tc.eval_batches, self.tc.batch_size, self.tc.seq_len)
        return [{"input_ids": x, "labels": y} for x, y in batches]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
