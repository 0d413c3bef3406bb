"""Shared fixtures: a tiny unified model with random weights (text VAE, image VAE, two-modality
prior) on a tokenizer trained on shapes captions and stdlib prose."""

import os

import pytest
import torch

from tasks.shapes.world import caption, questions, scene_at
from unified.data.corpus import iter_stdlib_docstrings
from unified.layout import TextLayoutConfig, TimeConfig
from unified.model import ColaModel
from unified.data.shards import write_text_shards
from vaes.image_vae import set_latent_stats, small_image_vae
from vaes.text_vae import TextVAE
from vaes.tokenizer import train_tokenizer

# the demo tests start Gradio servers: no usage analytics from a test run (make test sets it too)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def shapes_texts(n=300):
    out = ["describe the image."]
    for i in range(n):
        s = scene_at(0, i, 3)
        out.append(caption(s))
        out.extend(f"{q} {a}" for q, a in questions(s))
    return out


def stdlib_shards(out, n: int, max_per_shard: int = 200) -> str:
    """The first n stdlib docstring records written as webdataset text shards in `out`."""
    write_text_shards([r for _, r in zip(range(n), iter_stdlib_docstrings())], out,
                      max_per_shard=max_per_shard)
    return str(out)


def perturbed_(module, scale=0.2, seed=0):
    """Move a freshly initialized module off its zero-init (AdaLN-zero, zero output
    projections), so fast and slow paths are compared on non-trivial outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


@pytest.fixture(scope="session")
def unified_tokenizer():
    docs = [t for _, (_, t) in zip(range(200), iter_stdlib_docstrings())]
    return train_tokenizer(docs + shapes_texts(), vocab_size=400)


def make_tiny_unified(tokenizer, seed=0) -> ColaModel:
    from prior.dit import DiT

    torch.manual_seed(seed)
    vae = TextVAE(vocab_size=len(tokenizer), latent_dim=8, width=32, enc_layers=1, dec_layers=1,
                  heads=2, max_len=64)
    vae.set_latent_stats(torch.full((8,), 0.1), torch.full((8,), 0.5))
    image_vae = small_image_vae(latent_channels=4, widths=(8, 16, 16))
    set_latent_stats(image_vae, torch.zeros(4), torch.ones(4))
    dit = perturbed_(DiT(modalities={"text": 8, "image": 16}, width=32, depth=2, heads=2,
                         rope_axes=2, attn_backend="sdpa"), seed=seed)
    with torch.no_grad():  # keep EOS unlikely so several blocks get generated
        vae.head.bias[tokenizer.eos_token_id] = -20.0
    return ColaModel(vae, dit, tokenizer, TextLayoutConfig(block_size=4), image_vae,
                     image_patch_size=2, image_time=TimeConfig(0.0, 1.0)).eval()


@pytest.fixture(scope="session")
def tiny_unified(unified_tokenizer):
    return make_tiny_unified(unified_tokenizer)


@pytest.fixture(scope="session")
def tiny_unified_checkpoint(tiny_unified, tmp_path_factory):
    """The tiny unified model saved as a model folder (for the CLI and the demo server)."""
    folder = tmp_path_factory.mktemp("tiny-unified")
    tiny_unified.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_only_checkpoint(unified_tokenizer, tmp_path_factory):
    """A tiny text-only model folder (no image VAE, a text-only prior), like the old bundled
    checkpoint: the demo and the CLI must say that it cannot see images."""
    from prior.dit import DiT

    torch.manual_seed(0)
    tok = unified_tokenizer
    vae = TextVAE(vocab_size=len(tok), latent_dim=8, width=32, enc_layers=1, dec_layers=1,
                  heads=2, max_len=64)
    vae.set_latent_stats(torch.zeros(8), torch.ones(8))
    dit = DiT(modalities={"text": 8}, width=32, depth=1, heads=2, attn_backend="sdpa")
    folder = tmp_path_factory.mktemp("tiny-text-only")
    ColaModel(vae, dit, tok, TextLayoutConfig(block_size=4)).eval().save_pretrained(folder)
    return folder
