"""A pretrained image VAE (image.pretrained, a local diffusers folder) is referred to by the
training checkpoints, not copied into each; it is honoured in stage 2 (or refused with a
clear message); the final and exported folders hold every weight. An existing Hugging Face
tokenizer folder (vae.tokenizer) is adopted, its special tokens found by name or added."""

import json
import shutil

import pytest
import torch
from conftest import shapes_texts, stdlib_shards
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tasks import TaskMixture
from tasks.shapes.world import make_shapes_shards
from unified.apps.cli import main
from unified.config import load_preset
from unified.model import ColaModel
from unified.training.trainer import Trainer
from vaes.image_vae import load_image_vae, small_image_vae
from vaes.tokenizer import adopt_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained-data")
    stdlib_shards(root / "text", 100, max_per_shard=50)
    make_shapes_shards(root / "shapes", n_train=100, n_heldout=0, difficulty=2,
                       max_per_shard=50)
    torch.manual_seed(0)
    small_image_vae(widths=(8, 16, 16)).save_pretrained(root / "vae")
    return root


def cfg(data, *extra):
    return load_preset("shapes-tiny", [
        f'data.train="{data / "text"}"', f'data.pairs="{data / "shapes" / "train"}"',
        f'image.pretrained="{data / "vae"}"', *extra])


def run(c, stage, out, **kw):
    return Trainer(c, stage, out, tasks=TaskMixture(c), **kw)


def vae_weights(folder):
    return {k: v for k, v in load_image_vae(folder).state_dict().items()}


def test_checkpoints_refer_to_the_pretrained_vae_and_final_holds_it(data, tmp_path):
    c = cfg(data, "stage1.steps=3", "stage1.ckpt_every=2", "stage1.keep=5")
    t = run(c, 1, tmp_path / "s1")
    t.train()
    assert not t.model.image_vae_trainable
    ckpt = tmp_path / "s1" / "checkpoints" / "step-00000002" / "model" / "image_vae"
    assert (ckpt / "weights.json").is_file() and not list(ckpt.glob("*.safetensors"))
    ref = json.loads((ckpt / "weights.json").read_text())
    assert ref["folder"] == str((data / "vae").resolve())
    final = tmp_path / "s1" / "final" / "image_vae"
    assert list(final.glob("*.safetensors")) and not (final / "weights.json").exists()
    want = vae_weights(data / "vae")
    got = ColaModel.from_pretrained(ckpt.parent).image_vae.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the pretrained folder moved: the checkpoint says where it looked; final/ still loads
    moved = data.parent / "vae-moved"
    shutil.move(str(data / "vae"), str(moved))
    try:
        with pytest.raises(FileNotFoundError, match="image.pretrained"):
            ColaModel.from_pretrained(ckpt.parent)
        ColaModel.from_pretrained(tmp_path / "s1" / "final")
    finally:
        shutil.move(str(moved), str(data / "vae"))


def test_stage2_honours_image_pretrained_resumes_and_exports_whole(data, tmp_path):
    s1 = cfg(data, "stage1.steps=2", "stage1.ckpt_every=1000", 'image.pretrained=""')
    run(s1, 1, tmp_path / "s1").train()  # stage 1 trains its own small image VAE
    c = cfg(data, "stage2.steps=4", "stage2.ckpt_every=2", "stage2.log_every=1")
    full = run(c, 2, tmp_path / "a", init=tmp_path / "s1" / "final").train()
    b = run(c, 2, tmp_path / "b", init=tmp_path / "s1" / "final")
    b.train(max_steps=3)
    resumed = run(c, 2, tmp_path / "b", init=tmp_path / "s1" / "final")
    assert resumed.step == 2
    rest = resumed.train()
    assert [h["loss"] for h in rest] == pytest.approx([h["loss"] for h in full[2:]], rel=1e-5)
    want = vae_weights(data / "vae")
    final = ColaModel.from_pretrained(tmp_path / "a" / "final")
    assert all(torch.equal(final.image_vae.state_dict()[k], want[k]) for k in want)
    assert final.image_vae.config.latents_mean is not None  # measured in stage 2
    ckpt = tmp_path / "b" / "checkpoints" / "step-00000004"
    assert (ckpt / "model" / "image_vae" / "weights.json").is_file()
    assert main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    exported = tmp_path / "export" / "image_vae"
    assert list(exported.glob("*.safetensors")) and not (exported / "weights.json").exists()
    # a pretrained VAE whose tokens the prior of --init cannot read is refused
    torch.manual_seed(1)
    small_image_vae(latent_channels=8, widths=(8, 16, 16)).save_pretrained(tmp_path / "vae8")
    bad = cfg(data, f'image.pretrained="{tmp_path / "vae8"}"')
    with pytest.raises(ValueError, match="image tokens of 32 values.*reads 16"):
        run(bad, 2, tmp_path / "c", init=tmp_path / "a" / "final")


def test_an_existing_tokenizer_folder_is_adopted(data, tmp_path, caplog):
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(shapes_texts(100), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tok")
    tok, added = adopt_tokenizer(tmp_path / "tok")
    assert added == ["<pad>", "<mask>"] and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id}) == 4
    c = cfg(data, f'vae.tokenizer="{tmp_path / "tok"}"', 'image.pretrained=""',
            "stage1.steps=2", "stage1.ckpt_every=1000")
    with caplog.at_level("INFO", logger="cola.train"):
        t = run(c, 1, tmp_path / "run")
    assert any("added the special tokens" in r.getMessage() for r in caplog.records)
    t.train()
    model = ColaModel.from_pretrained(tmp_path / "run" / "final")
    assert model.vae.config.vocab_size == len(model.tokenizer) == len(tok)
    saved = load_tokenizer(tmp_path / "run" / "final" / "tokenizer")
    assert saved.encode("a red circle", add_special_tokens=False) == tok.encode(
        "a red circle", add_special_tokens=False)
    # GPT-2 style: one <|endoftext|> for bos and eos -> eos keeps it, bos is added
    gpt = Tokenizer(models.BPE())
    gpt.train_from_iterator(shapes_texts(20), trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|endoftext|>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=gpt, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(tmp_path / "gpt")
    tok, added = adopt_tokenizer(tmp_path / "gpt")
    assert tok.eos_token == "<|endoftext|>" and added == ["<bos>", "<pad>", "<mask>"]
