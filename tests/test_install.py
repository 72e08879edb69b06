"""What a plain `pip install` of lmforge gives: the wheel is built from the source tree (no network, no build
isolation), installed into an empty folder, and run from a folder with no clone in sight: `lmforge --help`, a packaged
recipe by name, and a GGUF convert (gguf is a core dependency: GGUF import works without extras)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_gguf import TINY_GQA, random_model, tiny_bpe, write_gguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """site-packages-like folder holding only the installed lmforge wheel."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(ROOT / "lmforge", src / "lmforge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "wheel", src], check=True)
    (wheel,) = (tmp / "wheel").glob("lmforge-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True)
    return tmp / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    code = "import sys, lmforge, lmforge.cli; print('FROM', lmforge.__file__); sys.exit(lmforge.cli.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_wheel_runs_help_packaged_recipes_and_gguf_convert(installed, tmp_path):
    assert sorted(p.name for p in (installed / "lmforge" / "recipes").glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "lmforge" / "recipes").glob("*.yaml")
    )
    r = run_installed(installed, tmp_path, "--help")
    assert r.returncode == 0 and f"FROM {installed}" in r.stdout and "convert" in r.stdout, r.stderr
    # A recipe by name, from a folder that is no clone: it is found (the error is about the data it names).
    r = run_installed(installed, tmp_path, "train", "tiny-cpu", "--train.steps=1")
    assert r.returncode == 2 and "runs/data/starter4k is not a token dataset" in r.stderr, r.stderr
    write_gguf(tmp_path / "tiny.gguf", TINY_GQA, random_model(TINY_GQA).state_dict(), tok=tiny_bpe())
    r = run_installed(installed, tmp_path, "convert", "tiny.gguf", "hf-out")
    assert r.returncode == 0, r.stderr
    import lmforge

    a = lmforge.load(tmp_path / "hf-out")
    b = lmforge.load(tmp_path / "tiny.gguf")
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(a(x), b(x))
