"""`height` / `width` at generation: non-square images from the 2-D RoPE token grid, one check
(unified/apps/inputs.py image_size) refusing bad sizes in the pipeline, the CLI and the server,
and the default size drawing exactly what it drew before."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tasks import text_to_image
from unified.apps import inputs
from unified.apps.cli import main
from unified.apps.errors import ApiError
from unified.apps.pipeline import UnifiedPipeline
from unified.apps.schemas import ImageRequest, ServeContext, image_job
from unified.sampling import GenerationDefaults, ImageGenerationConfig

PROMPT = "a large red circle at the top left"


@pytest.fixture(scope="module")
def pipe(tiny_unified):
    return UnifiedPipeline.from_model(tiny_unified)


def test_a_non_square_image_has_its_shape_and_decodes(tiny_unified, pipe):
    m = tiny_unified
    assert (m.image_size, m.image_factor) == (32, 8)  # 4x down VAE, patch 2
    gen = ImageGenerationConfig(steps=2, seed=1, height=16, width=48)
    out = text_to_image.generate(m, [PROMPT, "a small blue square"], gen, trajectory=2)
    assert out.tokens.shape == (2, 2 * 6, m.image_token_dim)  # a 2 x 6 token grid
    assert out.images.shape == (2, 3, 16, 48) and torch.isfinite(out.images).all()
    assert [t.shape for t in out.trajectory] == [(2, 3, 16, 48)] * 2
    assert out.images.std() > 0  # decoded pixels, not a constant
    res = pipe.text_to_image(PROMPT, steps=2, seed=1, height=16, width=48)
    assert res.images[0].size == (48, 16)  # PIL: (width, height)
    assert np.array_equal(np.asarray(res.images[0]),
                          np.asarray(pipe.text_to_image(PROMPT, steps=2, seed=1, height=16,
                                                        width=48).images[0]))
    tall = pipe.text_to_image(PROMPT, steps=2, seed=1, height=64, width=24).images[0]
    assert tall.size == (24, 64)


def test_the_default_size_draws_the_same_pixels(pipe):
    default = pipe.text_to_image(PROMPT, steps=3, seed=7).images[0]
    explicit = pipe.text_to_image(PROMPT, steps=3, seed=7, height=32, width=32).images[0]
    one_side = pipe.text_to_image(PROMPT, steps=3, seed=7, width=32).images[0]
    assert default.size == (32, 32)
    assert np.array_equal(np.asarray(default), np.asarray(explicit))
    assert np.array_equal(np.asarray(default), np.asarray(one_side))


@pytest.mark.parametrize("height,width,words", [
    (20, None, "height must be a positive multiple of 8 pixels"),
    (None, 0, "width must be a positive multiple of 8 pixels"),
    (-8, None, "height must be a positive multiple of 8"),
    (None, 1024, "width must be at most 128 pixels"),
    (8.5, None, "height must be a whole number, got 8.5"),
    ("32", None, "height must be a whole number"),
])
def test_a_bad_size_is_refused_by_the_pipeline(pipe, height, width, words):
    with pytest.raises(ValueError) as e:
        pipe.text_to_image(PROMPT, steps=2, height=height, width=width)
    assert words in str(e.value)


def test_the_size_is_a_per_call_knob_not_a_saved_default():
    d = GenerationDefaults(image=ImageGenerationConfig(height=16, width=8))
    assert "height" not in d.to_json()["image"] and "width" not in d.to_json()["image"]
    with pytest.raises(ValueError, match="unknown knobs"):
        GenerationDefaults.from_json({"image": {"height": 64}})
    with pytest.raises(ValueError, match="height must be a whole number"):
        ImageGenerationConfig(height=3.5)


def test_inputs_parse_and_check_an_openai_size():
    assert inputs.size_text("size", "64x16") == (16, 64)  # WIDTHxHEIGHT -> (height, width)
    assert inputs.size_text("size", "auto") is None and inputs.size_text("size", None) is None
    for bad in ("64", "64x", "axb", "64*16", 64):
        with pytest.raises(ValueError, match="size must look like WIDTHxHEIGHT"):
            inputs.size_text("size", bad)
    assert inputs.image_size(None, 40, factor=8, size=32) == (32, 40)


def test_a_bad_size_is_refused_on_the_command_line(tiny_unified_checkpoint, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = ["imagine", PROMPT, "-o", str(out), "--checkpoint", str(tiny_unified_checkpoint),
            "--steps", "2"]
    assert main([*args, "--height", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cola imagine: error: --height must be a positive multiple of 8"), err
    assert main([*args, "--width", "0"]) == 2  # refused before the model loads
    assert "--width must be between 1 and 4096, got 0" in capsys.readouterr().err
    assert main([*args, "--width", "4096"]) == 2
    assert "--width must be at most 128 pixels" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--height", "16", "--width", "40"]) == 0
    assert "(40 x 16)" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out).size == (40, 16)


def test_the_server_takes_a_size_and_refuses_a_bad_one_in_the_openai_format(pipe):
    ctx = ServeContext(pipe, "m")
    job = image_job(ImageRequest(prompt=PROMPT, size="48x16", seed=1), ctx)
    assert (job.gen.height, job.gen.width) == (16, 48)
    same = image_job(ImageRequest(prompt=PROMPT, size="32x32", seed=1), ctx)
    auto = image_job(ImageRequest(prompt=PROMPT, size="auto", seed=1), ctx)
    assert (same.gen.height, same.gen.width) == (32, 32)
    assert dataclasses.replace(auto.gen, height=32, width=32) == same.gen
    for size, words in (("30x32", "size width must be a positive multiple of 8"),
                        ("32x1024", "size height must be at most 128"),
                        ("big", "size must look like WIDTHxHEIGHT")):
        with pytest.raises(ApiError) as e:
            image_job(ImageRequest(prompt=PROMPT, size=size), ctx)
        assert e.value.status == 400 and e.value.param == "size"
        assert words in e.value.message and "32x32" in e.value.message
