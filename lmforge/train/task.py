"""Tasks: what a batch is, how training batches are drawn, and the fixed validation batches.

A task gives the loop global batches as dicts of tensors whose first dimension is the sequence; every rank draws the
same global batch and keeps its rows (rank::world), so N ranks compute what one process computes. Its sampler state
is part of every checkpoint, so a resume continues with the very next batch.

    head                 the model head the task trains ("lm": next-token logits)
    next_batch()         the next global training batch
    val_batches(split)   the fixed validation (or test) batches (the same on every call, rank and run)
    fixed_shape          True when every batch has the same shape: tokens_per_step tokens, FLOPs at seq_len; else
                         batch_tokens(batch) gives each batch's (rows, padded length) and the loop sums them
    check_model(model)   refuse a model the data does not fit (vocabulary, tokenizer), before anything is written
    state_dict() / load_state_dict()
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmforge.data.tokens import BatchSampler, TokenDataset, check_tokenizer_matches
from lmforge.errors import UserError
from lmforge.train.recipe import TrainConfig


class TokenWindows:
    """Language-model pre-training on a token dataset (`lmforge data`): random windows of train.seq_len tokens
    from the train split, {"input_ids": x, "labels": x shifted by one}, each (B, T)."""

    head = "lm"
    fixed_shape = True  # every batch is (batch_size, seq_len): tokens and FLOPs follow from the step count

    def __init__(self, path: str | Path, tc: TrainConfig):
        self.train = TokenDataset(path, "train")
        self.val = TokenDataset(path, "val")
        self.tc = tc
        self.sampler = BatchSampler(self.train, tc.batch_size, tc.seq_len, tc.seed)
        self.tokens_per_step = tc.batch_size * tc.seq_len

    @property
    def tokenizer_files(self) -> dict[str, bytes]:
        return self.train.tokenizer_files

    @property
    def eos_id(self) -> int | None:
        """The end-of-text id the data builder put between documents."""
        return self.train.manifest.get("eos_id")

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


class ExampleBatches:
    """What tasks of encoded examples share: batches of varying shape, and a position that is one integer (batch k
    is a pure function of (train.seed, k)). Subclasses hold tc, encoded["train"] and batches_drawn."""

    fixed_shape = False  # batches differ in length: the loop counts their tokens and FLOPs one by one
    BUCKET_BATCHES = 50

    def _bucketed(self, items: list, length, rng: np.random.Generator) -> list[list]:
        """An epoch's batches of train.batch_size items, little of them padding: the items (in their shuffled order)
        cut into chunks of BUCKET_BATCHES batches, each chunk sorted by length(item) and cut into batches, and the
        batches shuffled with `rng`."""
        size = self.tc.batch_size
        chunk, batches = size * self.BUCKET_BATCHES, []
        for start in range(0, len(items), chunk):
            part = sorted(items[start : start + chunk], key=length)
            batches += [part[i : i + size] for i in range(0, len(part), size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    @staticmethod
    def batch_tokens(batch: dict[str, Tensor]) -> tuple[int, int]:
        """(rows, padded length) of a batch: what its forward and backward cost."""
        return tuple(batch["input_ids"].shape)

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn, "seed": self.tc.seed, "examples": len(self.encoded["train"])}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.tc.seed or state.get("examples") != len(self.encoded["train"]):
            raise UserError("cannot resume the data position: the task's seed or training examples differ")
        self.batches_drawn = int(state["batches_drawn"])


class LabelledText(ExampleBatches):
    """Fine-tuning a classifier (or regressor) on labelled text (lmforge.tasks.TaskData), encoded with the model's
    own tokenizer: single sentences or pairs (the tokenizer's pair template: [CLS] a [SEP] b [SEP] with token types
    for BERT), cut to at most train.seq_len tokens. Batches {"input_ids", "attention_mask", "token_type_ids"} (B, T)
    padded to their longest row, "labels" (B,).

    Training batches are bucketed by length, so little is padding: each epoch (a seeded shuffle) is cut into
    chunks of 50 batches, each chunk sorted by length and cut into batches, and the batches shuffled; batch k is a
    pure function of (seed, k), so a resume restores one integer. Validation and test are every example of their
    split, sorted by length, in batches of train.batch_size (the last one shorter)."""

    head = "classifier"

    def __init__(self, data, tokenizer_files: dict[str, bytes], tc: TrainConfig, pad_id: int | None):
        from lmforge.data.tokenizer import Tokenizer

        # The model's pad id (a decoder classifier finds each row's last token by it); an encoder may have none, and
        # its padding is masked anyway, so 0 fills it.
        self.data, self.tc, self.pad_id = data, tc, pad_id if pad_id is not None else 0
        tok = Tokenizer.from_files(tokenizer_files).backend
        tok.no_padding()
        tok.enable_truncation(tc.seq_len, strategy="longest_first")
        self.encoded = {name: self._encode(tok, data.split(name)) for name in ("train", "validation", "test")}
        if not self.encoded["train"]:
            raise UserError(f"task {data.name} has no training examples")
        self.batches_drawn = 0
        self._epoch: tuple[int, list[list[int]]] | None = None  # (epoch, its batches) last computed
        n = len(self.encoded["train"])
        self.batches_per_epoch = max(1, n // tc.batch_size)  # full batches only: every step sees batch_size rows
        self.tokenizer_files = tokenizer_files

    def _encode(self, tok, examples) -> list[tuple[list[int], list[int], float]]:
        pairs = [(e.text, e.text_pair) if e.text_pair is not None else e.text for e in examples]
        out = []
        for e, enc in zip(examples, tok.encode_batch(pairs)):
            out.append((enc.ids, enc.type_ids, e.label))
        return out

    def check_model(self, model) -> None:
        cfg, data = model.config, self.data
        want = len(data.labels) if data.kind == "classification" else 1
        if cfg.num_labels != want:
            raise UserError(f"the model has {cfg.num_labels} labels, task {data.name} needs {want}")

    def _collate(self, rows: list[tuple[list[int], list[int], float]]) -> dict[str, Tensor]:
        T = max(len(ids) for ids, _, _ in rows)
        B = len(rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        types = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, (row_ids, row_types, _) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            types[i, : len(row_types)] = torch.tensor(row_types)
            mask[i, : len(row_ids)] = 1
        dtype = torch.long if self.data.kind == "classification" else torch.float32
        labels = torch.tensor([label for _, _, label in rows], dtype=dtype)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.tc.seed % (1 << 64), epoch])
            order = rng.permutation(len(self.encoded["train"]))[: self.batches_per_epoch * self.tc.batch_size]
            batches = self._bucketed(order.tolist(), lambda i: len(self.encoded["train"][i][0]), rng)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def next_batch(self) -> dict[str, Tensor]:
        epoch, k = divmod(self.batches_drawn, self.batches_per_epoch)
        rows = [self.encoded["train"][i] for i in self._epoch_batches(epoch)[k]]
        self.batches_drawn += 1
        return self._collate(rows)

    def val_batches(self, split: str = "val") -> list[dict[str, Tensor]]:
        rows = sorted(self.encoded["validation" if split == "val" else split], key=lambda r: len(r[0]))
        size = self.tc.batch_size
        if not rows:
            raise UserError(f"task {self.data.name} has no {split} examples")
        return [self._collate(rows[i : i + size]) for i in range(0, len(rows), size)]
