"""Image-caption shards: good samples decode, bad ones are skipped and counted."""

import io

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from unified.data.streams import SkipCounter, image_text_samples


def png_bytes(color, size=32):
    img = Image.new("RGB", (size, size), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_image_text_samples_skip_and_count_bad_input(tmp_path):
    good = tmp_path / "a-000000.tar"
    with wds.TarWriter(str(good)) as w:
        w.write({"__key__": "s0", "png": png_bytes((255, 0, 0)), "txt": "a red image",
                 "json": b'{"objects": 1}'})
        w.write({"__key__": "s1", "png": b"\x89PNG not really a png", "txt": "corrupt"})
        w.write({"__key__": "s2", "png": png_bytes((0, 0, 255), 64), "txt": "a blue image"})
        w.write({"__key__": "s3", "png": png_bytes((0, 255, 0))})  # caption missing
        w.write({"__key__": "s4", "txt": "image missing"})
        w.write({"__key__": "s5", "jpg": b"\xff\xd8\xff\xe0 broken jpeg", "txt": "corrupt jpg"})
    raw = good.read_bytes()
    (tmp_path / "b-000000.tar").write_bytes(raw[: len(raw) // 2])  # truncated copy
    skips = SkipCounter()
    out = list(image_text_samples(str(tmp_path), image_size=32, skips=skips))
    good_keys = [s["key"] for s in out]
    assert good_keys.count("s0") >= 1 and "s2" in good_keys
    assert not {"s1", "s3", "s4", "s5"} & set(good_keys)
    s0 = next(s for s in out if s["key"] == "s0")
    assert s0["image"].shape == (3, 32, 32) and s0["caption"] == "a red image"
    assert torch.allclose(s0["image"][0], torch.ones(32, 32)) and s0["image"][2].max() == -1
    assert s0["meta"] == {"objects": 1}
    s2 = next(s for s in out if s["key"] == "s2")
    assert s2["image"].shape == (3, 32, 32)  # resized from 64x64
    # four bad samples in the good shard (twice if the truncated copy reached them) + the cut
    assert skips.total >= 5
    assert any("Image" in k or "Decoding" in k for k in skips.counts)
    assert np.isfinite(s2["image"].numpy()).all()


def test_cli_latent_stats_measures_warns_and_writes(tmp_path, capsys):
    from unified.apps.cli import main
    from vaes.image_vae import load_image_vae, small_image_vae

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as w:
        for i in range(40):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            w.write({"__key__": f"k{i}", "png": png_bytes(color), "txt": "an image"})
    torch.manual_seed(0)
    small_image_vae(widths=(16, 32, 32)).save_pretrained(tmp_path / "vae")
    argv = ["latent-stats", "--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "s-000000.tar")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "40 images (0 skipped)" in out.out and "WARNING" in out.err  # untrained: off
    assert main([*argv, "--write"]) == 0
    assert load_image_vae(tmp_path / "vae").config.latents_std is not None
    capsys.readouterr()
    assert main(argv) == 0
    assert "WARNING" not in capsys.readouterr().err
