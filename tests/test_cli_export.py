"""`cola export SRC DST` never deletes what is not a Cola model folder, replaces one only with
--force, and never creates missing parent folders; refusals are one line, exit code 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from unified.apps.cli import main


def export(capsys, src, dst, *flags) -> tuple[int, str, str]:
    code = main(["export", str(src), str(dst), *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, src, dst, *flags) -> str:
    code, _, err = export(capsys, src, dst, *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cola export: error: "), err
    return lines[0]


def weights_dtype(folder: Path) -> str:
    """The dtype of the first tensor of the prior's safetensors (from the header)."""
    raw = (folder / "prior" / "diffusion_pytorch_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return next(v["dtype"] for k, v in header.items() if k != "__metadata__")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], "temporary folders"


def test_export_into_a_new_and_an_empty_folder(capsys, tiny_unified_checkpoint, tmp_path):
    code, out, _ = export(capsys, tiny_unified_checkpoint, tmp_path / "new")
    assert code == 0 and "exported" in out
    assert (tmp_path / "new" / "model_index.json").is_file()
    (tmp_path / "empty").mkdir()
    assert export(capsys, tiny_unified_checkpoint, tmp_path / "empty")[0] == 0
    assert snapshot(tmp_path / "new") == snapshot(tmp_path / "empty")
    no_leftovers(tmp_path)


def test_a_folder_of_other_files_is_never_touched(capsys, tiny_unified_checkpoint, tmp_path):
    dst = tmp_path / "notes"
    (dst / "sub").mkdir(parents=True)
    (dst / "todo.txt").write_text("keep me\n")
    (dst / "sub" / "more.txt").write_text("and me\n")
    before = snapshot(dst)
    for flags in ((), ("--force",)):
        line = refused(capsys, tiny_unified_checkpoint, dst, *flags)
        assert "not a Cola model folder" in line and str(dst) in line
        assert snapshot(dst) == before
    no_leftovers(tmp_path)
    assert export(capsys, tiny_unified_checkpoint, tmp_path / "fresh")[0] == 0


def test_a_model_folder_is_replaced_only_with_force(capsys, tiny_unified_checkpoint, tmp_path):
    dst = tmp_path / "model"
    assert export(capsys, tiny_unified_checkpoint, dst)[0] == 0
    before = snapshot(dst)
    line = refused(capsys, tiny_unified_checkpoint, dst, "--dtype", "bf16")
    assert "already holds a Cola model" in line and "--force" in line
    assert snapshot(dst) == before and weights_dtype(dst) == "F32"
    code, out, _ = export(capsys, tiny_unified_checkpoint, dst, "--dtype", "bf16", "--force")
    assert code == 0 and "replaced" in out and weights_dtype(dst) == "BF16"
    no_leftovers(tmp_path)
    (dst / "notes.md").write_text("mine\n")  # a model folder holding something else: refused
    before = snapshot(dst)
    line = refused(capsys, tiny_unified_checkpoint, dst, "--force")
    assert "other files (notes.md)" in line and snapshot(dst) == before


def test_missing_parents_are_not_created(capsys, tiny_unified_checkpoint, tmp_path):
    dst = tmp_path / "a" / "b" / "model"
    line = refused(capsys, tiny_unified_checkpoint, dst)
    assert f"the folder {tmp_path / 'a' / 'b'} does not exist" in line
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_file_or_an_unwritable_parent_is_refused(capsys, tiny_unified_checkpoint, tmp_path,
                                                   kind):
    if kind == "file":
        dst = tmp_path / "model"
        dst.write_text("a file\n")
        assert "is not a folder" in refused(capsys, tiny_unified_checkpoint, dst)
        assert dst.read_text() == "a file\n"
    else:  # /proc/self: a folder no one (not even root) can create anything in
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc")
        line = refused(capsys, tiny_unified_checkpoint, "/proc/self/model")
        assert "cannot write to the folder /proc/self" in line
