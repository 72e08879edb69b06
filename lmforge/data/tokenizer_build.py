"""Tokenizers for building a token dataset: train a byte-level BPE, reuse a tokenizer.json (alone or
inside a checkpoint or data folder), or GPT-2's BPE through tiktoken.

Whatever the kind, `DataTokenizer` gives the data builder the same four things: a fast parallel
`encode_batch`, the vocabulary size, the end-of-text id put between documents, and the files to
save beside the shards (so the dataset says exactly which tokenizer produced it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import UserError, warn

EOT = "<|endoftext|>"
# Document-end tokens of the common families, in the order we prefer them as a document separator:
# a chat model's configured eos (e.g. <|im_end|>) ends a turn, not a pre-training document.
DOC_END_TOKENS = (EOT, "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eos|>")
# GPT-2's pre-tokenizer regex as tiktoken writes it (same splits as the 2019 release, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # = r50k_base


@dataclass
class DataTokenizer:
    kind: str  # "bpe" (trained here) | "hf" (a given tokenizer.json) | "gpt2" (tiktoken's GPT-2)
    vocab_size: int  # 1 + the largest id it can emit
    eos_id: int
    eos_token: str
    files: dict[str, bytes]  # saved beside the shards; the first one is the tokenizer itself
    encode_batch: Callable[[Sequence[str]], list[list[int]]] = field(repr=False)

    @property
    def main_file(self) -> str:
        return next(iter(self.files))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.files[self.main_file]).hexdigest()


# ---- Hugging Face tokenizers ---------------------------------------------------------------------
def _hf_encoder(tok) -> Callable[[Sequence[str]], list[list[int]]]:
    # Special-token text inside a document ("<|endoftext|>" written in a web page) stays plain text:
    # only the builder inserts real separators.
    tok.encode_special_tokens = True

    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which a data builder never reads.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_batch(texts: Sequence[str]) -> list[list[int]]:
        # add_special_tokens=False: no per-document BOS/CLS from a template; EOS is ours to place.
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    return encode_batch


def _token_content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _find_eos(vocab: dict[str, int], configs: dict[str, dict]) -> tuple[str, int] | None:
    """The document separator: a well-known end-of-text token, else the eos the configs name."""
    for name in DOC_END_TOKENS:
        if name in vocab:
            return name, vocab[name]
    name = _token_content(configs.get("tokenizer_config.json", {}).get("eos_token"))
    if name in vocab:
        return name, vocab[name]
    eos_id = configs.get("config.json", {}).get("eos_token_id")
    if isinstance(eos_id, list) and eos_id:
        eos_id = eos_id[0]
    if isinstance(eos_id, int):
        by_id = {i: t for t, i in vocab.items()}
        if eos_id in by_id:
            return by_id[eos_id], eos_id
    return None


def hf_tokenizer(
    tokenizer_json: bytes, source: str, configs: dict[str, dict] | None = None, kind: str = "hf"
) -> DataTokenizer:
    """A DataTokenizer over a tokenizer.json; `configs` are the checkpoint's parsed JSON files
    (tokenizer_config.json, config.json) that may name its eos."""
    from tokenizers import Tokenizer

    configs = configs or {}
    try:
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON or models
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{source} is not a valid tokenizer.json ({first})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
        raise UserError(f"{source} has an empty vocabulary")
    eos = _find_eos(vocab, configs)
    if eos is None:
        raise UserError(
            f"{source} has no end-of-text token (looked for {', '.join(DOC_END_TOKENS)} and the "
            "eos in tokenizer_config.json / config.json); documents need a separator"
        )
    files = {"tokenizer.json": tokenizer_json}
    # Keep an HF-style tokenizer_config.json naming the separator, so transformers and lmforge agree.
    tok_config = dict(configs.get("tokenizer_config.json", {}))
    tok_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tok_config["eos_token"] = eos[0]
    files["tokenizer_config.json"] = (json.dumps(tok_config, indent=2, sort_keys=True) + "\n").encode()
    return DataTokenizer(kind, max(vocab.values()) + 1, eos[1], eos[0], files, _hf_encoder(tok))


def train_bpe(texts: Sequence[str], vocab_size: int) -> DataTokenizer:
    """A byte-level BPE (GPT-2 style: any UTF-8 text round-trips, no unknown tokens) trained on
    `texts`, with <|endoftext|> as id 0. Deterministic: same texts and size, same tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_special = 1
    if vocab_size < 256 + n_special:
        raise UserError(f"BPE vocabulary size {vocab_size} is too small: byte-level BPE needs at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is noise, not a unit worth a vocabulary slot
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    if tok.get_vocab_size() < vocab_size:  # the corpus ran out of pairs seen at least twice
        warn(
            f"bpe:{vocab_size} learned only {tok.get_vocab_size()} tokens from this corpus: the data's vocabulary is "
            f"{tok.get_vocab_size()} (a model's vocab_size needs no more)"
        )
    return hf_tokenizer(tok.to_str().encode("utf-8"), f"trained bpe:{vocab_size}", kind="bpe")


# ---- GPT-2 via tiktoken --------------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (how byte-level BPE vocabularies spell tokens)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: run BPE on its bytes with only the merges ranked before it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise UserError(f"GPT-2 rank file is inconsistent at rank {limit}")
    return parts[0], parts[1]


def gpt2_tokenizer_json(ranks: dict[bytes, int]) -> bytes:
    """The same BPE as a Hugging Face tokenizer.json (vocab + merges in rank order), so a model trained
    on GPT-2 tokens carries a tokenizer that lmforge and transformers can load."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    spell = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [
        tuple(text(p) for p in _merge_parts(ranks, t))
        for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(t) > 1
    ]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return tok.to_str().encode("utf-8")


def tiktoken_gpt2(ranks_file: bytes) -> DataTokenizer:
    """GPT-2's BPE from its rank file (base64 token, rank per line); <|endoftext|> = 50256. Encoding runs
    in tiktoken; the files saved are the equivalent tokenizer.json (a test checks both agree)."""
    if hashlib.sha256(ranks_file).hexdigest() != GPT2_TIKTOKEN_SHA256:
        raise UserError("gpt2.tiktoken does not match GPT-2's published rank file (sha256 differs)")
    try:
        import tiktoken
    except ImportError:
        raise UserError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from None
    ranks = {}
    for line in ranks_file.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    eos_id = len(ranks)  # 50256
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eos_id})
    hf = hf_tokenizer(gpt2_tokenizer_json(ranks), "GPT-2 tokenizer", kind="gpt2")
    if hf.eos_id != eos_id or hf.vocab_size != eos_id + 1:
        raise UserError("GPT-2 tokenizer.json conversion gave the wrong special ids")

    def encode_batch(texts: Sequence[str]) -> list[list[int]]:
        # encode_ordinary: "<|endoftext|>" inside a document is text, never the separator.
        return enc.encode_ordinary_batch(list(texts))

    return DataTokenizer("gpt2", eos_id + 1, eos_id, EOT, hf.files, encode_batch)


def gpt2_tokenizer() -> DataTokenizer:
    """GPT-2's tokenizer, read from the openai-whisper sdist (fetched once into the package cache)."""
    from lmforge.data.corpus import fetch_package, read_text_member

    return tiktoken_gpt2(read_text_member(fetch_package("openai-whisper"), "whisper/assets/gpt2.tiktoken"))


# ---- loading saved tokenizers --------------------------------------------------------------------
def data_tokenizer_from_files(files: dict[str, bytes], source: str = "tokenizer files") -> DataTokenizer:
    """Rebuild a tokenizer from the files a dataset (or checkpoint) stores: tokenizer.json with the
    tokenizer_config.json / config.json that name its eos."""
    if "tokenizer.json" not in files:
        raise UserError(f"{source} holds no tokenizer.json")
    configs = {}
    for name in ("tokenizer_config.json", "config.json"):
        if name in files:
            try:
                configs[name] = json.loads(files[name])
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{name} in {source} is not valid JSON") from None
    return hf_tokenizer(files["tokenizer.json"], source, configs)


def read_tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The tokenizer files at `path`: a tokenizer.json, or a folder (checkpoint or dataset) holding one;
    with the tokenizer_config.json / config.json beside it, which may name the eos."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer {path} does not exist")
    folder = path.parent if path.is_file() else path
    main = path if path.is_file() else folder / "tokenizer.json"
    if not main.is_file():
        raise UserError(f"tokenizer folder {path} holds no tokenizer.json")
    files = {"tokenizer.json": main.read_bytes()}
    for name in ("tokenizer_config.json", "config.json"):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    return files


def resolve_tokenizer(spec: str, train_texts: Sequence[str]) -> DataTokenizer:
    """`bpe:VOCAB` (train on `train_texts`), `gpt2`, or a path to tokenizer.json / a folder with one."""
    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not size.isdigit():
            raise UserError(f"--tokenizer {spec}: expected bpe:VOCAB_SIZE, e.g. bpe:8192")
        return train_bpe(train_texts, int(size))
    if spec == "gpt2":
        return gpt2_tokenizer()
    # The tokenizer.json bytes are kept exactly, so the dataset's hash matches the checkpoint's.
    return data_tokenizer_from_files(read_tokenizer_files(spec), spec)
