"""The generic real-data preset family: configs/t2i-256.toml (GPU sizes) and its CPU smoke
variant, run here end to end on a small random-init VAE of the same geometry (4 latent
channels, 8x down, 256 px -> 256 image tokens) saved with save_pretrained, and on
img2dataset-style shards with mixed image sizes and formats, real .json metadata and
over-long captions: stage 1, stage 2 in one process and under torchrun on 2 ranks."""

import json
import subprocess
import sys

import pytest
import torch
from test_bad_data import good, write
from test_distributed import cli_env, records

from unified.apps.cli import main
from unified.apps.pipeline import UnifiedPipeline
from unified.config import load_preset
from vaes.image_vae import small_image_vae


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    long = "a large red circle at the top left next to a small blue square " * 12
    for k in range(2):
        write(root / "pairs" / f"{k:05d}.tar",
              [good(100 * k + i, **({"txt": long} if i % 5 == 0 else {})) for i in range(24)])
    torch.manual_seed(0)
    small_image_vae(latent_channels=4, widths=(8, 8, 16, 16), sample_size=256).save_pretrained(
        root / "vae")
    sets = [f'image.pretrained="{root / "vae"}"',
            f'data.pairs="{root / "pairs" / "{00000..00001}.tar"}"']
    return root, [a for o in sets for a in ("--set", o)]


def test_gpu_preset_has_the_smoke_geometry():
    big, smoke = load_preset("t2i-256"), load_preset("t2i-256-smoke")
    for key in ("size", "latent_channels", "patch_size"):
        assert getattr(big.image, key) == getattr(smoke.image, key)
    assert big.image.size == 256 and big.prior.width * big.prior.depth >= 1024 * 24
    from bench.model_size import sizes

    assert 250 < sizes("t2i-256")["prior_M"] < 350


def test_smoke_preset_trains_both_stages_on_one_and_two_ranks(setup, capsys):
    root, sets = setup
    s1 = ["train", "--preset", "t2i-256-smoke", "--stage", "1", "--out", str(root / "s1"), *sets]
    assert main(s1) == 0
    capsys.readouterr()
    s2 = ["--preset", "t2i-256-smoke", "--stage", "2", "--init", str(root / "s1" / "final"),
          *sets]
    assert main(["train", *s2, "--out", str(root / "s2")]) == 0
    one = records(root / "s2")
    assert sorted(one) == [1, 2, 3] and one[3]["captions_truncated"] > 0
    assert one[3]["images_decoded"] == 12 and one[3]["skipped"] == 0
    pipe = UnifiedPipeline.from_pretrained(root / "s2" / "final", device="cpu")
    assert pipe.text_to_image("a red circle", steps=2).images[0].size == (256, 256)
    assert not list((root / "s2" / "checkpoints").rglob("image_vae/*.safetensors"))

    for parallel in ("ddp", "fsdp"):  # pairs only: a rank may hold text-to-image alone
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "unified.apps.cli", "train", *s2, "--out",
               str(root / parallel), "--set", f'stage2.parallel="{parallel}"']
        proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        two = records(root / parallel)
        assert sorted(two) == [1, 2, 3] and two[3]["images_decoded"] == 12
        assert two[3]["captions_truncated"] > 0
        assert json.loads((root / parallel / "config.json").read_text())["image"]["size"] == 256
    from safetensors.torch import load_file

    shard = load_file(str(root / "fsdp" / "checkpoints" / "step-00000002" /
                          "model-shard-0.safetensors"))
    assert shard and not any(k.startswith("image_vae.") for k in shard)  # referred to, not copied
    assert (root / "fsdp" / "checkpoints" / "step-00000002" / "model" / "image_vae" /
            "weights.json").is_file()
