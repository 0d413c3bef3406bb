"""The unified model through the trainer: both VAEs in stage 1, the task mixture in stage 2,
exact resume with image-text samples, the task mixture's ratios, batches of task samples."""

import random

import pytest
import torch
from conftest import stdlib_shards

from tasks import TaskMixture, image_to_text, text_to_image
from tasks.shapes.world import make_shapes_shards
from unified.config import load_preset
from unified.data.streams import SkipCounter, TaskSample, collate_task_samples, pack_pieces
from unified.model import ColaModel
from unified.apps.pipeline import UnifiedPipeline
from unified.training.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified-data")
    stdlib_shards(root / "text", 200, max_per_shard=100)
    make_shapes_shards(root / "shapes", n_train=300, n_heldout=20, difficulty=2,
                       max_per_shard=150)
    return root


def cfg(data, *extra):
    return load_preset("shapes-tiny", [f'data.train="{data / "text"}"',
                                       f'data.pairs="{data / "shapes" / "train"}"', *extra])


def trainer(c, stage, out, **kw):
    return Trainer(c, stage, out, tasks=TaskMixture(c), **kw)


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("u-s1")
    t = trainer(cfg(data), 1, out)
    before = {k: v.clone() for k, v in t.model.image_vae.state_dict().items()}
    hist = t.train()
    after = t.model.image_vae.state_dict()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    return out, hist, changed / len(before)


def losses(hist):
    return [h["loss"] for h in hist]


def test_stage1_trains_both_vaes_and_resumes_exactly(data, stage1, tmp_path):
    out, full, changed = stage1
    assert changed > 0.5  # the image VAE trains in stage 1
    assert all("image_l1" in h and "recon" in h for h in full)
    first = trainer(cfg(data), 1, tmp_path).train(max_steps=8)  # checkpoint at 6
    resumed = trainer(cfg(data), 1, tmp_path)
    assert resumed.step == 6
    rest = resumed.train()
    assert losses(first)[:6] == pytest.approx(losses(full)[:6], rel=1e-6)
    assert losses(rest) == pytest.approx(losses(full)[6:], rel=1e-6)
    model = ColaModel.from_pretrained(out / "final")
    assert model.image_vae is not None and model.prior is None


def test_stage2_trains_every_task_freezes_the_image_vae_and_resumes(data, stage1, tmp_path):
    init = stage1[0] / "final"
    c = cfg(data, "stage2.ema_decay=0.9")
    a = trainer(c, 2, tmp_path / "a", init=init)
    assert a.model.image_vae.config.latents_mean is not None  # measured at the start
    img_before = {k: v.clone() for k, v in a.model.image_vae.state_dict().items()}
    full = a.train()
    assert all(torch.equal(v, a.model.image_vae.state_dict()[k]) for k, v in img_before.items())
    seen = {k for h in full for k in h if k.startswith("fm_")}
    assert seen == {"fm_text_to_text", "fm_image_to_text", "fm_text_to_image"}
    logged = [h for h in full if "tokens_per_s" in h]
    assert logged and all(h["images_per_s"] > 0 and h["tokens_per_s"] > 0 for h in logged)
    b = trainer(c, 2, tmp_path / "b", init=init)
    first = b.train(max_steps=7)
    rest = trainer(c, 2, tmp_path / "b", init=init).train()
    assert losses(first)[:6] == pytest.approx(losses(full)[:6], rel=1e-5)
    assert losses(rest) == pytest.approx(losses(full)[6:], rel=1e-5)
    # the exported model is the EMA prior, with both VAEs; the pipeline loads the folder
    final = ColaModel.from_pretrained(tmp_path / "a" / "final")
    ema = a.ema.module.state_dict()
    assert all(torch.equal(v, ema[k].float()) for k, v in final.prior.state_dict().items())
    pipe = UnifiedPipeline.from_pretrained(tmp_path / "a" / "final")
    assert pipe.can_see_images
    out = pipe.text_to_image("a large red circle at the top left", steps=2)
    assert out.images[0].size == (32, 32) and out.nfe == 3


def test_task_mixture_holds_ratios_and_replays(data, unified_tokenizer):
    c = cfg(data, "tasks.ratios.image_to_text=0.3", "tasks.ratios.text_to_image=0.7",
            "tasks.question_prob=0.5", "tasks.caption_prefix_prob=0.25")
    mix = TaskMixture(c)
    skips = SkipCounter()
    n = 3000
    samples = [s for _, s in zip(range(n), mix.samples(unified_tokenizer, seed=3, skips=skips))]
    share = sum(s.task == "image_to_text" for s in samples) / n
    assert abs(share - 0.3) < 0.03, share
    i2t = [s for s in samples if s.task == "image_to_text"]
    instr = unified_tokenizer.decode(i2t[0].texts[0][1:-1]) if i2t else ""
    asked = sum(unified_tokenizer.decode(s.texts[0][1:-1]) != image_to_text.INSTRUCTION
                for s in i2t) / len(i2t)
    assert abs(asked - 0.5) < 0.06, (asked, instr)
    prefixed = sum(s.recipe[-1].prompt > 1 for s in i2t) / len(i2t)
    assert 0.15 < prefixed < 0.3, prefixed
    assert all(s.recipe == text_to_image.RECIPE for s in samples if s.task == "text_to_image")
    again = [s for _, s in zip(range(50), mix.samples(unified_tokenizer, seed=3))]
    assert [(s.task, s.texts) for s in again] == [(s.task, s.texts) for s in samples[:50]]
    assert skips.total == 0


def test_pack_pieces_and_collate_reindex(unified_tokenizer):
    rows, index = pack_pieces([[1, 5, 2], [1, 6, 7, 8, 2], [1, 2], [1, 9, 9, 9, 9, 2]], 8, 0)
    assert rows["input_ids"].shape == (2, 8)  # 3 + 5 | 2 + 6
    for piece, (r, s, n) in zip([[1, 5, 2], [1, 6, 7, 8, 2], [1, 2], [1, 9, 9, 9, 9, 2]],
                                index.tolist()):
        assert rows["input_ids"][r, s:s + n].tolist() == piece
        assert rows["positions"][r, s:s + n].tolist() == list(range(n))
        assert len(set(rows["sample_ids"][r, s:s + n].tolist())) == 1
    with pytest.raises(ValueError, match="does not fit"):
        pack_pieces([[1] * 9], 8, 0)
    img = torch.zeros(3, 32, 32)
    a = TaskSample("text_to_image", [[1, 4, 2]], [img], text_to_image.RECIPE, 0.1)
    b = TaskSample("image_to_text", [[1, 5, 2], [1, 6, 7, 2]], [img + 1],
                   image_to_text.recipe(1), 0.0)
    batch = collate_task_samples([a, b, a], seq_len=16, pad_id=0)
    assert batch["images"].shape == (3, 3, 32, 32) and batch["tasks"][1] == "image_to_text"
    srcs = [[s.source for s in r] for r in batch["recipes"]]
    assert srcs == [[0, 0], [1, 1, 2], [3, 2]]  # texts and images indexed batch-wide
    assert batch["images"][1].max() == 1 and batch["cond_drop"] == [0.1, 0.0, 0.1]


def test_training_text_pieces_fit_and_answers_fill_whole_blocks(unified_tokenizer, data):
    """Every piece is [bos] ... [eos]; a generated answer is padded after its EOS to whole
    blocks, as generation fills them (block_size 4 in the tiny preset)."""
    tok = unified_tokenizer
    mix = TaskMixture(cfg(data, "tasks.question_prob=0.5"))
    for smp in [s for _, s in zip(range(40), mix.samples(tok, seed=random.Random(0).randrange(9)))]:
        for i, ids in enumerate(smp.texts):
            assert ids[0] == tok.bos_token_id and len(ids) <= 48
            end = ids.index(tok.eos_token_id)
            assert set(ids[end + 1:]) <= {tok.pad_token_id}
            answer = smp.task == "image_to_text" and i == 1
            assert (len(ids) % 4 == 0) if answer else (end == len(ids) - 1)
