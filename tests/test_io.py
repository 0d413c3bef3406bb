"""Save / load as config.json + safetensors folders (DESIGN §5): TextVAE, DiT, ColaModel; DiT init."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from prior.attention import TokenMeta, block_causal_mask, ensure_nonempty_rows
from prior.dit import DiT
from unified.data.corpus import iter_stdlib_docstrings
from unified.layout import TextLayoutConfig
from unified.model import MODEL_INDEX, ColaModel
from vaes.text_vae import TextVAE
from vaes.tokenizer import train_tokenizer

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def tiny_vae(vocab: int = 64) -> TextVAE:
    return TextVAE(vocab_size=vocab, width=32, enc_layers=1, dec_layers=1, heads=2, latent_dim=8,
                   max_len=16)


def tiny_dit(modalities=None) -> DiT:
    return DiT(modalities=modalities or {"text": 8}, width=32, depth=2, heads=2)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Make every parameter non-trivial (DiT starts with zero output: a weak test otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def public_config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_safetensors_folder(folder) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in files)
    bad = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert not bad, f"pickle-style weight files: {bad}"


def vae_inputs(vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 16), generator=g)
    sample = torch.tensor([[0] * 9 + [1] * 7, [0] * 12 + [-1] * 4])
    pos = torch.tensor([list(range(9)) + list(range(7)), list(range(12)) + [0] * 4])
    return ids, sample, pos


def dit_inputs(d: int = 8, seed: int = 0, n_modalities: int = 1):
    g = torch.Generator().manual_seed(seed)
    b, n = 2, 10
    z = torch.randn(b, n, d, generator=g)
    t = torch.rand(b, n, generator=g)
    modality = torch.randint(0, n_modalities, (b, n), generator=g)
    positions = torch.arange(n).expand(b, n)
    meta = TokenMeta(torch.zeros(b, n, dtype=torch.long), torch.arange(n).expand(b, n) // 3,
                     torch.rand(b, n, generator=g) < 0.5)
    mask = ensure_nonempty_rows(block_causal_mask(meta, meta))
    return z, t, modality, positions, mask


# ----------------------------------------------------------------------------- TextVAE


def test_text_vae_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    randomize_(vae, 1)
    vae.save_pretrained(tmp_path / "vae")
    assert_safetensors_folder(tmp_path / "vae")
    loaded = TextVAE.from_pretrained(tmp_path / "vae", low_cpu_mem_usage=False).eval()
    assert type(loaded) is TextVAE
    assert_same_state(vae, loaded)
    assert public_config(vae) == public_config(loaded)
    ids, sample, pos = vae_inputs()
    with torch.no_grad():
        m1, lv1 = vae.encode(ids, sample, pos)
        m2, lv2 = loaded.encode(ids, sample, pos)
        assert torch.equal(m1, m2) and torch.equal(lv1, lv2)
        l1, _ = vae.decode(m1, sample, pos)
        l2, _ = loaded.decode(m1, sample, pos)
    assert l1.shape == (2, 16, 64)
    assert torch.equal(l1, l2)


def test_text_vae_latent_stats_round_trip(tmp_path):
    vae = tiny_vae()
    assert not vae.has_latent_stats
    g = torch.Generator().manual_seed(3)
    shift = torch.randn(8, generator=g)
    scale = torch.rand(8, generator=g) + 0.5
    vae.set_latent_stats(shift, scale)
    assert vae.has_latent_stats
    z = torch.randn(2, 5, 8, generator=g)
    torch.testing.assert_close(vae.normalize(z), (z - shift) / scale)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vae.normalize(vae.denormalize(z)), z, atol=1e-6, rtol=1e-6)

    vae.save_pretrained(tmp_path / "vae")
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["latent_shift"] == pytest.approx(shift.tolist())
    loaded = TextVAE.from_pretrained(tmp_path / "vae", low_cpu_mem_usage=False)
    assert loaded.has_latent_stats
    assert torch.equal(loaded.shift, shift) and torch.equal(loaded.scale, scale)
    assert torch.equal(loaded.normalize(z), vae.normalize(z))
    assert torch.equal(loaded.denormalize(z), vae.denormalize(z))


# ----------------------------------------------------------------------------- DiT


def test_dit_round_trip(tmp_path):
    dit = tiny_dit().eval()
    dit.set_backend("reference")
    randomize_(dit, 2)
    dit.save_pretrained(tmp_path / "prior")
    assert_safetensors_folder(tmp_path / "prior")
    loaded = DiT.from_pretrained(tmp_path / "prior", low_cpu_mem_usage=False).eval()
    loaded.set_backend("reference")
    assert type(loaded) is DiT
    assert_same_state(dit, loaded)
    assert public_config(dit) == public_config(loaded)
    assert loaded.modality_names == ["text"] and loaded.latent_width == 8
    inputs = dit_inputs()
    with torch.no_grad():
        v1, v2 = dit(*inputs), loaded(*inputs)
    assert v1.shape == (2, 10, 8)
    assert v1.abs().sum() > 0, "randomized weights must give a non-zero velocity"
    assert torch.equal(v1, v2)


def test_two_modality_dit_round_trip_keeps_modality_ids(tmp_path):
    """Modality ids are positions in the modality list: a reload must not reorder them (the
    config is written with sorted keys; "image" sorts before "text")."""
    dit = tiny_dit({"text": 8, "image": 12}).eval()
    dit.set_backend("reference")
    randomize_(dit, 3)
    dit.save_pretrained(tmp_path / "prior")
    loaded = DiT.from_pretrained(tmp_path / "prior", low_cpu_mem_usage=False).eval()
    loaded.set_backend("reference")
    assert loaded.modality_names == ["text", "image"] and loaded.latent_width == 12
    inputs = dit_inputs(d=12, n_modalities=2)
    with torch.no_grad():
        assert torch.equal(dit(*inputs), loaded(*inputs))


def test_dit_zero_init_gives_zero_velocity():
    torch.manual_seed(0)
    for modalities in ({"text": 8}, {"text": 8, "image": 4}):
        dit = tiny_dit(modalities).eval()
        for lin in (dit.adaln[-1], dit.final_adaln[-1], *dit.out_proj.values()):
            assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
        for blk in dit.blocks:
            assert torch.count_nonzero(blk.mod_offset) == 0
        # the rest is initialized (not a model of zeros)
        assert dit.in_proj["text"].weight.abs().sum() > 0
        assert dit.blocks[0].attn.qkv.weight.abs().sum() > 0
        for seed in range(2):
            z, t, modality, positions, mask = dit_inputs(seed=seed, n_modalities=len(modalities))
            with torch.no_grad():
                v = dit(z * 10, t, modality, positions, mask)
            assert v.shape == (2, 10, 8)
            assert torch.count_nonzero(v) == 0


# ----------------------------------------------------------------------------- ColaModel


@pytest.fixture(scope="module")
def tok():
    docs = [text for _, text in itertools.islice(iter_stdlib_docstrings(), 300)]
    return train_tokenizer(docs, vocab_size=300)


def test_cola_model_round_trip(tmp_path, tok):
    vae = tiny_vae(len(tok))
    vae.set_latent_stats(torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))
    prior = tiny_dit()
    randomize_(prior, 5)
    model = ColaModel(vae, prior, tok, TextLayoutConfig(block_size=4))
    model.save_pretrained(tmp_path / "cola")
    root = tmp_path / "cola"
    assert (root / MODEL_INDEX).is_file()
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    for sub in ("text_vae", "prior"):
        assert_safetensors_folder(root / sub)
    bad = [p for p in root.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not bad

    loaded = ColaModel.from_pretrained(root)
    assert not loaded.training
    assert loaded.block_size == 4
    assert_same_state(model.vae, loaded.vae)
    assert_same_state(model.prior, loaded.prior)
    assert torch.equal(loaded.vae.shift, vae.shift) and torch.equal(loaded.vae.scale, vae.scale)
    assert public_config(loaded.vae) == public_config(vae)
    assert public_config(loaded.prior) == public_config(prior)
    text = "Return the number of items in the <mask> container, or None.\n  Tabs\tand ünïcode."
    assert loaded.tokenizer.encode(text) == tok.encode(text)
    assert len(loaded.tokenizer) == len(tok)
    assert loaded.tokenizer.decode(tok.encode(text, add_special_tokens=False)) == text
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.bos_token_id, loaded.tokenizer.eos_token_id,
            loaded.tokenizer.mask_token_id) == (0, 1, 2, 3)


def test_cola_model_without_prior_round_trip(tmp_path, tok):
    model = ColaModel(tiny_vae(len(tok)), None, tok)
    model.save_pretrained(tmp_path / "s1")
    assert not (tmp_path / "s1" / "prior").exists()
    loaded = ColaModel.from_pretrained(tmp_path / "s1")
    assert loaded.prior is None
    assert_same_state(model.vae, loaded.vae)


def test_cola_model_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ColaModel.from_pretrained(missing)
