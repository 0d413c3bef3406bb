"""The x0 cross-entropy lever (LossConfig.lambda_x0_ce): the token CE of the prior's clean
estimate z0_hat = z_t - t v, read by the Text VAE decoder with its weights detached."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_unified
from unified.config import LossConfig
from unified.layout import text_to_text_layout
from unified.model import ColaModel


def _model_and_batch(tokenizer):
    model = make_tiny_unified(tokenizer, seed=3).train()
    model.freeze_reference()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (2, 24), generator=g)
    sample_ids = torch.tensor([[0] * 14 + [1] * 10, [0] * 20 + [-1] * 4])
    positions = torch.stack([torch.cat([torch.arange(14), torch.arange(10)]),
                             torch.cat([torch.arange(20), torch.zeros(4, dtype=torch.long)])])
    ids[sample_ids < 0] = tokenizer.pad_token_id
    return model, {"text": {"input_ids": ids, "sample_ids": sample_ids, "positions": positions}}


def test_frozen_decode_equals_decode_and_passes_gradients_to_latents_only(unified_tokenizer):
    model, batch = _model_and_batch(unified_tokenizer)
    t = batch["text"]
    z = torch.randn(2, 24, 8, requires_grad=True)
    plain, _ = model.vae.decode(z, t["sample_ids"], t["positions"])
    frozen, _ = model.vae.decode(z, t["sample_ids"], t["positions"], frozen=True)
    torch.testing.assert_close(frozen, plain)
    frozen.logsumexp(-1).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vae.parameters())


def test_x0_ce_of_the_exact_velocity_is_the_decoders_ce_on_the_clean_latents(unified_tokenizer):
    # with the true velocity eps - z0, z0_hat = z_t - t v is z0 itself: the term must then be
    # the decoder's CE on the clean latents, over the layout's loss tokens only
    model, batch = _model_and_batch(unified_tokenizer)
    t = batch["text"]
    with torch.no_grad():
        mean, _ = model.vae.encode(t["input_ids"], t["sample_ids"], t["positions"])
        z0 = model.vae.normalize(mean)
        lay = text_to_text_layout(z0, t["sample_ids"], t["positions"], model.layout_cfg,
                                  torch.Generator().manual_seed(1))
        v = model.prior_in(lay.target)
        total, count = model._x0_ce(lay, v, t["input_ids"], t["sample_ids"], t["positions"])
        logits, _ = model.vae.decode(mean, t["sample_ids"], t["positions"])
        loss = lay.loss_mask[:, 24:]
        ce = F.cross_entropy(logits.flatten(0, 1), t["input_ids"].flatten(), reduction="none")
    assert count == loss.sum() > 0
    torch.testing.assert_close(total, (ce * loss.flatten()).sum(), rtol=1e-4, atol=1e-4)


def test_x0_ce_trains_the_prior_not_the_decoder_and_is_off_by_default(unified_tokenizer):
    model, batch = _model_and_batch(unified_tokenizer)
    assert "x0_ce" not in model.stage2_loss(batch, LossConfig())
    terms = model.stage2_loss(batch, LossConfig(lambda_x0_ce=1.0),
                              torch.Generator().manual_seed(0))
    (s, n) = terms["x0_ce"]
    assert n > 0 and torch.isfinite(s)
    (s / n).backward()
    assert sum(p.grad.abs().sum() for p in model.prior.parameters() if p.grad is not None) > 0
    for mod in (model.vae.from_latent, model.vae.decoder, model.vae.dec_norm, model.vae.head):
        assert all(p.grad is None for p in mod.parameters())
    # the combined stage-2 loss adds lambda times its mean, and logs it
    means = {k: v[0] / v[1] for k, v in terms.items() if v[1] > 0}
    loss0, _ = ColaModel.combine({k: v for k, v in means.items() if k != "x0_ce"}, 2,
                                 LossConfig())
    loss2, logs = ColaModel.combine(means, 2, LossConfig(lambda_x0_ce=2.0))
    torch.testing.assert_close(loss2, loss0 + 2.0 * means["x0_ce"])
    assert "x0_ce" in logs
    assert "x0_ce" in ColaModel.term_names(2, [], prose=True, image_trainable=False)
