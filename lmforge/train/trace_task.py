"""Trace-supervised fine-tuning data: (query, trace, response) examples templated, tokenized, masked and packed.

Each example becomes tokens in three spans, 0 = query (with the template's framing), 1 = trace, 2 = response (its end
marker included, so the model learns to stop); the loss weighs each span by its own weight (objectives/trace_sft.py).
Templates:
    plain   query "\\n", then the trace steps a line each, then "#### response" and the end-of-text token
    chat    the tokenizer's chat template (tokenizer_config.json's chat_template, e.g. SmolLM2-Instruct's): the query
            as the user's message, the trace and answer lines above as the assistant's
    auto    chat when the tokenizer has a template, else plain
The pieces are tokenized separately and concatenated, so span boundaries are exact. An example longer than
train.seq_len (its response, last, would be cut) is an error naming it, found when the data is built: no run trains on
a cut answer or an all-zero mask.

Training batches: each epoch (a seeded shuffle) packs examples one after another into rows of at most seq_len tokens
(`pack`), with segment ids so attention stays inside each example; without packing a row holds one example. Rows are
bucketed by length into batches of train.batch_size, padded to their longest. Batch k is a pure function of (seed,
k), so a resume restores one integer. Validation and test batches hold one example a row (up to eval_batch_size
rows, generated at once), the rows of a batch sharing the prompt's length, with "prompt_ids" (B, Tq), "index" (B,)
and "split" (B,: 0 validation, 1 test) for scoring by generation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.tasks.traces import TraceExample, completion_text
from lmforge.train.task import ExampleBatches

QUERY, TRACE, RESPONSE = 0, 1, 2
SPAN_NAMES = ("query", "trace", "response")


def char_tokenizer_files(texts: list[str]) -> dict[str, bytes]:
    """A character-level tokenizer over the characters of `texts` (others map to <unk>), with <|endoftext|> as
    id 0: what small arithmetic models train with."""
    import json

    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    chars = sorted(set("".join(texts)) | set("0123456789#\n "))
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    config = {"eos_token": "<|endoftext|>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


class TraceTemplate:
    """Turns examples into (ids, spans) and prompts into ids with one tokenizer and template."""

    def __init__(self, tokenizer_files: dict[str, bytes], template: str = "auto"):
        import json

        self.tok = Tokenizer.from_files(tokenizer_files)
        config = json.loads(tokenizer_files.get("tokenizer_config.json", b"{}") or b"{}")
        chat = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(chat, list):  # [{"name": "default", "template": ...}, ...]
            chat = next((t.get("template") for t in chat if t.get("name") == "default"), None)
        if template not in ("auto", "plain", "chat"):
            raise UserError(f"sft.template must be auto, plain or chat, got {template!r}")
        if template == "chat" and not chat:
            raise UserError("sft.template is chat but the tokenizer has no chat_template")
        self.kind = "chat" if template == "chat" or (template == "auto" and chat) else "plain"
        self._chat = None
        if self.kind == "chat":
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._chat = env.from_string(chat)
        self.eos_id = self.tok.eos_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        special = self.tok.special_tokens
        return self._chat.render(
            messages=messages,
            add_generation_prompt=generation_prompt,
            bos_token=special.get("bos_token", ""),
            eos_token=special.get("eos_token", ""),
        )

    def _pieces(self, ex: TraceExample, with_trace: bool) -> tuple[str, str, str]:
        """(prompt text, trace text, response text): the prompt ends where the model starts to write."""
        trace, response = completion_text(ex, with_trace)
        if self.kind == "plain":
            return ex.query + "\n", trace, response
        prompt = self._render([{"role": "user", "content": ex.query}], True)
        user = {"role": "user", "content": ex.query}
        full = self._render([user, {"role": "assistant", "content": trace + response}], False)
        content_at = full.find(trace + response, len(prompt))
        if not full.startswith(prompt) or content_at < 0:
            raise UserError("the chat template does not write the assistant's reply after its generation prompt")
        suffix = full[content_at + len(trace + response) :]  # the end-of-turn marker(s)
        return full[:content_at], trace, response + suffix

    def prompt_ids(self, ex: TraceExample) -> list[int]:
        # the chat template writes its own special tokens (bos); the plain one takes the tokenizer's
        return self.tok.encode(self._pieces(ex, False)[0], add_special_tokens=self.kind == "plain")

    def encode(self, ex: TraceExample, with_trace: bool) -> tuple[list[int], list[int]]:
        """(ids, span of each token) of a whole example."""
        prompt, trace, response = self._pieces(ex, with_trace)
        p = self.tok.encode(prompt, add_special_tokens=self.kind == "plain")
        t = self.tok.encode(trace, add_special_tokens=False) if trace else []
        r = self.tok.encode(response, add_special_tokens=False)
        if self.kind == "plain" and self.eos_id is not None:
            r = r + [self.eos_id]
        return p + t + r, [QUERY] * len(p) + [TRACE] * len(t) + [RESPONSE] * len(r)


def encode_examples(
    template: TraceTemplate, examples: list[TraceExample], with_trace: bool, seq_len: int, split: str
) -> list[tuple[list[int], list[int]]]:
    """Every example as (ids, spans). The response comes last, so an example longer than seq_len would lose (part
    of) its response: that, and an example whose response or trace (when traces are trained) templates to nothing,
    is a UserError naming it, never a silently cut or empty target."""
    out = []
    for i, ex in enumerate(examples):
        ids, spans = template.encode(ex, with_trace)
        if len(ids) > seq_len:
            raise UserError(
                f"{split} example {i} ({ex.query[:40]!r}) is {len(ids)} tokens after templating, more than "
                f"train.seq_len {seq_len}: its response would be cut; raise train.seq_len or drop the example"
            )
        for span in [RESPONSE] + ([TRACE] if with_trace and ex.trace else []):
            if span not in spans:
                what = SPAN_NAMES[span]
                raise UserError(f"{split} example {i} ({ex.query[:40]!r}) has an empty {what} after templating")
        out.append((ids, spans))
    return out


def by_prompt_length(order: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """Example indices (taken in `order`) grouped by prompt length, each group (in the order its first index comes)
    cut into chunks of at most `size`: rows that can be generated from at once, with no padding."""
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(lengths[i], []).append(i)
    return [group[s : s + size] for group in groups.values() for s in range(0, len(group), size)]


def collate(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, Tensor]:
    """Rows, each a list of packed (ids, spans) examples, as {"input_ids", "labels", "spans", "segment_ids"} (B, T):
    labels are the next token inside the same example (-100 across a boundary and on padding), spans the span of
    that next token (-1 where there is none)."""
    T = max(sum(len(ids) for ids, _ in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    spans = torch.full((B, T), -1, dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for s, (ids, sp) in enumerate(row):
            n = len(ids)
            input_ids[b, at : at + n] = torch.tensor(ids)
            labels[b, at : at + n - 1] = torch.tensor(ids[1:])
            spans[b, at : at + n - 1] = torch.tensor(sp[1:])
            segments[b, at : at + n] = s
            at += n
        segments[b, at:] = len(row)  # padding: a segment of its own after the last example
    return {"input_ids": input_ids, "labels": labels, "spans": spans, "segment_ids": segments}


class TraceSequences(ExampleBatches):
    """The task `lmforge sft` trains: see the module doc. `splits` maps train / validation / test to examples."""

    head = "lm"

    def __init__(self, splits: dict[str, list[TraceExample]], template: TraceTemplate, tc, with_trace: bool,
                 pack: bool, tokenizer_files: dict[str, bytes], eval_batch_size: int = 256):  # fmt: skip
        self.splits, self.template, self.tc, self.with_trace, self.pack = splits, template, tc, with_trace, pack
        self.eval_micro = eval_batch_size  # rows generated at once (the loop evaluates in micro-batches of this)
        self.tokenizer_files = tokenizer_files
        self.pad_id = template.eos_id if template.eos_id is not None else 0
        self.encoded = {s: encode_examples(template, ex, with_trace, tc.seq_len, s) for s, ex in splits.items()}
        if not self.encoded["train"]:
            raise UserError("the trace data has no training examples")
        self.batches_drawn = 0
        self._epoch: tuple[int, list[list[list[int]]]] | None = None  # the last epoch's batches
        self._epoch_sizes: list[int] = [len(self._epoch_batches(0))]  # batches in each epoch so far (checks epoch 0)

    @property
    def eos_id(self) -> int | None:
        return self.template.eos_id

    def check_model(self, model) -> None:
        vocab = self.template.tok.vocab_size
        if vocab > model.config.vocab_size:
            raise UserError(f"the tokenizer has {vocab} tokens, the model embeds only {model.config.vocab_size}")

    def _rows(self, order: list[int]) -> list[list[int]]:
        """Examples (by index, in this order) packed into rows of at most seq_len tokens."""
        if not self.pack:
            return [[i] for i in order]
        rows, row, used = [], [], 0
        for i in order:
            n = len(self.encoded["train"][i][0])
            if row and used + n > self.tc.seq_len:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        return rows + ([row] if row else [])

    def _epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        if self._epoch is None or self._epoch[0] != epoch:
            train = self.encoded["train"]
            rng = np.random.default_rng([self.tc.seed % (1 << 64), epoch])
            rows = self._rows(rng.permutation(len(train)).tolist())
            size = self.tc.batch_size
            if len(rows) < size:  # every batch must hold batch_size rows: the loss is averaged as if it did
                raise UserError(
                    f"the {len(train)} training examples fill {len(rows)} rows of train.seq_len {self.tc.seq_len} "
                    f"tokens, fewer than train.batch_size {size}: lower train.batch_size or add examples"
                )
            rows = rows[: len(rows) // size * size]  # full batches only
            self._epoch = (epoch, self._bucketed(rows, lambda row: sum(len(train[i][0]) for i in row), rng))
        return self._epoch[1]

    def next_batch(self) -> dict[str, Tensor]:
        # Packed epochs can differ in their number of batches: find batch k's epoch from the sizes seen so far.
        k, epoch = self.batches_drawn, 0
        while True:
            if epoch == len(self._epoch_sizes):
                self._epoch_sizes.append(len(self._epoch_batches(epoch)))
            if k < self._epoch_sizes[epoch]:
                break
            k -= self._epoch_sizes[epoch]
            epoch += 1
        rows = self._epoch_batches(epoch)[k]
        self.batches_drawn += 1
        return collate([[self.encoded["train"][i] for i in row] for row in rows], self.pad_id)

    def val_batches(self, split: str = "val") -> list[dict[str, Tensor]]:
        """Every example of the split, batched by prompt length (see the module doc)."""
        name = "validation" if split == "val" else split
        examples, encoded = self.splits[name], self.encoded[name]
        if not examples:
            raise UserError(f"the trace data has no {name} examples")
        prompts = [self.template.prompt_ids(ex) for ex in examples]
        order = sorted(range(len(examples)), key=lambda i: (len(prompts[i]), len(encoded[i][0]), i))
        batches = []
        for idx in by_prompt_length(order, [len(p) for p in prompts], self.eval_micro):
            batch = collate([[encoded[i]] for i in idx], self.pad_id)
            del batch["segment_ids"]  # one example a row: the causal mask alone
            batch["prompt_ids"] = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
            batch["index"] = torch.tensor(idx, dtype=torch.long)
            batch["split"] = torch.full((len(idx),), int(name == "test"), dtype=torch.long)
            batches.append(batch)
        return batches
