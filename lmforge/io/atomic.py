"""Write outputs so that a failure never leaves a half-written or overwritten result behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import UserError


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dst`; on success it is renamed to `dst`, on error removed.

    An existing non-empty `dst` is a user error unless `overwrite` (then it is replaced only once
    the new one is complete)."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"output {dst} exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"output {dst} already exists and is not empty (choose another path)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should be an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file under a temporary name, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def refuse_output_over_input(src: str, dst: str | os.PathLike) -> None:
    """A command's output may not be, or hold, the checkpoint it reads: with --overwrite the input would be replaced
    by what was made from it."""
    if str(src).startswith("pkg:"):
        return
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s or d in s.parents:
        raise UserError(f"output {dst} would replace the input {src}: write the result elsewhere")
