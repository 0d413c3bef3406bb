"""Baselines (unified/baselines.py): trained by the same trainer on the same data and tokenizer;
packing, KV-cached decoding and block-wise masked-diffusion sampling checked against slow
references; parameter counts matched to Cola's preset."""

import json

import pytest
import torch
from conftest import stdlib_shards

from unified.baselines import (
    ARModel,
    MDLMModel,
    bidirectional_mask,
    build_baseline,
    llama_params,
    load_model,
    matched_depth,
)
from unified.config import load_preset
from unified.data.corpus import iter_stdlib_docstrings
from unified.training.trainer import Trainer
from vaes.text_vae import causal_mask
from vaes.tokenizer import train_tokenizer

TINY_NET = ["model.width=32", "model.depth=2", "model.heads=2", "model.intermediate=64"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return stdlib_shards(tmp_path_factory.mktemp("shards"), 400)


@pytest.fixture(scope="module")
def tokenizer():
    docs = [t for _, (_, t) in zip(range(200), iter_stdlib_docstrings())]
    return train_tokenizer(docs, vocab_size=300)


def tiny(kind, tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = load_preset("text-tiny", [f'model.kind="{kind}"', *TINY_NET])
    return build_baseline(cfg, tokenizer).eval()


@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_trains_through_the_shared_trainer_and_round_trips(kind, shards, tmp_path):
    cfg = load_preset("text-tiny", [f'data.train="{shards}"', f'model.kind="{kind}"', *TINY_NET,
                                    "stage1.steps=60", "stage1.ckpt_every=30", "optim.lr=5e-3"])
    hist = Trainer(cfg, 1, tmp_path / "a").train()
    loss = [h["loss"] for h in hist]
    ce = [h["ce" if kind == "ar" else "masked_ce"] for h in hist]  # (MDLM's ELBO is noisier)
    assert sum(ce[-15:]) < 0.95 * sum(ce[:15])
    final = tmp_path / "a" / "final"
    assert json.loads((final / "baseline.json").read_text())["kind"] == kind
    assert (final / "net" / "model.safetensors").is_file()
    assert not list(final.rglob("*.bin")) and not list(final.rglob("*.pt"))  # never pickle
    model = load_model(final)
    assert isinstance(model, ARModel if kind == "ar" else MDLMModel)
    trainer = Trainer(cfg, 1, tmp_path / "a")  # a finished run resumes at its last step
    assert trainer.step == 60
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    # exact resume: the same loss sequence from the step-30 checkpoint
    Trainer(cfg, 1, tmp_path / "b").train(max_steps=33)
    rest = Trainer(cfg, 1, tmp_path / "b").train()
    assert [h["loss"] for h in rest] == pytest.approx(loss[30:], rel=1e-5)


def test_baselines_refuse_stage_two(shards, tmp_path):
    cfg = load_preset("text-tiny", [f'data.train="{shards}"', 'model.kind="ar"', *TINY_NET])
    with pytest.raises(ValueError, match="one stage"):
        Trainer(cfg, 2, tmp_path, init=tmp_path)


def test_packed_rows_equal_samples_alone(tokenizer):
    """The 4-D sample mask keeps packed samples apart (causal for AR, bidirectional for MDLM)."""
    ar = tiny("ar", tokenizer)
    ids = torch.randint(4, len(tokenizer), (1, 11))
    s = torch.tensor([[0] * 5 + [1] * 6])
    pos = torch.tensor([[*range(5), *range(6)]])
    for model, mask in ((ar, causal_mask(s, pos, s, pos)), (ar, bidirectional_mask(s))):
        with torch.no_grad():
            packed = model.logits(ids, mask, pos)
            for sl in (slice(0, 5), slice(5, 11)):
                alone = model.logits(ids[:, sl], mask[:, sl, sl], pos[:, sl])
                assert (packed[:, sl] - alone).abs().max() < 1e-4
                assert alone.abs().max() > 1e-3


def test_ar_kv_cached_greedy_equals_full_recompute(tokenizer):
    ar = tiny("ar", tokenizer, seed=1)
    prompts = [[1, 50, 60, 70], [1, 80], [1, 90, 91, 92, 93, 94]]
    fast = ar.generate_ids(prompts, 7, ignore_eos=True)  # batched, left-padded, KV cache
    for p, got in zip(prompts, fast):
        seq = list(p)
        with torch.no_grad():
            for _ in range(7):  # slow reference: re-run the whole sequence per token
                ids = torch.tensor([seq])
                s, pos = torch.zeros_like(ids), torch.arange(len(seq))[None]
                logits = ar.logits(ids, causal_mask(s, pos, s, pos), pos)[0, -1]
                logits[tokenizer.eos_token_id] = float("-inf")
                seq.append(int(logits.argmax()))
        assert got == seq[len(p):]
    sampled = ar.generate_ids(prompts, 7, temperature=1.0, seed=3)
    assert sampled == ar.generate_ids(prompts, 7, temperature=1.0, seed=3)


def test_judge_nll_matches_one_forward(tokenizer):
    ar = tiny("ar", tokenizer, seed=2)
    ctx, cont = [[1, 40, 41], [1, 42]], [[43, 44, 45], [46, 47, 48, 49]]
    batched = ar.nll(ctx, cont)
    for c, x, got in zip(ctx, cont, batched):
        row = torch.tensor([c + x])
        s, pos = torch.zeros_like(row), torch.arange(row.shape[1])[None]
        with torch.no_grad():
            logp = ar.logits(row, causal_mask(s, pos, s, pos), pos)[0].log_softmax(-1)
        want = torch.stack([-logp[len(c) - 1 + i, tok] for i, tok in enumerate(x)])
        assert got.shape == (len(x),) and torch.allclose(got, want, atol=1e-5)


def test_mdlm_semi_autoregressive_sampling(tokenizer):
    """Blocks are filled left to right, `steps` passes per block, each pass unmasking its share
    of the block; prompts are never touched; the output is reproducible."""
    mdlm = tiny("mdlm", tokenizer, seed=3)
    calls, canvases = [], []
    real = mdlm.logits

    def spy(ids, mask, pos):
        calls.append(1)
        canvases.append(ids.clone())
        return real(ids, mask, pos)

    mdlm.logits = spy
    prompts = [[1, 50, 51], [1, 52, 53, 54, 55]]
    out = mdlm.generate_ids(prompts, 10, block_size=4, steps=3, ignore_eos=True)
    assert len(calls) == 3 * 3  # ceil(10 / 4) blocks x 3 steps
    assert [len(r) for r in out] == [10, 10]
    mask_id = tokenizer.mask_token_id
    for r, p in enumerate(prompts):
        for k, canvas in enumerate(canvases):
            assert canvas[r, : len(p)].tolist() == p
            gen = canvas[r, len(p): len(p) + 12]
            block, step = divmod(k, 3)
            done = (gen[: 4 * block] != mask_id).all()  # earlier blocks are complete and fixed
            later = (gen[4 * (block + 1):] == mask_id).all()  # later blocks untouched
            unmasked = int((gen[4 * block: 4 * (block + 1)] != mask_id).sum())
            assert done and later and unmasked == [0, 2, 3][step]  # 4 tokens over 3 steps: 2,1,1
    mdlm.logits = real
    assert mdlm.generate_ids(prompts, 10, block_size=4, steps=3, temperature=1.0, seed=5) == \
        mdlm.generate_ids(prompts, 10, block_size=4, steps=3, temperature=1.0, seed=5)


def test_mdlm_loss_weights_masked_tokens_by_one_over_t(tokenizer, monkeypatch):
    """With t pinned, the loss is the masked tokens' CE / t per valid token."""
    mdlm = tiny("mdlm", tokenizer, seed=4)
    ids = torch.randint(4, len(tokenizer), (2, 16))
    batch = {"text": {"input_ids": ids, "sample_ids": torch.zeros_like(ids),
                      "positions": torch.arange(16).expand(2, 16)}}
    monkeypatch.setattr(MDLMModel, "t_min", 1.0)  # t = 1: every token masked, weight 1
    loss, logs = mdlm(batch, 1, None, torch.Generator().manual_seed(0))
    masked_in = torch.full_like(ids, tokenizer.mask_token_id)
    with torch.no_grad():
        logits = mdlm.logits(masked_in, bidirectional_mask(torch.zeros_like(ids)),
                             torch.arange(16).expand(2, 16))
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["masked_ce"].item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_presets_match_cola_text_default_within_10_percent(kind):
    from bench.model_size import sizes

    s = sizes("text-default")
    cola = (s["vae_M"] + s["prior_M"]) * 1e6
    m = load_preset(f"{kind}-default").model
    n = llama_params(4096, m.width, m.depth, m.intermediate)
    assert abs(n - cola) <= 0.1 * cola
    assert m.depth == matched_depth(int(cola), 4096, m.width, m.intermediate)
    with torch.device("meta"):  # the formula is the real count
        real = build_baseline(load_preset(f"{kind}-default"), train_tokenizer(["a b"] * 5, 4096))
    assert real.num_parameters() == llama_params(len(real.tokenizer), m.width, m.depth,
                                                 m.intermediate)


def test_generative_perplexity_and_unigram_entropy(tokenizer):
    import math

    from tasks.text_to_text import generative_perplexity, unigram_entropy

    assert unigram_entropy([7, 7, 7, 7]) == 0.0 and unigram_entropy([]) == 0.0
    assert unigram_entropy([5, 6, 5, 6]) == pytest.approx(math.log(2))
    ar = tiny("ar", tokenizer, seed=5)
    ctx, samples = [[1, 40], [1, 41], [1, 42]], [[43, 44, 45], [], [46]]
    m = generative_perplexity(ar, ctx, samples)
    nll = torch.cat(ar.nll([ctx[0], ctx[2]], [samples[0], samples[2]]))
    assert m["tokens"] == 4 and m["gen_ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert m["length"] == pytest.approx(4 / 3)


def test_genppl_bench_judges_every_contestant_at_fixed_length(tokenizer, shards, tmp_path,
                                                                monkeypatch):
    """bench/genppl.py end to end on tiny models: a separate judge, an AR, an MDLM and a Cola
    contestant sharing one tokenizer; with --ignore-eos every sample has exactly the budget."""
    import sys

    from conftest import perturbed_

    from bench import genppl
    from prior.dit import DiT
    from unified.layout import TextLayoutConfig
    from unified.model import ColaModel
    from vaes.text_vae import TextVAE

    tiny("ar", tokenizer, seed=1).save_pretrained(tmp_path / "judge")
    tiny("ar", tokenizer, seed=2).save_pretrained(tmp_path / "ar")
    tiny("mdlm", tokenizer, seed=3).save_pretrained(tmp_path / "mdlm")
    torch.manual_seed(4)
    vae = TextVAE(vocab_size=len(tokenizer), latent_dim=8, width=32, enc_layers=1, dec_layers=1,
                  heads=2, max_len=64)
    dit = perturbed_(DiT(modalities={"text": 8}, width=32, depth=1, heads=2, attn_backend="sdpa"))
    ColaModel(vae, dit, tokenizer, TextLayoutConfig(block_size=4)).save_pretrained(
        tmp_path / "cola")
    table = tmp_path / "table.md"
    monkeypatch.setattr(sys, "argv", [
        "genppl", "--judge", str(tmp_path / "judge"), "--judge-name", "big AR",
        "--model", "AR", str(tmp_path / "ar"), "--model", "MDLM", str(tmp_path / "mdlm"),
        "--model", "Cola", str(tmp_path / "cola"), "--data", shards, "-n", "5",
        "--prompt-tokens", "4", "--new-tokens", "6", "--ignore-eos", "--guidance", "1", "2",
        "--cola-steps", "2", "--mdlm-steps", "2", "--table", str(table)])
    genppl.main()
    rows = [r.split("|")[1:-1] for r in table.read_text().splitlines() if r.startswith("| ")]
    names = [r[0].strip() for r in rows[1:]]
    assert names == ["held-out text", "judge: big AR", "AR, T=1", "MDLM, T=1, 16/2",
                     "Cola, CFG 1, 2 steps", "Cola, CFG 2, 2 steps"]
    for r in rows[3:]:  # the contestants: fixed length, a finite perplexity under the judge
        assert float(r[-1]) == 6.0 and 1.0 < float(r[4]) < float("inf")
    assert rows[2][3].strip() and rows[3][3].strip()  # held-out PPL of the judge and the AR
    assert not rows[4][3].strip()  # an MDLM has no such likelihood
