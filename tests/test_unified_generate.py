"""Unified generation: the KV-cached engine against the full-recompute reference, for
image-to-text (captions, questions, answer prefixes) and text-to-image."""

import dataclasses

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


def test_text_to_image_rows_equal_their_solo_images(tiny_unified):
    """A row's noise comes from its own seed: [P, Q] with seed 3 draws Q as Q alone does, and a
    list of seeds gives each row its own."""
    gen = ImageGenerationConfig(steps=2, guidance=4.0, seed=3)
    p = ["a large red circle at the top left", "two objects: a small blue square at the center "
         "and a large green cross at the bottom right"]
    both = text_to_image.generate(tiny_unified, p, gen)
    for r in range(2):
        solo = text_to_image.generate(tiny_unified, [p[r]], gen)
        assert (solo.tokens[0] - both.tokens[r]).abs().max().item() <= 1e-5
        assert (solo.images[0] - both.images[r]).abs().max().item() <= 1e-4
    mixed = text_to_image.generate(tiny_unified, p, gen, seeds=[5, 3])
    assert (mixed.tokens[1] - both.tokens[1]).abs().max().item() <= 1e-5
    solo5 = text_to_image.generate(tiny_unified, [p[0]], dataclasses.replace(gen, seed=5))
    assert (mixed.tokens[0] - solo5.tokens[0]).abs().max().item() <= 1e-5
    assert not torch.allclose(mixed.tokens[0], both.tokens[0], atol=1e-3)


def test_caption_rows_equal_their_solo_captions(tiny_unified):
    gen = GenerationConfig(max_new_tokens=8, steps=2, guidance=2.0, temperature=1.0, seed=4)
    qs, prefixes = [None, "what shape is at the top left?", None], ["", "", "a large"]
    x = images()
    both = list(image_to_text.stream(tiny_unified, x, qs, prefixes, gen))
    for r in range(3):
        solo = list(image_to_text.stream(tiny_unified, x[r:r + 1], qs[r:r + 1],
                                          prefixes[r:r + 1], gen))
        assert solo[-1].texts[0] == both[-1].texts[r]
        for s, b in zip(solo, both):
            assert (s.latents[0] - b.latents[r]).abs().max().item() <= 1e-5


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
    # a row with a question gets one of its own samples too, chosen by answer_flow_loss
    q = ["how many objects are there?", None]
    asked = image_to_text.generate(tiny_unified, x, q, gen=gen, rerank=3)
    answers = [image_to_text.generate(tiny_unified, x, q, gen=GenerationConfig(
        max_new_tokens=6, steps=2, guidance=1.0, seed=5 + k)) for k in range(3)]
    assert asked[0] in {a[0] for a in answers}
    want, _ = image_to_text.rerank_answers(tiny_unified, x[:1], q[:1], [[a[0] for a in answers]])
    assert asked[0] == want[0]


def test_answer_flow_loss_is_the_training_loss_and_reranking_takes_the_argmin(tiny_unified):
    from unified.config import LossConfig
    from unified.data.streams import TaskSample, collate_task_samples
    from vaes.tokenizer import encode_piece

    m, tok = tiny_unified, tiny_unified.tokenizer
    x = images(1).expand(3, -1, -1, -1)
    q = ["what color is the circle?"] * 3
    answers = ["red", "blue", "red"]
    loss = image_to_text.answer_flow_loss(m, x, q, answers, seeds=(3,))
    assert loss.shape == (3,) and loss[0] == loss[2]  # same seed, same answer: same loss
    assert loss[0] != loss[1]  # the answer matters
    # the reference: the same samples through the stage-2 training loss (summed over rows;
    # posterior means, as the scorer uses)
    samples = [TaskSample(image_to_text.NAME, [encode_piece(tok, q[0], 64),
                                               encode_piece(tok, a, 64, pad_to=m.block_size)],
                          [x[0]], image_to_text.recipe(1), seed=3) for a in answers]
    pairs = collate_task_samples(samples, seq_len=m.vae.config.max_len, pad_id=tok.pad_token_id)
    rows = pairs["pieces"]
    with torch.no_grad():
        mean, _ = m.vae.encode(rows["input_ids"], rows["sample_ids"], rows["positions"])
        terms = m._pair_flow_losses(pairs, m.vae.normalize(mean), LossConfig(sample_posterior=False),
                                    None)
    assert torch.allclose(terms[image_to_text.NAME][0], loss.sum(), rtol=1e-5)
    cands = [["blue", "red", "blue"], ["red"]]  # the second has no choice to make
    best, nfe = image_to_text.rerank_answers(m, x[:2], q[:2], cands, seeds=(3,))
    assert best == [answers[int(loss[:2].argmin())], "red"] and nfe == 1
    assert image_to_text.rerank_answers(m, x[:1], q[:1], [["red"]]) == (["red"], 0)
