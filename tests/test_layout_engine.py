"""The central invariant (DESIGN §3), per task layout: the prior's output for every noisy
block of the 2L training layout (`build_layout` on a task's recipe) equals what the production
KV-cached engine computes for that block during generation, given the same latents, noise and
times, for the conditional branch, the unconditional one and their CFG combination.

The engine runs for real (the task's `stream` / `generate`, prompts and images encoded by the
model, the prefix and positions built by the generator); only the ODE solver is replaced by a
probe that asks the engine for the velocity at the training layout's noisy block and returns
the block's clean latents, so the history it commits is the training layout's history.
"""

from __future__ import annotations

import pytest
import torch

import unified.generate as engine
from prior.flow import cfg_combine
from tasks import image_to_text, text_to_image, text_to_text
from tasks.base import encode_conditions
from tasks.shapes.world import render, scene_at
from unified.generate import GenerationConfig, ImageGenerationConfig
from unified.layout import build_layout, place
from vaes.tokenizer import encode_piece

TOL = 1e-5  # fp32, per branch


def tolerance(guidance: float) -> float:
    """The CFG combination (1 - w) v_u + w v_c of two branches each within TOL of training is
    within (|1 - w| + |w|) TOL of the combined training outputs: the bound we check."""
    return TOL * (abs(1 - guidance) + abs(guidance))


def shapes_images(n: int) -> torch.Tensor:
    import numpy as np

    arr = [torch.from_numpy(np.asarray(render(scene_at(5, i, 2)), dtype=np.float32))
           for i in range(n)]
    return torch.stack(arr).permute(0, 3, 1, 2) / 127.5 - 1


def training_outputs(model, samples, drop: bool, seed: int):
    """The prior on the 2L layout of `samples` (one per row); returns the layout and v."""
    gen = torch.Generator().manual_seed(seed)
    lay = build_layout(samples, model.block_size, model.times, float(drop), gen)
    with torch.no_grad():
        v = model.prior(model.prior_in(lay.z), lay.t, lay.modality, lay.positions,
                        lay.attention_mask())
    return lay, v


def noisy_blocks(lay, v):
    """Per row, the noisy blocks in order: (z_t [n, D], t [n], v [n, D], z0 [n, D])."""
    out = []
    for r in range(lay.z.shape[0]):
        noisy = lay.meta.noisy[r] & lay.valid[r]
        blocks = []
        for b in lay.meta.block[r][noisy].unique().tolist():
            sel = noisy & (lay.meta.block[r] == b)
            z, t = lay.z[r, sel], lay.t[r, sel]
            z0 = z - t[:, None] * lay.target[r, sel]  # z_t = z0 + t u (u = eps - z0)
            blocks.append((z, t, v[r, sel], z0))
        out.append(blocks)
    return out


class Probe:
    """Stands in for `integrate`: block g of every row is evaluated at the training layout's
    (z_t, t); its output is compared with the training prior's; the clean z0 is returned."""

    def __init__(self, expected: list[list[tuple]], d: int):
        self.expected, self.d, self.block, self.worst = expected, d, 0, 0.0

    def __call__(self, velocity, eps, cfg, pinned=None, pinned_value=None, callback=None):
        g = self.block
        self.block += 1
        rows = [blocks[g] for blocks in self.expected]
        z = torch.stack([r[0][:, : self.d] for r in rows])
        t = torch.stack([r[1] for r in rows])
        want = torch.stack([r[2][:, : self.d] for r in rows])
        got = velocity(z, t)
        # pinned prompt tokens (t = 0 in a noisy block) are overwritten by the solver: their
        # outputs are unused (in a dropped branch nothing else sees them), so only the
        # generated tokens are compared
        free = t > 0
        self.worst = max(self.worst, (got - want)[free].abs().max().item())
        assert want.abs().max() > 1e-2  # a real output, not an all-zero one
        return torch.stack([r[3][:, : self.d] for r in rows])


def expected_for(model, samples, guidance: float, seed: int):
    lay, v_cond = training_outputs(model, samples, drop=False, seed=seed)
    if guidance != 1.0:
        _, v_uncond = training_outputs(model, samples, drop=True, seed=seed)  # same draws
        v_cond = cfg_combine(v_cond, v_uncond, guidance)
    return noisy_blocks(lay, v_cond)


def answer_latents(model, prompt_ids: list[int], n_total: int, seed: int) -> torch.Tensor:
    """Latents of a text whose first tokens are a prompt (encoded as generation encodes
    them) and whose remaining positions are arbitrary (the probe commits them)."""
    z_prompt = model.encode_texts([prompt_ids])[0]
    rest = torch.randn(n_total - len(prompt_ids), z_prompt.shape[-1],
                       generator=torch.Generator().manual_seed(seed))
    return torch.cat([z_prompt, rest])


def prompt_ids(model, text: str) -> list[int]:
    tok = model.tokenizer
    body = tok.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []
    return [tok.bos_token_id, *body]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("prompts", [
    ["a large red"],  # shorter than a block: pinned in the first block, dropped whole by CFG
    ["Return the number of items in the list", "Open"],  # whole blocks C + a pinned tail
])
def test_text_to_text_training_equals_engine(tiny_unified, monkeypatch, prompts, guidance):
    m, bs = tiny_unified, tiny_unified.block_size
    samples = []
    for i, p in enumerate(prompts):
        ids = prompt_ids(m, p)
        n_total = (len(ids) // bs + 4) * bs
        z = answer_latents(m, ids, n_total, seed=i)
        samples.append(place(text_to_text.recipe(len(ids)), [z], [], torch.zeros(0, 2)))
    probe = Probe(expected_for(m, samples, guidance, seed=5), m.vae.config.latent_dim)
    monkeypatch.setattr(engine, "integrate", probe)
    gen = GenerationConfig(max_new_tokens=3 * bs, steps=1, guidance=guidance, seed=0)
    list(text_to_text.stream(m, prompts, gen))
    assert probe.block >= 3
    assert probe.worst <= tolerance(guidance)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("question,prefix", [
    (None, ""),  # a caption: the instruction, the image, [bos]
    ("what shape is at the top left?", ""),  # a question about the image
    (None, "a large red circle at the top left and"),  # a caption prefix: C blocks + tail
])
def test_image_to_text_training_equals_engine(tiny_unified, monkeypatch, question, prefix,
                                             guidance):
    m, bs = tiny_unified, tiny_unified.block_size
    image = shapes_images(1)
    condition = image_to_text._conditions(m, image, [question])[0]  # the production recipe
    ids = prompt_ids(m, prefix)
    n_total = (len(ids) // bs + 4) * bs
    answer = answer_latents(m, ids, n_total, seed=1)
    # the training sample: the task's recipe, its condition latents as generation encodes them
    instr, img = condition
    samples = [place(image_to_text.recipe(len(ids)), [instr.z0, answer], [img.z0],
                     m.image_grid())]
    assert torch.equal(samples[0][0].positions, instr.positions)
    assert torch.equal(samples[0][1].positions, img.positions)
    probe = Probe(expected_for(m, samples, guidance, seed=7), m.vae.config.latent_dim)
    monkeypatch.setattr(engine, "integrate", probe)
    gen = GenerationConfig(max_new_tokens=3 * bs, steps=1, guidance=guidance, seed=0)
    list(image_to_text.stream(m, image, [question], [prefix], gen))
    assert probe.block >= 3
    assert probe.worst <= tolerance(guidance)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_text_to_image_training_equals_engine(tiny_unified, monkeypatch, guidance):
    m = tiny_unified
    prompts = ["a large red circle at the top left",
               "two objects: a small blue square at the center and a large green cross"]
    samples = []
    for i, p in enumerate(prompts):
        ids = encode_piece(m.tokenizer, p, m.vae.config.max_len)
        caption = encode_conditions(m, text_to_image.CONDITION, [ids], [])[0]
        n = m.image_grid().shape[0]
        tokens = torch.randn(n, m.image_token_dim, generator=torch.Generator().manual_seed(i))
        samples.append(place(text_to_image.RECIPE, [caption.z0], [tokens], m.image_grid()))
    probe = Probe(expected_for(m, samples, guidance, seed=3), m.image_token_dim)
    monkeypatch.setattr(engine, "integrate", probe)
    text_to_image.generate(m, prompts, ImageGenerationConfig(steps=1, guidance=guidance, seed=0))
    assert probe.block == 1
    assert probe.worst <= tolerance(guidance)
