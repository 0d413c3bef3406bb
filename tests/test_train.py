"""The two-stage trainer: exact resume, joint stage 2, non-finite guard."""

import json

import pytest
import torch
from conftest import stdlib_shards

from unified.config import load_preset
from unified.data.corpus import iter_stdlib_docstrings
from unified.data.shards import write_text_shards
from unified.model import ColaModel
from unified.training.trainer import Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return stdlib_shards(tmp_path_factory.mktemp("shards"), 600)


def tiny(shards, *extra):
    return load_preset("text-tiny", [f'data.train="{shards}"', *extra])


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    hist = Trainer(tiny(shards), 1, out).train()
    return out, hist


def losses(hist):
    return [h["loss"] for h in hist]


def test_stage1_resume_continues_the_same_loss_sequence(shards, stage1, tmp_path):
    _, full = stage1
    first = Trainer(tiny(shards), 1, tmp_path).train(max_steps=13)  # checkpoint at 10
    assert len(first) == 13
    resumed = Trainer(tiny(shards), 1, tmp_path)
    assert resumed.step == 10  # the newest complete checkpoint
    rest = resumed.train()
    assert losses(first)[:10] == pytest.approx(losses(full)[:10], rel=1e-6)
    assert losses(rest) == pytest.approx(losses(full)[10:], rel=1e-6)
    assert (tmp_path / "final" / "model_index.json").is_file()


def test_stage2_joint_training_resumes_exactly(shards, stage1, tmp_path):
    s1_out, _ = stage1
    init = s1_out / "final"
    a = Trainer(tiny(shards), 2, tmp_path / "a", init=init)
    vae_before = {k: v.clone() for k, v in a.model.vae.state_dict().items()}
    assert a.model.vae.has_latent_stats  # measured from data, stored in the config
    full = a.train()
    changed = [k for k, v in a.model.vae.state_dict().items() if not torch.equal(v, vae_before[k])]
    assert len(changed) > 0.5 * len(vae_before)  # the VAE is trained jointly
    assert all("ref_kl" in h and "fm" in h for h in full)
    assert full[-1]["ref_kl"] > 0  # the VAE moved away from the frozen reference
    assert not any(p.requires_grad for p in a.model.ref_vae.parameters())

    b = Trainer(tiny(shards, "stage2.ema_decay=0.9"), 2, tmp_path / "b", init=init)
    b.train(max_steps=12)
    resumed = Trainer(tiny(shards, "stage2.ema_decay=0.9"), 2, tmp_path / "b", init=init)
    rest = resumed.train()
    assert losses(rest) == pytest.approx(losses(full)[10:], rel=1e-5)  # EMA never feeds back
    # the exported prior is the EMA, restored exactly across the resume
    c = Trainer(tiny(shards, "stage2.ema_decay=0.9"), 2, tmp_path / "c", init=init)
    c.train()
    ema_b = ColaModel.from_pretrained(tmp_path / "b" / "final").prior.state_dict()
    ema_c = ColaModel.from_pretrained(tmp_path / "c" / "final").prior.state_dict()
    live = resumed.model.prior.state_dict()
    assert all(torch.allclose(ema_b[k], ema_c[k], rtol=1e-5, atol=1e-6) for k in ema_b)
    assert any(not torch.allclose(ema_b[k], live[k]) for k in ema_b)
    cfg = json.loads((tmp_path / "a" / "final" / "text_vae" / "config.json").read_text())
    assert len(cfg["latent_shift"]) == cfg["latent_dim"]


def test_stage2_flow_loss_falls(shards, stage1, tmp_path):
    init = stage1[0] / "final"
    hist = Trainer(tiny(shards, "stage2.steps=80", "stage2.ckpt_every=1000"), 2, tmp_path,
                   init=init).train()
    fm = [h["fm"] for h in hist]
    assert sum(fm[-10:]) / 10 < 0.8 * sum(fm[:10]) / 10


def test_non_finite_losses_are_skipped_then_stop(shards, tmp_path, monkeypatch):
    t = Trainer(tiny(shards, "stage1.max_bad_steps=3"), 1, tmp_path)
    t.train(max_steps=10)  # a good checkpoint at step 10
    real = t.model.stage1_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        terms = real(*a, **k)
        if calls["n"] in (2, 5, 6, 7):
            total, count = terms["recon"]
            terms["recon"] = (total * float("nan"), count)
        return terms

    monkeypatch.setattr(t.model, "stage1_loss", flaky)
    with pytest.raises(RuntimeError, match="non-finite") as err:
        t.train()
    assert "step-00000010" in str(err.value)
    assert t.step == 13  # steps 11, 12, 13 ran; the NaN batches were skipped, not applied
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_training_skips_and_counts_a_truncated_shard(tmp_path):
    data = tmp_path / "data"
    records = [r for _, r in zip(range(200), iter_stdlib_docstrings())]
    paths = write_text_shards(records, data, max_per_shard=5)
    for p in paths[::3]:  # cut every third shard mid-file
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2 + 100])
    t = Trainer(tiny(str(data), "stage1.steps=30", "stage1.log_every=30"), 1, tmp_path / "run")
    hist = t.train()
    assert len(hist) == 30 and all(h["loss"] == h["loss"] for h in hist)
    assert t.skipped >= 1
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["skipped"] == t.skipped


def test_patch_size_two_trains_both_stages(shards, tmp_path):
    """p = 2 tokens per latent: samples are padded to whole patches, no patch straddles two."""
    cfg = tiny(shards, "vae.patch_size=2", "stage1.steps=6", "stage2.steps=6")
    s1 = Trainer(cfg, 1, tmp_path / "s1").train()
    s2 = Trainer(cfg, 2, tmp_path / "s2", init=tmp_path / "s1" / "final").train()
    assert all(h["loss"] == h["loss"] for h in s1 + s2) and s2[-1]["fm"] > 0
    from unified.model import ColaModel

    model = ColaModel.from_pretrained(tmp_path / "s2" / "final")
    assert model.vae.config.patch_size == 2
    from tasks.text_to_text import evaluate_text_vae

    report = evaluate_text_vae(model, shards, max_docs=20, seq_len=32)
    assert 0.0 <= report["token_accuracy"] <= 1.0 and report["tokens"] > 100


def test_muon_optimizer_trains_and_resumes_exactly(shards, tmp_path):
    cfg = tiny(shards, 'optim.name="muon"', "stage1.steps=12", "stage1.ckpt_every=6")
    full = Trainer(cfg, 1, tmp_path / "a").train()
    assert type(Trainer(cfg, 1, tmp_path / "x").optimizer).__name__ == "Muon"
    assert all(h["loss"] == h["loss"] for h in full) and full[-1]["loss"] < full[0]["loss"]
    Trainer(cfg, 1, tmp_path / "b").train(max_steps=8)
    rest = Trainer(cfg, 1, tmp_path / "b").train()
    assert losses(rest) == pytest.approx(losses(full)[6:], rel=1e-5)


def test_compiled_prior_trains_like_eager(shards, stage1, tmp_path):
    """stage2.compile=true (DiT.compile_blocks with inductor) gives eager's loss sequence."""
    init = stage1[0] / "final"
    sets = ["stage2.steps=4", 'stage2.precision="fp32"', "stage2.ckpt_every=1000"]
    eager = Trainer(tiny(shards, *sets), 2, tmp_path / "eager", init=init).train()
    compiled = Trainer(tiny(shards, *sets, "stage2.compile=true"), 2, tmp_path / "compiled",
                       init=init)
    assert all(blk.compiled is not None for blk in compiled.model.prior.blocks)
    assert losses(compiled.train()) == pytest.approx(losses(eager), rel=1e-4)
    with pytest.raises(ValueError, match="stage 2"):
        Trainer(tiny(shards, "stage1.compile=true"), 1, tmp_path / "s1")


def test_compile_without_a_cpp_compiler_trains_eagerly(shards, stage1, tmp_path, monkeypatch,
                                                       caplog):
    monkeypatch.setattr("unified.training.trainer.shutil.which", lambda name: None)
    t = Trainer(tiny(shards, "stage2.compile=true"), 2, tmp_path, init=stage1[0] / "final")
    assert all(blk.compiled is None for blk in t.model.prior.blocks)
    assert "training eagerly" in caplog.text


def test_a_trainer_leaves_the_process_as_it_found_it(tmp_path):
    """Building a Trainer seeds only its own model init: the caller's global RNG goes on where
    it was (no torch.manual_seed leaking into the rest of the process)."""
    shards = stdlib_shards(tmp_path / "data", 40)
    cfg = load_preset("text-tiny", [f'data.train="{shards}"', "data.tokenizer_docs=40"])
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    Trainer(cfg, 1, tmp_path / "run")
    assert torch.equal(torch.rand(3), want)
