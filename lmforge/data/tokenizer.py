"""A small wrapper over HF `tokenizers`: one object for encode/decode and the special ids, built from
the files a checkpoint carries (`tokenizer.json`, plus `tokenizer_config.json` /
`special_tokens_map.json` for which tokens are bos/eos/pad)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    def __init__(self, backend, special_tokens: dict[str, str] | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.special_tokens = dict(special_tokens or {})  # e.g. {"eos_token": "<|im_end|>"}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        if "tokenizer.json" not in files:
            raise UserError("no tokenizer.json among the tokenizer files")
        try:
            backend = Backend.from_str(files["tokenizer.json"].decode())
        except Exception as e:  # tokenizers raises plain Exception on malformed JSON
            raise UserError(f"tokenizer.json cannot be read: {str(e).splitlines()[0]}") from None
        special: dict[str, str] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins where both say
            if name not in files:
                continue
            try:
                d = json.loads(files[name])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{name} is not valid JSON: {e}") from None
            for key, value in d.items() if isinstance(d, dict) else ():
                if isinstance(value, dict):  # AddedToken written out: {"content": ..., ...}
                    value = value.get("content")
                if key.endswith("_token") and isinstance(value, str):
                    special[key] = value
        return cls(backend, special)

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> Tokenizer:
        """A tokenizer.json file, or a folder holding one (and optionally its config files)."""
        path = Path(path)
        if path.is_dir():
            folder, names = path, TOKENIZER_FILES
        elif path.is_file():  # its config files count only beside a file with the standard name
            folder, names = path.parent, TOKENIZER_FILES[1:] if path.name == "tokenizer.json" else ()
        else:
            raise UserError(f"tokenizer path {path} does not exist")
        files = {"tokenizer.json": path.read_bytes()} if path.is_file() else {}
        files |= {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
        if "tokenizer.json" not in files:
            raise UserError(f"no tokenizer.json in {path}")
        return cls.from_files(files)

    # ---- ids -------------------------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("bos_token"))

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("pad_token"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's template (e.g. a leading bos)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
