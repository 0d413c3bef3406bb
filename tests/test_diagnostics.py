"""`cola eval diagnostics` (unified/apps/diagnostics.py): each diagnostic computes what it
claims, on a tiny random model whose prior depends on its history."""

import dataclasses

import pytest
import torch
from conftest import stdlib_shards

from tasks.text_to_text import evaluate_text_vae
from unified.apps import diagnostics as D
from unified.apps.cli import main
from unified.data.corpus import iter_stdlib_docstrings
from unified.data.streams import pack_batches


@pytest.fixture(scope="module")
def batches(tiny_unified):
    texts = [t for _, (_, t) in zip(range(12), iter_stdlib_docstrings())]
    return list(pack_batches(texts, tiny_unified.tokenizer, seq_len=64, batch_size=2,
                             drop_last=False))


@pytest.fixture(scope="module")
def layout(tiny_unified, batches):
    return D.eval_layout(tiny_unified, batches[0], torch.Generator().manual_seed(0))


def _edges(mask, lay, q_noisy: bool, k_noisy: bool, k_droppable=None):
    q = (lay.meta.noisy == q_noisy) & (lay.meta.sample >= 0)
    k = (lay.meta.noisy == k_noisy) & (lay.meta.sample >= 0)
    if k_droppable is not None:
        k &= lay.droppable == k_droppable
    return (mask & q[:, :, None] & k[:, None, :]).sum().item()


def test_hidden_mask_has_no_noisy_to_clean_edge_and_dropped_hides_only_the_condition(layout):
    vis, hid, drp = (D.history_mask(layout, v) for v in D.VARIANTS)
    assert layout.droppable.any() and layout.loss_mask.any()
    assert _edges(vis, layout, True, False) > 0  # the history is visible ...
    assert _edges(hid, layout, True, False) == 0  # ... and hidden
    assert _edges(hid, layout, True, True) == _edges(vis, layout, True, True)  # own block kept
    assert _edges(drp, layout, True, False, k_droppable=True) == 0
    assert _edges(drp, layout, True, False, k_droppable=False) == \
        _edges(vis, layout, True, False, k_droppable=False) > 0  # earlier N blocks stay
    with pytest.raises(ValueError, match="unknown variant"):
        D.history_mask(layout, "half")


def _row(lay, r: int, keep: torch.Tensor):
    """Row r of a layout restricted to the tokens `keep` (a batch of one)."""
    def cut(x):
        return x[r:r + 1][:, keep] if torch.is_tensor(x) and x.dim() >= 2 else x
    meta = dataclasses.replace(lay.meta, **{f.name: cut(getattr(lay.meta, f.name))
                                            for f in dataclasses.fields(lay.meta)})
    return dataclasses.replace(lay, meta=meta, **{f.name: cut(getattr(lay, f.name))
                                                  for f in dataclasses.fields(lay) if f.name != "meta"})


@torch.no_grad()
def test_hidden_and_dropped_equal_removing_those_tokens(tiny_unified, layout):
    """"hidden" computes exactly what the prior gives with no clean token in the sequence at
    all, "dropped" exactly what it gives without the condition blocks C."""
    m = tiny_unified
    for variant, removed in (("hidden", ~layout.meta.noisy), ("dropped", layout.droppable)):
        full = D.token_errors(m, layout, D.history_mask(layout, variant))
        for r in range(layout.z.shape[0]):
            keep = ~removed[r]
            sub = _row(layout, r, keep)
            alone = D.token_errors(m, sub, sub.attention_mask())
            loss = sub.loss_mask
            assert loss.any()
            torch.testing.assert_close(full[r:r + 1][:, keep][loss], alone[loss], atol=1e-5,
                                       rtol=1e-4)


def test_at_times_renoises_loss_tokens_in_the_bucket_only(layout):
    lay = D.at_times(layout, 0.25, 0.5, torch.Generator().manual_seed(1))
    n = layout.z.shape[1] // 2
    loss = lay.loss_mask[:, n:]
    t = lay.t[:, n:]
    assert ((t[loss] >= 0.25) & (t[loss] < 0.5)).all()
    assert torch.equal(lay.t[:, n:][~loss], layout.t[:, n:][~loss])  # pinned: t = 0, unchanged
    assert torch.equal(lay.z[:, :n], layout.z[:, :n]) and torch.equal(lay.target, layout.target)
    z0, eps = layout.z[:, :n], layout.target[:, n:] + layout.z[:, :n]
    expect = (1 - t[..., None]) * z0 + t[..., None] * eps
    torch.testing.assert_close(lay.z[:, n:][loss], expect[loss])
    # one time per (row, sample, block)
    key = lay.meta.sample[:, n:] * 1000 + lay.meta.block[:, n:]
    for r in range(key.shape[0]):
        for k in key[r][loss[r]].unique():
            assert t[r][loss[r] & (key[r] == k)].unique().numel() == 1


def test_history_gain_reports_every_bucket_and_the_history_matters(tiny_unified, batches):
    r = D.history_gain(tiny_unified, batches[:2], seed=3)
    assert [tuple(b) for b in r["buckets"]] == list(D.BUCKETS)
    assert all(n > 0 for n in r["tokens"]) and len(set(r["tokens"])) == 1
    for v in D.VARIANTS:
        assert len(r["loss"][v]) == 4 and all(x > 0 for x in r["loss"][v])
    assert all(abs(a - b) > 1e-4 for a, b in zip(r["loss"]["visible"], r["loss"]["hidden"]))
    assert r == D.history_gain(tiny_unified, batches[:2], seed=3)  # common random numbers


def test_overlap_metric_on_hand_made_strings():
    assert D.word_bigrams("The cat  sat") == {("the", "cat"), ("cat", "sat")}
    assert D.word_bigrams("one") == set()
    assert D.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3) and D.jaccard(set(), set()) == 1.0
    # A = {ab, bc}, B = {ab, bd}, C = {xy, yz}: J(A,B) = 1/3, the others 0
    assert D.mean_pairwise_overlap(["a b c", "a b d", "x y z"]) == pytest.approx(1 / 9)
    with pytest.raises(ValueError):
        D.mean_pairwise_overlap(["a b"])
    # a "model" that ignores its prompt: every prompt gets the seed's text
    texts = {0: "the cat sat down", 1: "a dog ran off"}
    r = D.prompt_sensitivity(lambda p, s: texts[s], ["p1", "p2", "p3"], [0, 1])
    assert r["across_prompts"] == 1.0 and r["across_seeds"] == 0.0 and r["ratio"] == float("inf")
    # one that follows it: each prompt's words, the seed only changes the last word
    r = D.prompt_sensitivity(lambda p, s: f"{p} is here {s}", ["red", "blue"], [0, 1, 2])
    # across prompts (one seed): {red is, is here, here 0} vs {blue is, is here, here 0}:
    # 2 shared of 4 -> 0.5; across seeds (one prompt): "red is", "is here" shared of 4 -> 0.5
    assert r["across_prompts"] == pytest.approx(0.5) and r["across_seeds"] == pytest.approx(0.5)
    assert r["ratio"] == pytest.approx(1.0) and r["words"] == 4
    assert r["distinct2"] == 1.0  # no text repeats a bigram
    assert D.distinct_bigrams("the the the the") == pytest.approx(1 / 3)
    assert D.distinct_bigrams("a b a b") == pytest.approx(2 / 3) and D.distinct_bigrams("a") == 1.0
    assert len(r["samples"]) == 6
    assert D.overlap_ratio(0.0, 0.0) != D.overlap_ratio(0.0, 0.0)  # nan


def test_latent_geometry_against_a_brute_force_count(tiny_unified, batches):
    r = D.latent_geometry(tiny_unified, batches[:1], max_latents=10_000)
    d = tiny_unified.vae.config.latent_dim
    assert len(r["posterior_std"]) == len(r["mean_spread"]) == len(r["snr"]) == d
    for a, b, c in zip(r["posterior_std"], r["mean_spread"], r["snr"]):
        assert c == pytest.approx(b / a, rel=1e-5)
    vae, b = tiny_unified.vae, batches[0]
    with torch.no_grad():
        mean, logvar = vae.encode(b["input_ids"], b["sample_ids"], b["positions"])
    real = b["sample_ids"] >= 0
    m, ids = vae.normalize(mean)[real], b["input_ids"][real]
    var = (logvar.exp()[real] / vae.scale.pow(2)).sum(1)
    assert r["latents"] == len(m)
    other = coll = 0
    for i in range(len(m)):
        dist = [(float((m[i] - m[j]).norm()), j) for j in range(len(m)) if j != i]
        other += ids[min(dist)[1]] != ids[i]
        diff = [x for x, j in dist if ids[j] != ids[i]]
        coll += bool(diff) and min(diff) < float(var[i].sqrt())
    assert r["nn_other_token"] == pytest.approx(other / len(m))
    assert r["collisions"] == pytest.approx(coll / len(m))


def test_decoder_robustness_matches_the_vae_evaluation(tiny_unified, tmp_path):
    shards = stdlib_shards(tmp_path, 12)
    from unified.data.streams import text_samples

    texts = list(text_samples(shards))
    batches = list(pack_batches(texts, tiny_unified.tokenizer, seq_len=64, batch_size=8,
                                drop_last=False))
    r = D.decoder_robustness(tiny_unified, batches, times=(0.0, 0.5))
    # the existing evaluation draws the same noise (seed 0, one draw per batch)
    ref = evaluate_text_vae(tiny_unified, shards, max_docs=12, noise_t=0.5)
    assert r["tokens"] == ref["tokens"] > 100
    assert r["accuracy"] == [pytest.approx(ref["token_accuracy"]),
                             pytest.approx(ref["token_accuracy_at_t0.5"])]


def test_cli_diagnostics_on_cola_and_on_a_baseline(tiny_unified_checkpoint, unified_tokenizer,
                                                   tmp_path, capsys):
    shards = stdlib_shards(tmp_path / "shards", 10)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The function returns\n\nOpen the file and\nA list of\n")
    md = tmp_path / "diag.md"
    code = main(["eval", "diagnostics", "--checkpoint", str(tiny_unified_checkpoint), "--data",
                 shards, "--max-docs", "6", "--seeds", "2", "--new-tokens", "4", "--steps", "2",
                 "--prompts", str(prompts), "--guidance-sweep", "1,3", "--steps-sweep", "1",
                 "--markdown", str(md)])
    assert code == 0
    text = md.read_text()
    for title in ("History gain", "Prompt sensitivity", "Latent geometry", "Decoder robustness",
                  "Effect of the CFG scale"):
        assert f"## {title}" in text
    for row in ("| [0, 0.25) |", "| [0.75, 1) |", "| guidance 1, 2 steps |",
                "| guidance 3, 2 steps |", "| guidance 2, 1 steps |", "| 0.05 | ", "| 7 |"):
        assert row in text
    assert "3 prompts x 2 seeds" in text and text in capsys.readouterr().out + "\n"
    assert f"--prompts {prompts} --seeds 2 --new-tokens 4 --steps 2" in text

    from unified.baselines import build_baseline
    from unified.config import load_preset

    cfg = load_preset("text-tiny", ['model.kind="ar"', "model.width=32", "model.depth=2",
                                    "model.heads=2", "model.intermediate=64"])
    build_baseline(cfg, unified_tokenizer).save_pretrained(tmp_path / "ar")
    assert main(["eval", "diagnostics", "--checkpoint", str(tmp_path / "ar"), "--seeds", "2",
                 "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "## Prompt sensitivity" in out and "temperature 1" in out
    assert "history, geometry, decoder, sweep: not defined for the ar baseline" in out
    assert main(["eval", "diagnostics", "--parts", "history,nope"]) == 2
    assert main(["eval", "diagnostics", "--checkpoint", str(tiny_unified_checkpoint),
                 "--seeds", "1"]) == 2
