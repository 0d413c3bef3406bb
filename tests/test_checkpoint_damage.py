"""Checkpoints record the size and sha256 of every file when written; `--resume auto` skips a
damaged newest checkpoint (a truncated model, optimizer, trainer state, EMA or trainer.json)
with a log line naming the file, resumes from the newest whole one, and training continues
exactly as it would have."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from conftest import stdlib_shards

from unified.config import load_preset
from unified.training.checkpoint import MANIFEST, damage, list_checkpoints
from unified.training.trainer import Trainer

STEPS = 4  # checkpoints at steps 2 and 4


def preset(shards, stage: int):
    s = f"stage{stage}"
    return load_preset("text-tiny", [f'data.train="{shards}"', f"{s}.steps={STEPS}",
                                     f"{s}.ckpt_every=2", f"{s}.keep=5", f"{s}.log_every=1",
                                     "stage2.ema_decay=0.9"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A stage-2 run (with EMA) to step 4, and its losses."""
    root = tmp_path_factory.mktemp("ckpt-damage")
    shards = stdlib_shards(root / "shards", 200)
    Trainer(preset(shards, 1), 1, root / "s1").train()
    init = root / "s1" / "final"
    hist = Trainer(preset(shards, 2), 2, root / "s2", init=init).train()
    return shards, init, root / "s2", [h["loss"] for h in hist]


def copy_run(run, tmp_path):
    shards, init, src, losses = run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    return shards, init, dst, losses


def test_every_checkpoint_has_a_manifest_of_its_files(run):
    ckpts = list_checkpoints(run[2])
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    for ckpt in ckpts:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                   if p.is_file() and p.name != MANIFEST}
        assert set(files) == on_disk
        assert {"trainer.json", "optimizer.safetensors", "trainer.safetensors"} <= on_disk
        assert any(f.startswith("ema_prior/") for f in on_disk)
        assert damage(ckpt) is None


DAMAGED = ["model/prior/diffusion_pytorch_model.safetensors",
           "model/text_vae/diffusion_pytorch_model.safetensors", "optimizer.safetensors",
           "trainer.safetensors", "ema_prior/diffusion_pytorch_model.safetensors",
           "trainer.json"]


@pytest.mark.parametrize("name", DAMAGED)
def test_resume_skips_a_truncated_file_and_training_continues(run, tmp_path, caplog, name):
    shards, init, out, losses = copy_run(run, tmp_path)
    bad = out / "checkpoints" / "step-00000004" / name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="cola.checkpoint"):
        trainer = Trainer(preset(shards, 2), 2, out, init=init)
    assert trainer.step == 2
    assert any(str(bad) in r.getMessage() and "damaged" in r.getMessage()
               for r in caplog.records), caplog.text
    rest = [h["loss"] for h in trainer.train()]
    assert rest == pytest.approx(losses[2:], rel=1e-5), "the same losses as without the damage"
    assert damage(out / "checkpoints" / "step-00000004") is None  # written again, whole


def test_changed_bytes_of_the_same_size_are_found(run, tmp_path):
    _, _, out, _ = copy_run(run, tmp_path)
    ckpt = out / "checkpoints" / "step-00000004"
    raw = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (ckpt / "optimizer.safetensors").write_bytes(bytes(raw))
    assert "optimizer.safetensors: content differs" in damage(ckpt)


def test_a_checkpoint_without_manifest_is_checked_by_parsing(run, tmp_path, caplog):
    """Checkpoints written before manifests: whole if every file parses."""
    shards, init, out, _ = copy_run(run, tmp_path)
    for ckpt in list_checkpoints(out):
        (ckpt / MANIFEST).unlink()
    assert Trainer(preset(shards, 2), 2, out, init=init).step == 4
    state = out / "checkpoints" / "step-00000004" / "trainer.json"
    state.write_text(state.read_text()[:20])
    with caplog.at_level(logging.WARNING, logger="cola.checkpoint"):
        assert Trainer(preset(shards, 2), 2, out, init=init).step == 2
    assert str(state) in caplog.text


def test_an_explicit_damaged_checkpoint_and_all_damaged_are_errors(run, tmp_path):
    shards, init, out, _ = copy_run(run, tmp_path)
    for ckpt in list_checkpoints(out):
        (ckpt / "trainer.safetensors").write_bytes(b"")
    newest = out / "checkpoints" / "step-00000004"
    with pytest.raises(ValueError, match=f"checkpoint {newest} is damaged: .*trainer.safetensors"):
        Trainer(preset(shards, 2), 2, out, init=init, resume=str(newest))
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged.*--resume none"):
        Trainer(preset(shards, 2), 2, out, init=init)
    assert Trainer(preset(shards, 2), 2, out, init=init, resume="none").step == 0
