"""Block-wise generation: the KV-cached fast path against the slow full-recompute reference."""

import dataclasses

import pytest
import torch

from prior.dit import DiT
from unified.data.corpus import iter_stdlib_docstrings
from unified.generate import GenerationConfig, TextGenerator, sample_tokens
from unified.layout import TextLayoutConfig
from unified.model import ColaModel
from vaes.text_vae import TextVAE
from vaes.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    docs = [t for _, (_, t) in zip(range(300), iter_stdlib_docstrings())]
    return train_tokenizer(docs, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    vae = TextVAE(vocab_size=len(tokenizer), latent_dim=8, width=32, enc_layers=1, dec_layers=2,
                  heads=2, max_len=64)
    vae.set_latent_stats(torch.full((8,), 0.1), torch.full((8,), 0.5))
    dit = DiT(modalities={"text": 8}, width=32, depth=2, heads=2, attn_backend="sdpa")
    with torch.no_grad():  # move off AdaLN-zero so the prior's output is not trivially zero
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        # keep EOS unlikely so several blocks get generated
        vae.head.bias[tokenizer.eos_token_id] = -20.0
    return ColaModel(vae, dit, tokenizer, TextLayoutConfig(block_size=4)).eval()


PROMPTS = ["Return the number of items", "A", "Open the file and read its contents line by"]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_equals_reference(model, guidance, temperature):
    engine = TextGenerator(model)
    gen = GenerationConfig(max_new_tokens=10, steps=3, guidance=guidance,
                           temperature=temperature, seed=4)
    fast = list(engine.stream(PROMPTS, gen, use_cache=True))
    slow = list(engine.stream(PROMPTS, gen, use_cache=False))
    assert len(fast) == len(slow) >= 3
    for f, s in zip(fast, slow):
        assert f.new_ids == s.new_ids
        assert (f.latents - s.latents).abs().max().item() <= 1e-4
        assert f.latents.abs().max() > 0.1
    assert fast[-1].texts == slow[-1].texts
    assert all(len(model.tokenizer(t)["input_ids"]) > 0 for t in fast[-1].texts)
    # fused CFG, and the commit pass folded into the next block's first step: one DiT call
    # per step (after the one prefix call), whatever the guidance
    blocks = len(fast)
    assert fast[-1].nfe == 1 + blocks * gen.steps


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_rows_match_single_prompts(model, temperature):
    """Every row draws its noise and its tokens from its own seed: a row of a batch gives what
    the prompt gives alone with that seed, whatever its batch mates."""
    engine = TextGenerator(model)
    gen = GenerationConfig(max_new_tokens=8, steps=2, guidance=2.0, temperature=temperature,
                           seed=1)
    batched = list(engine.stream(PROMPTS, gen))
    assert batched[-1].texts == engine.generate(PROMPTS, gen, use_cache=False)
    for r, p in enumerate(PROMPTS):
        solo = list(engine.stream([p], gen))
        assert engine.generate(p, gen) == batched[-1].texts[r] != ""
        for s, b in zip(solo, batched):  # the same noise: the same latents (fp32 rounding)
            assert s.new_ids[0] == b.new_ids[r]
            assert (s.latents[0] - b.latents[r]).abs().max().item() <= 1e-5
    seeds = [7, 1, 3]  # one seed per row: row r equals its prompt alone with seeds[r]
    mixed = engine.generate(PROMPTS, gen, seeds=seeds)
    assert mixed[1] == batched[-1].texts[1]
    for r, p in enumerate(PROMPTS):
        assert mixed[r] == engine.generate(p, dataclasses.replace(gen, seed=seeds[r]))
    with pytest.raises(ValueError, match="2 seeds for 3 rows"):
        engine.generate(PROMPTS, gen, seeds=[1, 2])


def test_seed_changes_output_and_is_reproducible(model):
    engine = TextGenerator(model)
    a = engine.generate(PROMPTS[0], GenerationConfig(max_new_tokens=8, steps=2, seed=0))
    b = engine.generate(PROMPTS[0], GenerationConfig(max_new_tokens=8, steps=2, seed=0))
    c = engine.generate(PROMPTS[0], GenerationConfig(max_new_tokens=8, steps=2, seed=1))
    assert a == b and a != c


def test_noise_scale_is_the_flow_temperature(model):
    """noise_scale is the std of each block's starting noise: at 0 every seed starts from the
    same point (the output no longer depends on the seed), in between the cached engine still
    equals the reference, and the latents differ from those of the full-noise flow."""
    engine = TextGenerator(model)
    gen = GenerationConfig(max_new_tokens=8, steps=2, guidance=2.0, noise_scale=0.0)
    zero = [list(engine.stream(PROMPTS, dataclasses.replace(gen, seed=s))) for s in (0, 1, 5)]
    for other in zero[1:]:
        assert other[-1].texts == zero[0][-1].texts
        for a, b in zip(zero[0], other):
            assert torch.equal(a.latents, b.latents)
    half = dataclasses.replace(gen, noise_scale=0.5, seed=3)
    fast, slow = list(engine.stream(PROMPTS, half)), list(engine.stream(PROMPTS, half, use_cache=False))
    for f, s in zip(fast, slow):
        assert f.new_ids == s.new_ids and (f.latents - s.latents).abs().max().item() <= 1e-4
    full = list(engine.stream(PROMPTS, dataclasses.replace(half, noise_scale=1.0)))
    assert (full[0].latents - fast[0].latents).abs().max() > 1e-2


def test_stops_at_eos_and_respects_budget(model):
    engine = TextGenerator(model)
    with torch.no_grad():
        old = model.vae.head.bias[model.tokenizer.eos_token_id].item()
        model.vae.head.bias[model.tokenizer.eos_token_id] = 50.0  # EOS everywhere
    try:
        out = list(engine.stream(PROMPTS, GenerationConfig(max_new_tokens=30, temperature=0.0)))
        assert len(out) == 1 and all(out[0].finished) and out[0].texts == ["", "", ""]
    finally:
        with torch.no_grad():
            model.vae.head.bias[model.tokenizer.eos_token_id] = old
    out = list(engine.stream(["Hello"], GenerationConfig(max_new_tokens=6, temperature=0.0)))
    assert sum(len(o.new_ids[0]) for o in out) == 6 and out[-1].finished == [True]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ignore_eos_gives_exactly_the_budget(model, temperature):
    """ignore_eos (fixed-length benchmarks, bench/genppl.py): where every token would be EOS,
    the budget is still filled, with the next most likely tokens, in the cached engine, the
    reference and the continuous batch alike."""
    from unified.continuous import TextBatch

    gen = GenerationConfig(max_new_tokens=10, temperature=temperature, ignore_eos=True, seed=2)
    with torch.no_grad():
        old = model.vae.head.bias[model.tokenizer.eos_token_id].item()
        model.vae.head.bias[model.tokenizer.eos_token_id] = 50.0  # EOS everywhere
    try:
        rows = {}
        for cache in (True, False):
            out = list(TextGenerator(model).stream(PROMPTS, gen, use_cache=cache))
            rows[cache] = [sum((o.new_ids[r] for o in out), []) for r in range(len(PROMPTS))]
            assert all(len(r) == 10 for r in rows[cache]) and all(out[-1].finished)
            assert not any(model.tokenizer.eos_token_id in r for r in rows[cache])
        assert rows[True] == rows[False]
        batch = TextBatch(model, gen)
        slot = batch.add(PROMPTS[0], 2, 10)
        while batch.step():
            pass
        assert slot.generated == rows[True][0]
        stopped = list(TextGenerator(model).stream(
            PROMPTS, dataclasses.replace(gen, ignore_eos=False)))
        assert all(r == [] for r in stopped[0].new_ids)  # without it, EOS ends every row
    finally:
        with torch.no_grad():
            model.vae.head.bias[model.tokenizer.eos_token_id] = old


@pytest.mark.parametrize("prompt,match", [("", "empty"), ("   ", "empty"),
                                          ("word " * 200, "too long")])
def test_bad_prompts_raise_clear_errors(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        TextGenerator(model).generate(prompt, GenerationConfig(max_new_tokens=8))


@pytest.mark.parametrize("kw", [{"steps": 0}, {"guidance": float("nan")}, {"top_p": 0.0},
                                {"temperature": -1.0}, {"method": "rk45"}, {"shift": 0.0},
                                {"noise_scale": -0.5}, {"noise_scale": float("inf")}])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        GenerationConfig(**kw)


def test_sample_tokens_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_tokens(logits, 1.0, 2, 1.0, g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_tokens(logits, 1.0, 0, 0.5, g)) for _ in range(200)}
    assert draws == {0}  # p(token 0) = 0.71 > 0.5 alone
    assert int(sample_tokens(logits, 0.0, 0, 1.0, g)) == 0


def test_short_prompts_get_an_unconditional_row_that_hides_the_pinned_prompt(model):
    """CFG drops the whole prompt of text-to-text, its pinned tail included, so a prompt
    shorter than a block still has an unconditional branch: every row gets one (fused into the
    same call), it equals the reference, and guidance changes the output."""
    engine = TextGenerator(model)
    rows = []
    real = model.prior.forward

    def spy(z, *a, **k):
        rows.append(z.shape[0])
        return real(z, *a, **k)

    gen = GenerationConfig(max_new_tokens=8, steps=2, guidance=3.0, seed=2)
    prompts = ["A", "Return the number of items", "B"]  # only row 1 has a whole prompt block
    model.prior.forward = spy
    try:
        fast = list(engine.stream(prompts, gen))
    finally:
        model.prior.forward = real
    assert set(rows) == {3 + 3}  # 3 conditional rows + 3 unconditional rows, every call
    slow = list(engine.stream(prompts, gen, use_cache=False))
    for f, s in zip(fast, slow):
        assert f.new_ids == s.new_ids and (f.latents - s.latents).abs().max() <= 1e-4
    plain = list(engine.stream(prompts, GenerationConfig(max_new_tokens=8, steps=2, seed=2)))
    assert (plain[0].latents[0] - fast[0].latents[0]).abs().max() > 1e-3  # guidance acts


def test_bf16_weights_generate_like_fp32(model):
    """A bf16 copy of the model (no autocast) takes the engine's fp32 noise and times."""
    import copy

    gen = GenerationConfig(max_new_tokens=8, steps=3, guidance=2.0, seed=1)
    ref = list(TextGenerator(model).stream(PROMPTS, gen))
    half = copy.deepcopy(model).to(torch.bfloat16)
    out = list(TextGenerator(half).stream(PROMPTS, gen))
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.latents.dtype == torch.float32  # the ODE state stays fp32
        assert (o.latents - r.latents).abs().max() <= 0.05 * r.latents.abs().max()


def test_take_tokens_skips_pins_stops_at_eos_and_room():
    from unified.generate import take_tokens

    eos = 9
    assert take_tokens([5, 6, 7, 8], [True, True, False, False], 10, eos) == ([7, 8], False)
    assert take_tokens([5, 9, 7], [False, False, False], 10, eos) == ([5], True)
    assert take_tokens([9, 7], [True, False], 10, eos) == ([7], False)  # a pinned EOS is prompt
    assert take_tokens([1, 2, 3], [False] * 3, 2, eos) == ([1, 2], False)
    assert take_tokens([1, 2], [False] * 2, 0, eos) == ([], False)
