"""`lmforge convert` on bad input: exit 2, one line on stderr starting with "lmforge: error:", no traceback,
and no output folder left behind. Plus the happy path, so these tests also prove convert works at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import cli
from lmforge.io.checkpoints import load


def _convert(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_user_error(capsys, src, dst, *words, extra=()):
    rc, _, err = _convert(capsys, src, dst, *extra)
    assert rc == 2
    assert err.startswith("lmforge: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_missing_source_dir(capsys, tmp_path):
    _assert_user_error(capsys, tmp_path / "nope", tmp_path / "dst", "does not exist")
    assert not (tmp_path / "dst").exists()


def test_config_json_missing(capsys, tiny_hf_dir, tmp_path):
    (tiny_hf_dir / "config.json").unlink()
    _assert_user_error(capsys, tiny_hf_dir, tmp_path / "dst", "config.json")
    assert not (tmp_path / "dst").exists()


def test_config_json_malformed(capsys, tiny_hf_dir, tmp_path):
    (tiny_hf_dir / "config.json").write_text('{"model_type": "llama",')
    _assert_user_error(capsys, tiny_hf_dir, tmp_path / "dst", "config.json", "not valid JSON")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, ("T5ForConditionalGeneration",)),
        ({"model_type": "t5", "architectures": None}, ("model_type", "'t5'")),
        ({"hidden_size": "wide"}, ("hidden_size", "'wide'")),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, ("rope type", "'yarn'")),
    ],
)
def test_unsupported_or_bad_config(capsys, tiny_hf_dir, tmp_path, changes, words):
    _edit_config(tiny_hf_dir, **changes)
    _assert_user_error(capsys, tiny_hf_dir, tmp_path / "dst", *words)
    assert not (tmp_path / "dst").exists()


def test_missing_tensor(capsys, tiny_hf_dir, tmp_path):
    _edit_weights(tiny_hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _assert_user_error(capsys, tiny_hf_dir, tmp_path / "dst", "missing tensor model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "dst").exists()


def test_extra_tensor(capsys, tiny_hf_dir, tmp_path):
    _edit_weights(tiny_hf_dir, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    _assert_user_error(capsys, tiny_hf_dir, tmp_path / "dst", "unexpected tensor model.layers.0.mystery.weight")
    assert not (tmp_path / "dst").exists()


def test_mis_shaped_tensor(capsys, tiny_hf_dir, tmp_path):
    _edit_weights(tiny_hf_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    _assert_user_error(
        capsys, tiny_hf_dir, tmp_path / "dst", "model.layers.0.self_attn.k_proj.weight", "[32, 32]", "[16, 32]"
    )
    assert not (tmp_path / "dst").exists()


def test_truncated_safetensors(capsys, tiny_hf_dir, tmp_path):
    path = tiny_hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _assert_user_error(capsys, tiny_hf_dir, tmp_path / "dst", "model.safetensors", "truncated")
    assert not (tmp_path / "dst").exists()


def test_pickled_weights_are_refused(capsys, tiny_hf_dir, tmp_path):
    (tiny_hf_dir / "model.safetensors").unlink()
    (tiny_hf_dir / "pytorch_model.bin").write_bytes(b"not unpickled")
    _assert_user_error(capsys, tiny_hf_dir, tmp_path / "dst", "pytorch_model.bin", "safetensors")
    assert not (tmp_path / "dst").exists()


def test_existing_non_empty_dst_is_left_alone(capsys, tiny_hf_dir, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _assert_user_error(capsys, tiny_hf_dir, dst, "not empty")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]  # no temporary folder left either


def test_convert_round_trip_with_dtype_and_overwrite(capsys, tiny_hf_dir, tmp_path):
    rc, out, _ = _convert(capsys, tiny_hf_dir, tmp_path / "lmf", "--to", "lmforge")
    assert rc == 0 and "llama" in out and "parameters" in out
    rc, out, _ = _convert(capsys, tmp_path / "lmf", tmp_path / "hf16", "--dtype", "bfloat16")
    assert rc == 0 and "bfloat16" in out
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.randint(0, 128, (2, 7))
    ref, half = load(tiny_hf_dir), load(tmp_path / "hf16")
    assert (ref(ids) - half(ids)).abs().max() < 0.05  # bfloat16 rounding only
    rc, _, _ = _convert(capsys, tmp_path / "lmf", tmp_path / "hf16", "--overwrite")
    assert rc == 0 and torch.equal(load(tmp_path / "hf16")(ids), ref(ids))


def test_installed_command_reports_one_line(tmp_path):
    exe = Path(sys.executable).parent / "lmforge"
    if not exe.exists():
        pytest.skip("lmforge is not installed in this environment")
    res = subprocess.run(
        [str(exe), "convert", str(tmp_path / "nope"), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("lmforge: error:") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("command", ["convert", "grow", "tie"])
def test_an_output_over_its_own_input_is_refused_even_with_overwrite(capsys, tiny_hf_dir, tmp_path, command):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for dst in (src, tmp_path):  # the input itself, or a folder holding it
        out = [str(dst)] if command == "convert" else ["--out", str(dst)]
        more = {"grow": ["--layers", "4"], "tie": ["--groups", "all"]}.get(command, [])
        capsys.readouterr()
        assert cli.main([command, str(src), *out, *more, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "would replace the input" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
