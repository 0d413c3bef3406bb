"""Unified generation: the KV-cached engine against the full-recompute reference, for
image-to-text (captions, questions, answer prefixes) and text-to-image."""

import pytest
import torch

from tasks import image_to_text, text_to_image
from tasks.shapes.world import render, scene_at
from unified.generate import GenerationConfig, ImageGenerationConfig


def images(n=3):
    import numpy as np

    arr = [torch.from_numpy(np.asarray(render(scene_at(5, i, 2)), dtype=np.float32))
           for i in range(n)]
    return torch.stack(arr).permute(0, 3, 1, 2) / 127.5 - 1


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_caption_cached_equals_reference(tiny_unified, guidance):
    gen = GenerationConfig(max_new_tokens=10, steps=3, guidance=guidance, temperature=1.0, seed=2)
    qs = [None, "what shape is at the top left?", None]
    prefixes = ["", "", "a large"]
    fast = list(image_to_text.stream(tiny_unified, images(), qs, prefixes, gen, use_cache=True))
    slow = list(image_to_text.stream(tiny_unified, images(), qs, prefixes, gen, use_cache=False))
    assert len(fast) == len(slow) >= 3
    for f, s in zip(fast, slow):
        assert f.new_ids == s.new_ids
        assert (f.latents - s.latents).abs().max().item() <= 1e-4
        assert f.latents.abs().max() > 0.1
    # one prefix call (instruction + image, the answer's whole prompt blocks), then one fused
    # call per step
    assert fast[-1].nfe == 1 + len(fast) * gen.steps


def test_caption_depends_on_the_image(tiny_unified):
    gen = GenerationConfig(max_new_tokens=8, steps=2, guidance=1.0, seed=0)
    a = list(image_to_text.stream(tiny_unified, images(2), gen=gen))[0].latents
    flipped = images(2).flip(0)
    b = list(image_to_text.stream(tiny_unified, flipped, gen=gen))[0].latents
    # same noise (row 0), another image: another answer latent
    assert not torch.allclose(a[0], b[0], atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_text_to_image_cached_equals_reference(tiny_unified, guidance):
    gen = ImageGenerationConfig(steps=4, guidance=guidance, seed=3)
    prompts = ["a large red circle at the top left", "two objects: a small blue square at the "
               "center and a large green cross at the bottom right"]
    fast = text_to_image.generate(tiny_unified, prompts, gen, use_cache=True, trajectory=3)
    slow = text_to_image.generate(tiny_unified, prompts, gen, use_cache=False)
    assert (fast.tokens - slow.tokens).abs().max().item() <= 1e-4
    assert fast.tokens.abs().max() > 0.1
    assert fast.images.shape == (2, 3, 32, 32) and fast.images.abs().max() <= 1.0
    branches = 1 if guidance == 1.0 else 2
    assert fast.nfe == 1 + gen.steps and slow.nfe == branches * gen.steps
    assert len(fast.trajectory) == 3 and fast.trajectory_t[0] == 1.0
    assert fast.trajectory_t == sorted(fast.trajectory_t, reverse=True)


def test_text_to_image_rows_follow_their_prompt(tiny_unified):
    gen = ImageGenerationConfig(steps=2, guidance=1.0, seed=0)
    p = ["a large red circle at the top left", "a small blue square at the center"]
    both = text_to_image.generate(tiny_unified, p, gen).tokens
    swapped = text_to_image.generate(tiny_unified, p[::-1], gen).tokens
    # same noise per row index, different condition: the rows differ
    assert not torch.allclose(both[0], swapped[0], atol=1e-4)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_image_prompt_is_refused(tiny_unified, prompt):
    with pytest.raises(ValueError, match="empty"):
        text_to_image.generate(tiny_unified, [prompt])


def test_flow_loss_cached_equals_reference_and_reranking_takes_the_argmin(tiny_unified):
    from tasks.base import encode_conditions
    from unified.generate import ImageGenerator
    from vaes.tokenizer import encode_piece

    m = tiny_unified
    caps = ["a large red circle at the top left", "a small blue square at the center",
            "two objects: a small blue square at the center and a large green cross at the top"]
    rows = [encode_conditions(m, text_to_image.CONDITION, [encode_piece(m.tokenizer, c, 64)], [])
            for c in caps]
    tokens = m.encode_images(images(1)).expand(3, -1, -1)
    fast, nfe = ImageGenerator(m).flow_loss(rows, tokens)
    slow, _ = ImageGenerator(m).flow_loss(rows, tokens, use_cache=False)
    assert fast.shape == (3,) and torch.allclose(fast, slow, atol=1e-5)
    assert nfe == 2  # the captions' prefix call, then one call for every (caption, time)
    assert len(set(fast.tolist())) == 3  # the caption matters
    assert torch.equal(ImageGenerator(m).flow_loss(rows, tokens)[0], fast)  # fixed noise
    best, _ = image_to_text.rerank_captions(m, images(1), [caps])
    assert best == [caps[int(fast.argmin())]]


def test_caption_rerank_returns_one_of_its_samples(tiny_unified):
    gen = GenerationConfig(max_new_tokens=6, steps=2, guidance=1.0, seed=5)
    x = images(2)
    samples = [image_to_text.generate(tiny_unified, x, gen=GenerationConfig(
        max_new_tokens=6, steps=2, guidance=1.0, seed=5 + k)) for k in range(3)]
    best = image_to_text.generate(tiny_unified, x, gen=gen, rerank=3)
    assert all(best[i] in {s[i] for s in samples} for i in range(2))
    # a row with a question keeps its first sample
    asked = image_to_text.generate(tiny_unified, x, ["how many objects are there?", None],
                                   gen=gen, rerank=3)
    assert asked[0] == image_to_text.generate(tiny_unified, x, ["how many objects are there?",
                                                                None], gen=gen)[0]
