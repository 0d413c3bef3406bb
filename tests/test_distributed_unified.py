"""The unified mixture (prose + image-to-text + text-to-image) under torchrun, 2 ranks on CPU:
DDP and FSDP2 steps equal the single-process steps on the same global batch.

Every rank reduces the same loss terms (a task absent from a rank's slice contributes (0, 0)),
and the means are global (sums over counts summed across ranks), so with the deterministic
ablation of the VAE (posterior mean, no masking, no decoder noise) the only randomness left
is the flow's, which is drawn per sample (pairs) and per global row (prose): the losses and
every per-task flow loss must agree to float tolerance.
"""

import json
import subprocess
import sys

import pytest
from conftest import stdlib_shards
from test_distributed import cli_env, records

from tasks import TaskMixture
from tasks.shapes.world import make_shapes_shards
from unified.config import load_preset
from unified.training.trainer import Trainer

STEPS = 3
DETERMINISTIC = ["loss.sample_posterior=false", "loss.mask_prob=0", "loss.decoder_noise=0",
                 "stage2.log_every=1", f"stage2.steps={STEPS}", "stage2.ckpt_every=1000",
                 "data.batch_size=2", "data.pair_batch_size=8", "stage2.ema_decay=0",
                 "tasks.question_prob=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-unified")
    stdlib_shards(root / "text", 120, max_per_shard=60)
    make_shapes_shards(root / "shapes", n_train=120, n_heldout=0, difficulty=2,
                       max_per_shard=60)
    data = [f'data.train="{root / "text"}"', f'data.pairs="{root / "shapes" / "train"}"']
    s1 = load_preset("shapes-tiny", [*data, "stage1.steps=2", "stage1.ckpt_every=1000"])
    Trainer(s1, 1, root / "s1", tasks=TaskMixture(s1)).train()
    return root, data


def overrides(data, *extra):
    return [*data, *DETERMINISTIC, *extra]


def run_torchrun(root, out, sets):
    args = [a for o in sets for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "unified.apps.cli", "train", "--preset", "shapes-tiny", "--stage", "2",
           "--init", str(root / "s1" / "final"), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return records(out)


@pytest.fixture(scope="module")
def single(setup):
    root, data = setup
    c = load_preset("shapes-tiny", overrides(data))
    hist = Trainer(c, 2, root / "single", init=root / "s1" / "final",
                   tasks=TaskMixture(c)).train()
    assert len(hist) == STEPS
    return hist


def assert_same_steps(got: dict[int, dict], ref: list[dict]):
    assert sorted(got) == list(range(1, STEPS + 1))
    for h in ref:
        g = got[h["step"]]
        terms = {k for k in h if k.startswith("fm_") or k in ("loss", "recon", "ref_kl", "fm")}
        assert {k for k in g if k.startswith("fm_")} == {k for k in terms if k.startswith("fm_")}
        for k in terms:
            assert g[k] == pytest.approx(h[k], rel=1e-4, abs=1e-6), (h["step"], k)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_on_the_unified_mixture(setup, single, parallel, tmp_path):
    root, data = setup
    # both image tasks (and prose) occur in the steps compared, not on every rank
    assert all("fm_image_to_text" in h and "fm_text_to_image" in h for h in single)
    got = run_torchrun(root, tmp_path / parallel,
                       overrides(data, f'stage2.parallel="{parallel}"'))
    assert_same_steps(got, single)
    state = json.loads(next((tmp_path / parallel / "checkpoints").glob("step-*/trainer.json"))
                       .read_text())
    assert state["world"] == 2 and state["step"] == STEPS
    # each rank decoded the images of its own slices only: together, one global batch a step
    assert got[STEPS]["images_decoded"] == STEPS * 8 == single[-1]["images_decoded"]
    assert (tmp_path / parallel / "final" / "model_index.json").is_file()
