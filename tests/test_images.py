"""Image preprocessing (unified/data/images.py) on the probe set of bench/preprocess_probe.py: shapes
keep their proportions, EXIF orientation is applied, transparency becomes white, 16-bit and
palette images keep their tones; training and the pipeline share the one function."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.preprocess_probe import exif_portrait, gray16, palette, panorama, probes, rgba, square
from unified.apps.pipeline import prepare_image
from unified.data.images import load_image, model_input
from unified.data.records import ImageRef

S = 64


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def blob_aspect(x: torch.Tensor, color: tuple[float, float, float]) -> float:
    """Width / height of the pixels close to `color` (RGB in [0, 1])."""
    rgb = (x + 1) / 2
    mask = ((rgb - torch.tensor(color)[:, None, None]).abs() < 0.15).all(0)
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    return (int(cols.max() - cols.min()) + 1) / (int(rows.max() - rows.min()) + 1)


def test_every_probe_becomes_a_square_tensor_in_range():
    for name, raw in probes().items():
        for train in (False, True):
            x = model_input(load_image(raw, S), S, train=train, seed=1, flip=True)
            assert x.shape == (3, S, S) and x.dtype == torch.float32, name
            assert -1 <= float(x.min()) and float(x.max()) <= 1, name


def test_square_and_4_to_1_keep_circles_round():
    sq = model_input(load_image(png(square())), S)
    assert blob_aspect(sq, (200 / 255, 30 / 255, 30 / 255)) == pytest.approx(1.0, abs=0.1)
    pano = model_input(load_image(png(panorama())), S)
    assert blob_aspect(pano, (250 / 255, 210 / 255, 40 / 255)) == pytest.approx(1.0, abs=0.1)
    # the old square resize squashed it to a quarter of its width
    old = Image.open(io.BytesIO(png(panorama()))).convert("RGB").resize((S, S))
    old_x = torch.from_numpy(np.asarray(old, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert blob_aspect(old_x, (250 / 255, 210 / 255, 40 / 255)) < 0.4
    # evaluation crops the center (the green left edge is cut); training crops anywhere
    green = ((pano + 1) / 2 - torch.tensor([30, 140, 60])[:, None, None] / 255).abs().max(0)
    assert not (green.values < 0.1).any()
    crops = {tuple(model_input(load_image(png(panorama())), S, train=True, seed=s)[:, 0, 0]
                   .tolist()) for s in range(12)}
    assert len(crops) > 1


def test_exif_rotation_is_applied():
    x = model_input(load_image(exif_portrait()), S)
    red, blue = torch.tensor([210, 30, 30]) / 255, torch.tensor([30, 60, 210]) / 255
    top, bottom = (x[:, 4, S // 2] + 1) / 2, (x[:, -4, S // 2] + 1) / 2
    assert (top - red).abs().max() < 0.1 and (bottom - blue).abs().max() < 0.1


def test_transparency_is_white_not_black():
    for raw in (rgba(), palette()):
        x = model_input(load_image(raw), S)
        assert torch.allclose(x[:, 1, 1], torch.ones(3), atol=0.02)  # background corner
    x = model_input(load_image(rgba()), S)
    assert torch.allclose(x[:, S // 2, S // 2], -torch.ones(3), atol=0.02)  # opaque black


def test_16_bit_grayscale_keeps_its_range():
    x = model_input(load_image(gray16()), S)
    assert float(x.min()) < -0.95 and float(x.max()) > 0.95
    assert abs(float(x.mean())) < 0.1  # a ramp averages mid-gray, not saturated white
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    arr = np.tile(np.linspace(0, 65535, 80).astype(np.uint16)[:, None], (1, 80))
    i_mode = Image.fromarray(arr.astype(np.int32))  # 32-bit "I" holding 16-bit data
    assert abs(float(model_input(load_image(i_mode), S).mean())) < 0.1


def test_training_crop_and_flip_depend_on_the_seed_only():
    raw = png(panorama())
    a = ImageRef(raw).decode(S, train=True, seed=5, flip=True)
    assert torch.equal(a, ImageRef(raw).decode(S, train=True, seed=5, flip=True))
    flipped = [torch.equal(ImageRef(raw).decode(S, train=True, seed=s, flip=True),
                           ImageRef(raw).decode(S, train=True, seed=s).flip(-1))
               for s in range(20)]
    assert 3 < sum(flipped) < 17  # about half mirrored


def test_pipeline_and_training_share_the_preprocessing(tmp_path):
    for name, raw in probes().items():
        path = tmp_path / "probe.img"
        path.write_bytes(raw)
        ref = ImageRef(raw).decode(S)
        assert torch.equal(prepare_image(str(path), S), ref), name
        # a PIL image decodes at full scale (a JPEG file or shard: at the reduced DCT scale)
        pil = prepare_image(Image.open(io.BytesIO(raw)), S)
        assert (pil - ref).abs().mean() < 0.02, name
    arr16 = (np.linspace(0, 65535, 48 * 48 * 3).reshape(48, 48, 3)).astype(np.uint16)
    assert abs(float(prepare_image(arr16, S).mean())) < 0.1
    rgba_arr = np.zeros((40, 40, 4), np.uint8)  # transparent black -> white
    assert torch.allclose(prepare_image(rgba_arr, S), torch.ones(3, S, S))
