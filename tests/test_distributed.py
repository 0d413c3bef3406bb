"""Multi-process training under torchrun (CPU, gloo), gradient accumulation, and kill/resume.

The equivalence tests use the deterministic ablation (posterior mean, no masking, no decoder
noise), so a 2-rank step and a single-process step see exactly the same rows and randomness:
their losses and final weights must agree to float tolerance.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import stdlib_shards

from unified.config import load_preset
from unified.model import ColaModel
from unified.training.trainer import Trainer

DETERMINISTIC = ["loss.sample_posterior=false", "loss.mask_prob=0", "loss.decoder_noise=0",
                 "stage1.log_every=1", "stage1.steps=6", "data.batch_size=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return stdlib_shards(tmp_path_factory.mktemp("dshards"), 400, max_per_shard=100)


def overrides(shards, *extra):
    return [f'data.train="{shards}"', *DETERMINISTIC, *extra]


def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def records(run: Path) -> dict[int, dict]:
    """The last logged record of every step (a resumed run logs some steps twice)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def test_gradient_accumulation_equals_the_full_batch(shards, tmp_path):
    full = Trainer(load_preset("text-tiny", overrides(shards)), 1, tmp_path / "a").train()
    acc = Trainer(load_preset("text-tiny", overrides(shards, "optim.grad_accum=2")), 1,
                  tmp_path / "b").train()
    assert [h["loss"] for h in acc] == pytest.approx([h["loss"] for h in full], rel=1e-5)


def test_torchrun_two_ranks_match_a_single_process(shards, tmp_path):
    single = Trainer(load_preset("text-tiny", overrides(shards)), 1, tmp_path / "single")
    ref = single.train()
    sets = [a for o in overrides(shards) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "unified.apps.cli", "train", "--preset", "text-tiny", "--stage", "1",
           "--out", str(tmp_path / "ddp"), *sets]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = records(tmp_path / "ddp")
    assert sorted(got) == list(range(1, 7))
    assert [got[s]["loss"] for s in range(1, 7)] == pytest.approx([h["loss"] for h in ref],
                                                                  rel=1e-4)
    a = ColaModel.from_pretrained(tmp_path / "single" / "final").vae.state_dict()
    b = ColaModel.from_pretrained(tmp_path / "ddp" / "final").vae.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    ckpt = json.loads(next((tmp_path / "ddp" / "checkpoints").glob("step-*/trainer.json"))
                      .read_text())
    assert ckpt["world"] == 2


KILLER = """
import os, signal, sys
import unified.training.checkpoint as ck
real = ck.save_file
calls = {"n": 0}
def dying_save_file(*a, **k):
    calls["n"] += 1
    if calls["n"] == int(os.environ["KILL_AT_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-write: model saved, optimizer not
    return real(*a, **k)
ck.save_file = dying_save_file
from unified.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_cmd(shards, out, *extra):
    sets = [a for o in [f'data.train="{shards}"', "stage1.log_every=1", "stage1.steps=16",
                        "stage1.ckpt_every=4", "stage1.keep=5", *extra] for a in ("--set", o)]
    return ["train", "--preset", "text-tiny", "--stage", "1", "--out", str(out), *sets]


def test_sigkill_mid_training_and_mid_checkpoint_resumes_exactly(shards, tmp_path):
    ref = records_of(Trainer(load_preset("text-tiny", [
        f'data.train="{shards}"', "stage1.log_every=1", "stage1.steps=16", "stage1.ckpt_every=4",
        "stage1.keep=5"]), 1, tmp_path / "ref"))

    # 1) killed mid-training once the step-8 checkpoint exists
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "unified.apps.cli", *train_cmd(shards, run)],
                         env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-00000008" / "trainer.json").exists():
        assert time.time() < deadline and p.poll() is None, "the run ended before step 8"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "final").exists()

    # 2) resumed, then killed inside the next checkpoint write (model written, optimizer not)
    env = dict(cli_env(), KILL_AT_SAVE="2")  # the optimizer's file of the first new checkpoint
    p = subprocess.run([sys.executable, "-c", KILLER, *train_cmd(shards, run)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL
    assert any(d.name.endswith(".tmp") for d in (run / "checkpoints").iterdir())

    # 3) resumed to the end: from the newest *complete* checkpoint, never the torn one
    p = subprocess.run([sys.executable, "-m", "unified.apps.cli", *train_cmd(shards, run)],
                       env=cli_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    got = records(run)
    assert sorted(got) == list(range(1, 17))
    assert [got[s]["loss"] for s in range(1, 17)] == pytest.approx(
        [ref[s] for s in range(1, 17)], rel=1e-6)
    assert not any(d.name.endswith(".tmp") for d in (run / "checkpoints").iterdir())


def records_of(trainer: Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.train()}


def torchrun(args, out, shards, *extra, timeout=300):
    sets = [a for o in overrides(shards, *extra) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "unified.apps.cli", "train", "--preset", "text-tiny", "--out", str(out),
           *args, *sets]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp2_matches_single_process_resumes_and_unshards(shards, tmp_path):
    ref = Trainer(load_preset("text-tiny", overrides(shards)), 1, tmp_path / "single").train()
    run = tmp_path / "fsdp"
    # 4 steps, a sharded checkpoint at step 4, then resume the sharded state to step 6
    torchrun(["--stage", "1", "--max-steps", "4"], run, shards, "stage1.parallel=\"fsdp\"",
             "stage1.ckpt_every=4")
    ckpt = run / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in ckpt.glob("model-shard-*")) == [
        "model-shard-0.safetensors", "model-shard-1.safetensors"]
    assert not list(ckpt.rglob("*.bin")) and not list(ckpt.rglob("*.pt"))
    torchrun(["--stage", "1"], run, shards, "stage1.parallel=\"fsdp\"", "stage1.ckpt_every=4")
    got = records(run)
    assert [got[s]["loss"] for s in range(1, 7)] == pytest.approx([h["loss"] for h in ref],
                                                                  rel=1e-4)
    # the sharded checkpoint joins into an ordinary model: the exported one, and the
    # single-process one up to float error
    from unified.training.fsdp import load_sharded_model

    joined = load_sharded_model(run / "checkpoints" / "step-00000006").vae.state_dict()
    final = ColaModel.from_pretrained(run / "final").vae.state_dict()
    single = ColaModel.from_pretrained(tmp_path / "single" / "final").vae.state_dict()
    for k in single:
        assert torch.equal(joined[k], final[k]), k
        assert torch.allclose(joined[k], single[k], atol=1e-5, rtol=1e-4), k
