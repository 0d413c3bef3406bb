"""Model folders are read from config.json + safetensors only: pickled weights are refused
before anything is read (never unpickled), and a broken file is one line naming it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from unified.apps.cli import main
from unified.apps.pipeline import UnifiedPipeline
from unified.model import ColaModel
from vaes.image_vae import load_image_vae, small_image_vae
from vaes.weights import ModelFileError


class _Trap:
    """Unpickling this creates the folder `marker`: proof that a file was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def trap_bin(path: Path, marker: Path) -> Path:
    torch.save({"weight": _Trap(str(marker))}, path)
    return path


def test_the_trap_is_live(tmp_path):
    """The pickles below do run code when unpickled (so 'not unpickled' is checked)."""
    marker = tmp_path / "unpickled"
    trap_bin(tmp_path / "w.bin", marker)
    torch.load(tmp_path / "w.bin", weights_only=False)
    assert marker.is_dir()


@pytest.fixture
def bin_only(tiny_unified_checkpoint, tmp_path) -> tuple[Path, Path, Path]:
    """The tiny model with its prior's weights replaced by a pickled .bin."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_unified_checkpoint, folder)
    (folder / "prior" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    return folder, trap_bin(folder / "prior" / "diffusion_pytorch_model.bin", marker), marker


def test_a_bin_only_part_is_refused_and_never_unpickled(bin_only, capsys):
    folder, weights, marker = bin_only
    for load in (ColaModel.from_pretrained, UnifiedPipeline.from_pretrained):
        with pytest.raises(ModelFileError, match="pickled weights are never loaded") as err:
            load(folder)
        assert str(weights) in str(err.value)
    assert main(["generate", "hello", "--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cola generate: error: ") and str(weights) in err
    assert len(err.splitlines()) == 1
    assert not marker.exists(), "the .bin was unpickled"


def test_a_bin_beside_safetensors_is_ignored(tiny_unified_checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_unified_checkpoint, folder)
    marker = tmp_path / "unpickled"
    trap_bin(folder / "prior" / "diffusion_pytorch_model.bin", marker)
    model = ColaModel.from_pretrained(folder)
    assert model.prior is not None and not marker.exists()


def test_a_diffusers_vae_saved_as_bin_is_refused(tmp_path):
    vae = small_image_vae(widths=(8, 16, 16))
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ModelFileError, match=r"vae/diffusion_pytorch_model\.bin: pickled"):
        load_image_vae(tmp_path / "vae")
    vae.save_pretrained(tmp_path / "vae")  # safetensors: loads
    assert load_image_vae(tmp_path / "vae").config.latent_channels == vae.config.latent_channels


def test_a_baseline_saved_as_bin_is_refused(unified_tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    from unified.baselines import ARModel, llama_config, load_model

    tok = unified_tokenizer
    net = LlamaForCausalLM(llama_config(len(tok), 32, 1, 2, 64, tok, max_len=64))
    ARModel(net, tok).save_pretrained(tmp_path / "ar")
    assert load_model(tmp_path / "ar").kind == "ar"
    (tmp_path / "ar" / "net" / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    trap_bin(tmp_path / "ar" / "net" / "pytorch_model.bin", marker)
    with pytest.raises(ModelFileError, match=r"net/pytorch_model\.bin: pickled"):
        load_model(tmp_path / "ar")
    assert not marker.exists()
