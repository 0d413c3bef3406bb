"""Image VAE wrapper: a real diffusers AutoencoderKL, its stored normalization, patchify."""

import pytest
import torch

from vaes.image_vae import (
    decode,
    denormalize,
    encode,
    grid_positions,
    load_image_vae,
    measure_latent_stats,
    normalize,
    patchify,
    psnr,
    set_latent_stats,
    small_image_vae,
    unpatchify,
    vae_loss,
)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return small_image_vae(widths=(16, 32, 32)).eval()


def test_shapes_and_save_load_round_trip(vae, tmp_path):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = encode(vae, x)
        assert z.shape == (2, 4, 8, 8)
        set_latent_stats(vae, torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 1.0, 0.5, 1.5]))
        vae.save_pretrained(tmp_path / "vae")
        again = load_image_vae(tmp_path / "vae").eval()
        assert again.config.latents_mean == pytest.approx([0.1, -0.2, 0.3, 0.0])
        for (k, a), (_, b) in zip(vae.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), k
        assert torch.equal(encode(vae, x), encode(again, x))
        assert torch.equal(decode(vae, z), decode(again, z))
    assert sorted(p.suffix for p in (tmp_path / "vae").iterdir()) == [".json", ".safetensors"]


def test_normalization_uses_stored_stats_and_inverts(vae):
    set_latent_stats(vae, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 4.0, 4.0]))
    z = torch.randn(3, 4, 8, 8)
    zn = normalize(vae, z)
    assert torch.allclose(zn[:, 2], (z[:, 2] - 3.0) / 4.0)
    assert torch.allclose(denormalize(vae, zn), z, atol=1e-6)


def test_measured_stats_normalize_to_unit_scale(vae):
    torch.manual_seed(1)
    batches = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(3)]
    mean, std = measure_latent_stats(vae, batches)
    set_latent_stats(vae, mean, std)
    with torch.no_grad():
        z = torch.cat([vae.encode(b).latent_dist.sample() for b in batches])
    zn = normalize(vae, z)
    assert zn.mean(dim=(0, 2, 3)).abs().max() < 0.2
    assert (zn.std(dim=(0, 2, 3)) - 1).abs().max() < 0.2


def test_patchify_round_trip_and_positions():
    z = torch.randn(2, 4, 8, 8)
    t = patchify(z, 2)
    assert t.shape == (2, 16, 16)
    assert torch.equal(unpatchify(t, 2, 8, 8), z)
    assert torch.equal(t[0, 5], z[0, :, 2:4, 2:4].reshape(-1))  # row 1, col 1
    pos = grid_positions(4, 4)
    assert pos[5].tolist() == [1, 1] and pos.shape == (16, 2)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 4, 7, 8), 2)


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    vae = small_image_vae(widths=(16, 32, 32))
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    x = torch.zeros(4, 3, 32, 32)
    x[:, 0, 8:24, 8:24] = 1.0  # a red square
    x = x * 2 - 1
    first = None
    for _ in range(30):
        loss, _ = vae_loss(vae, x)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        assert psnr(x, x).min() > 90 and psnr(x, -x).max() < 10


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers VAE"):
        load_image_vae(tmp_path / "nothing")
