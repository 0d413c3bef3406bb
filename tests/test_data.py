"""Text data: stdlib corpus, shard writing, webdataset reading (incl. corrupt input), packing."""

from __future__ import annotations

import itertools
import json
import logging
import re
import tarfile

import pytest
import torch
import webdataset as wds

import unified.data.corpus as corpus_module
from unified.data.corpus import is_heldout, iter_stdlib_docstrings
from unified.data.streams import SkipCounter, expand_urls, pack_batches, text_batches, text_samples
from unified.data.shards import make_default_corpus_shards, read_text_inputs, write_text_shards
from vaes.tokenizer import encode_document, train_tokenizer


@pytest.fixture(scope="session")
def corpus() -> list[tuple[str, str]]:
    return list(iter_stdlib_docstrings())


@pytest.fixture(scope="session")
def tok(corpus):
    return train_tokenizer([text for _, text in corpus[:300]], vocab_size=1024)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_many_unique_prose_paragraphs(corpus, monkeypatch):
    assert len(corpus) > 1000
    keys = [k for k, _ in corpus]
    texts = [t for _, t in corpus]
    assert len(set(keys)) == len(keys)
    assert len(set(texts)) == len(texts)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)  # no dots, filename safe
    for text in texts:
        assert len(text) >= 80 and "\n" not in text and ">>>" not in text
        assert sum(c.isalpha() or c == " " for c in text) >= 0.75 * len(text)
    # Deterministic order: a fresh walk (bypassing the in-memory replay) gives the same start.
    monkeypatch.setattr(corpus_module, "_CACHE", {})
    assert list(itertools.islice(iter_stdlib_docstrings(), 50)) == corpus[:50]


def test_heldout_split(corpus):
    keys = [k for k, _ in corpus]
    held = [k for k in keys if is_heldout(k)]
    assert 0.01 * len(keys) <= len(held) <= 0.035 * len(keys)
    assert held == [k for k in keys if is_heldout(k)]  # deterministic
    assert not any(is_heldout(k, 0.0) for k in keys[:100])
    assert all(is_heldout(k, 1.0) for k in keys[:100])
    big = sum(is_heldout(k, 0.5) for k in keys)
    assert 0.45 * len(keys) < big < 0.55 * len(keys)


# ----------------------------------------------------------------------------- shards


def test_write_and_read_shards(corpus, tmp_path):
    records = corpus[:250]
    paths = write_text_shards(records, tmp_path / "out", prefix="doc", max_per_shard=100)
    assert [p.name for p in paths] == ["doc-000000.tar", "doc-000001.tar", "doc-000002.tar"]
    assert all(p.is_file() for p in paths)
    expected = [t for _, t in records]
    skips = SkipCounter()
    assert list(text_samples(tmp_path / "out", skips=skips)) == expected
    assert skips.total == 0
    # The same shards through a brace pattern, a single file and a list of files.
    pattern = str(tmp_path / "out" / "doc-{000000..000002}.tar")
    assert list(text_samples(pattern)) == expected
    assert list(text_samples(str(paths[0]))) == expected[:100]
    assert list(text_samples([str(p) for p in paths[1:]])) == expected[100:]
    # Seeded shuffling is a permutation and reproducible.
    shuffled = list(text_samples(tmp_path / "out", shuffle_buffer=50, seed=1))
    assert sorted(shuffled) == sorted(expected) and shuffled != expected
    assert shuffled == list(text_samples(tmp_path / "out", shuffle_buffer=50, seed=1))


def test_write_shards_edge_cases(tmp_path):
    assert write_text_shards([], tmp_path / "empty") == []
    assert list((tmp_path / "empty").iterdir()) == []  # no empty tar left behind
    with pytest.raises(ValueError, match="bad sample key"):
        write_text_shards([("a.b", "text")], tmp_path / "dots")
    with pytest.raises(ValueError, match="duplicate"):
        write_text_shards([("a", "x"), ("a", "y")], tmp_path / "dup")


def test_expand_urls(tmp_path):
    write_text_shards([("k1", "one"), ("k2", "two")], tmp_path, max_per_shard=1)
    a, b = str(tmp_path / "text-000000.tar"), str(tmp_path / "text-000001.tar")
    assert expand_urls(tmp_path) == [a, b]
    assert expand_urls(str(tmp_path / "text-{000000..000001}.tar")) == [a, b]
    assert expand_urls([b, a]) == [b, a]
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_urls(tmp_path / "nope.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_urls(tmp_path / "empty")


def test_read_text_inputs(tmp_path, caplog):
    txt = tmp_path / "book.txt"
    txt.write_text("First paragraph\nstill first.\n\n\n  Second one.  \n \nThird.\n")
    jsonl = tmp_path / "web.jsonl"
    lines = [
        json.dumps({"text": "good one", "url": "x"}),
        "{not json",
        json.dumps({"title": "no text field"}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "good two"}),
    ]
    jsonl.write_text("\n".join(lines) + "\n")
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="cola.data"):
        docs = list(read_text_inputs([txt, jsonl], skips=skips))
    assert [t for _, t in docs] == [
        "First paragraph\nstill first.",
        "Second one.",
        "Third.",
        "good one",
        "good two",
    ]
    keys = [k for k, _ in docs]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    assert skips.counts == {"BadInputLine": 3}
    assert sum("web.jsonl" in r.getMessage() for r in caplog.records) == 3
    # Round trip through shards.
    write_text_shards(docs, tmp_path / "shards")
    assert list(text_samples(tmp_path / "shards")) == [t for _, t in docs]

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text_inputs([tmp_path / "missing.txt"])
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="table.csv"):
        read_text_inputs(tmp_path / "table.csv")


def test_make_default_corpus_shards(corpus, tmp_path):
    counts = make_default_corpus_shards(tmp_path, max_per_shard=1500, records=corpus)
    n_held = sum(is_heldout(k) for k, _ in corpus)
    assert counts == {
        "train_docs": len(corpus) - n_held,
        "heldout_docs": n_held,
        "train_shards": -(-(len(corpus) - n_held) // 1500),
        "heldout_shards": 1,
    }
    train = list(text_samples(tmp_path / "train"))
    held = list(text_samples(tmp_path / "heldout"))
    assert train == [t for k, t in corpus if not is_heldout(k)]
    assert held == [t for k, t in corpus if is_heldout(k)]


# ----------------------------------------------------------------------------- corrupt input


def test_corrupt_shards_are_skipped_and_counted(tmp_path, caplog):
    texts = [f"document {i}: " + "words " * (20 + 9 * i) for i in range(10)]
    good = tmp_path / "shards" / "a-000000.tar"
    good.parent.mkdir()
    with wds.TarWriter(str(good)) as writer:
        for i, text in enumerate(texts):
            writer.write({"__key__": f"doc{i:03d}", "txt": text})
            if i == 2:
                writer.write({"__key__": "badutf8", "txt": b"bad \xff\xfe text"})
            if i == 4:
                writer.write({"__key__": "notext", "json": b'{"a": 1}'})
    # A second shard: the same bytes cut in the middle of doc008's text.
    with tarfile.open(good) as tf:
        member = tf.getmember("doc008.txt")
    cut = member.offset_data + member.size // 2
    (tmp_path / "shards" / "a-000001.tar").write_bytes(good.read_bytes()[:cut])

    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="cola.data"):
        got = list(text_samples(tmp_path / "shards", skips=skips))
    # Every good sample of the good shard, then the complete samples before the cut.
    assert got == texts + texts[:8]
    # Both copies hold the bad-utf8 and the text-less sample. The cut shows up twice: reading
    # doc008's data fails, then reading the next tar header fails and the shard is abandoned.
    assert skips.counts == {
        "DecodingError(UnicodeDecodeError)": 2,
        "MissingTextError": 2,
        "ReadError": 2,
    }
    assert skips.total == 6
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 6
    assert any("a-000001.tar" in m and "ReadError" in m for m in messages)
    assert any("badutf8" in m for m in messages)

    # Resampled streams survive the same input.
    skips = SkipCounter()
    stream = text_samples(tmp_path / "shards", resample=True, seed=0, skips=skips)
    assert all(t in texts for t in itertools.islice(stream, 60))
    assert skips.total >= 2


# ----------------------------------------------------------------------------- packing


def _rows(batches):
    for batch in batches:
        yield from zip(
            batch["input_ids"].tolist(),
            batch["sample_ids"].tolist(),
            batch["positions"].tolist(),
            strict=True,
        )


def test_pack_batches(tok, corpus):
    seq_len, batch_size = 48, 3
    texts = [t for _, t in corpus[:25]] + ["", "short", corpus[30][1] * 3]
    samples = [c for t in texts for c in encode_document(tok, t, seq_len)]
    assert any(len(c) == seq_len for c in samples)  # some documents are chunked

    batches = list(
        pack_batches(texts, tok, seq_len=seq_len, batch_size=batch_size, drop_last=False)
    )
    for batch in batches[:-1]:
        for value in batch.values():
            assert value.shape == (batch_size, seq_len) and value.dtype == torch.long
    assert 1 <= batches[-1]["input_ids"].shape[0] <= batch_size

    rebuilt, rows = [], []
    for ids, sids, pos in _rows(batches):
        used = sum(s >= 0 for s in sids)
        assert used > 0
        assert all(s == -1 for s in sids[used:])  # padding only at the end of a row
        assert all(i == tok.pad_token_id for i in ids[used:])
        assert all(p == 0 for p in pos[used:])
        row_samples = []
        for sid, group in itertools.groupby(range(used), key=lambda j: sids[j]):
            idx = list(group)
            assert sid == len(row_samples)  # 0, 1, 2, ... in order
            assert [pos[j] for j in idx] == list(range(len(idx)))
            row_samples.append([ids[j] for j in idx])
        rows.append(row_samples)
        rebuilt.extend(row_samples)
    # Every token of every sample exactly once, in order, each sample whole in one row.
    assert rebuilt == samples
    # Greedy: a row was closed only because the next sample did not fit.
    for row, nxt in zip(rows, rows[1:], strict=False):
        assert sum(map(len, row)) + len(nxt[0]) > seq_len

    # drop_last=True keeps only full batches, identical to the first ones; deterministic.
    full = list(pack_batches(texts, tok, seq_len=seq_len, batch_size=batch_size))
    assert len(full) == len(rows) // batch_size
    for a, b in zip(full, batches, strict=False):
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = list(pack_batches(texts, tok, seq_len=seq_len, batch_size=batch_size))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full, again, strict=True) for k in a)


def test_text_batches_stream(tok, corpus, tmp_path):
    write_text_shards(corpus[:120], tmp_path, max_per_shard=40)
    it = text_batches(tmp_path, tok, seq_len=64, batch_size=4, seed=5)
    first = [next(it) for _ in range(30)]  # more tokens than the shards hold: resampled
    assert all(b["input_ids"].shape == (4, 64) for b in first)
    again = text_batches(tmp_path, tok, seq_len=64, batch_size=4, seed=5)
    assert all(torch.equal(b["input_ids"], next(again)["input_ids"]) for b in first)
    one_pass = list(text_batches(tmp_path, tok, seq_len=64, batch_size=4, resample=False))
    n_tokens = sum(len(c) for _, t in corpus[:120] for c in encode_document(tok, t, 64))
    assert sum(int((b["sample_ids"] >= 0).sum()) for b in one_pass) <= n_tokens
    assert 30 * 4 * 64 > n_tokens


def test_default_corpus_adds_installed_torch_docstrings():
    import itertools

    from unified.data.corpus import iter_default_corpus, iter_package_docstrings

    torch_docs = list(itertools.islice(iter_package_docstrings("torch"), 5))
    assert len(torch_docs) == 5 and all(k.startswith("torch-") for k, _ in torch_docs)
    assert all("." not in k for k, _ in torch_docs)
    assert list(iter_package_docstrings("no_such_package_here")) == []
    # the default corpus starts with the standard library, then continues into torch
    head = list(itertools.islice(iter_default_corpus(), 10))
    assert not any(k.startswith("torch-") for k, _ in head)


def test_pack_batches_pads_samples_to_whole_patches(tok):
    texts = ["one two three", "four five six seven eight", "nine"]
    batch = next(pack_batches(texts, tok, seq_len=32, batch_size=1, drop_last=False,
                              multiple_of=4))
    sid = batch["sample_ids"][0]
    for s in range(int(sid.max()) + 1):
        idx = (sid == s).nonzero().flatten()
        assert len(idx) % 4 == 0 and int(idx[0]) % 4 == 0  # whole patches, aligned
        assert batch["positions"][0, idx].tolist() == list(range(len(idx)))


def test_mix_streams_holds_ratios_is_deterministic_and_drains_finite_streams():
    import itertools
    from collections import Counter

    from unified.data.streams import mix_streams

    def endless(tag):
        return (f"{tag}{i}" for i in itertools.count())

    ratios = {"t2t": 0.5, "i2t": 0.3, "t2i": 0.2}
    draws = list(itertools.islice(mix_streams({k: endless(k) for k in ratios}, ratios, seed=3),
                                  5000))
    counts = Counter(name for name, _ in draws)
    for k, r in ratios.items():
        assert abs(counts[k] / 5000 - r) < 0.02, (k, counts[k])
    # each stream's own order is preserved, and the same seed gives the same task sequence
    assert [s for n, s in draws if n == "t2i"][:3] == ["t2i0", "t2i1", "t2i2"]
    again = list(itertools.islice(mix_streams({k: endless(k) for k in ratios}, ratios, seed=3),
                                  5000))
    assert [n for n, _ in again] == [n for n, _ in draws]
    # finite streams: every sample comes out once, then the mix ends
    out = list(mix_streams({"a": range(10), "b": range(1000)}, {"a": 0.9, "b": 0.1}, seed=0))
    assert sorted(s for n, s in out if n == "a") == list(range(10)) and len(out) == 1010
    with pytest.raises(ValueError):
        list(mix_streams({"a": range(3)}, {"b": 1.0}))
    with pytest.raises(ValueError):
        list(mix_streams({"a": range(3)}, {"a": 0.0}))
