"""Training monitoring: window-averaged logs, no duplicate steps after a resume (metrics file
and TensorBoard), held-out loss every N steps, and `cola export --ema` of a mid-run
checkpoint."""

import json

import pytest
import torch
from conftest import stdlib_shards

from tasks import TaskMixture
from tasks.shapes.world import make_shapes_shards
from unified.apps.cli import main
from unified.config import load_preset
from unified.model import ColaModel
from unified.training.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor-data")
    stdlib_shards(root / "text", 120, max_per_shard=60)
    stdlib_shards(root / "text-heldout", 40, max_per_shard=40)
    make_shapes_shards(root / "shapes", n_train=100, n_heldout=20, difficulty=2,
                       max_per_shard=50)
    return root


def cfg(data, *extra):
    return load_preset("shapes-tiny", [
        f'data.train="{data / "text"}"', f'data.heldout="{data / "text-heldout"}"',
        f'data.pairs="{data / "shapes" / "train"}"',
        f'data.pairs_heldout="{data / "shapes" / "heldout"}"', *extra])


def run(c, stage, out, **kw):
    return Trainer(c, stage, out, tasks=TaskMixture(c), **kw)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_logs_average_the_window_and_a_resume_logs_no_step_twice(data, tmp_path):
    c = cfg(data, "stage1.steps=6", "stage1.log_every=3", "stage1.ckpt_every=2")
    full = run(c, 1, tmp_path / "full").train()
    logged = metrics(tmp_path / "full")
    assert [r["step"] for r in logged] == [3, 6] and [r["window"] for r in logged] == [3, 3]
    for rec, steps in zip(logged, (full[:3], full[3:])):
        for k in ("loss", "recon", "image_l1"):
            assert rec[k] == pytest.approx(sum(h[k] for h in steps) / 3, rel=1e-9)
    assert logged[-1]["grad_norm"] > 0

    out = tmp_path / "resumed"  # dies after step 5 (checkpoint at 4), then resumes
    c1 = cfg(data, "stage1.steps=6", "stage1.log_every=1", "stage1.ckpt_every=2")
    run(c1, 1, out).train(max_steps=5)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    t = run(c1, 1, out)
    assert t.step == 4
    t.train()
    got = metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == pytest.approx([h["loss"] for h in full], rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("stage1/loss")] == [1, 2, 3, 4, 5, 6]


def test_heldout_loss_every_n_steps_on_fixed_data(data, tmp_path):
    c = cfg(data, "stage1.steps=4", "stage1.log_every=2", "stage1.eval_every=2",
            "stage1.eval_batches=2")
    t = run(c, 1, tmp_path)
    hist = t.train()
    assert [("heldout_loss" in h) for h in hist] == [False, True, False, True]
    assert {"heldout_recon", "heldout_image_l1"} <= set(hist[1])
    again = t._evaluate()  # the same held-out batches and noise: the same value
    assert again == t._evaluate() and again["heldout_loss"] == pytest.approx(
        hist[-1]["heldout_loss"], rel=1e-6)
    logged = [r for r in metrics(tmp_path) if "heldout_loss" in r]
    assert [r["step"] for r in logged] == [2, 4]


def test_export_ema_prior_of_a_mid_run_checkpoint(data, tmp_path, capsys):
    s1 = cfg(data, "stage1.steps=2", "stage1.ckpt_every=1000")
    run(s1, 1, tmp_path / "s1").train()
    c = cfg(data, "stage2.steps=4", "stage2.ckpt_every=2", "stage2.ema_decay=0.5",
            "stage2.keep=5")
    run(c, 2, tmp_path / "s2", init=tmp_path / "s1" / "final").train(max_steps=2)
    ckpt = tmp_path / "s2" / "checkpoints" / "step-00000002"
    assert main(["export", str(ckpt), str(tmp_path / "ema"), "--ema"]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "raw")]) == 0
    ema = ColaModel.from_pretrained(tmp_path / "ema").prior.state_dict()
    raw = ColaModel.from_pretrained(tmp_path / "raw").prior.state_dict()
    want = ColaModel.from_pretrained(ckpt / "model").prior.state_dict()
    from prior.dit import DiT

    want_ema = DiT.from_pretrained(ckpt / "ema_prior").state_dict()
    assert all(torch.equal(raw[k], want[k]) and torch.equal(ema[k], want_ema[k].float())
               for k in want)
    assert any(not torch.equal(ema[k], raw[k]) for k in want)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ema"), str(tmp_path / "x"), "--ema"]) == 2
    assert "--ema needs a training checkpoint" in capsys.readouterr().err
