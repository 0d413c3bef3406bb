"""Shard sources: any address webdataset reads (here local shards through `pipe:cat`, the
form used for s3 / gcs / ssh), without a local-existence check, and several sources mixed by
ratio; a dead source is counted, and a stream of dead sources stops with a clear message."""

import itertools
import json
from collections import Counter

import pytest
from conftest import stdlib_shards
from test_bad_data import good, write

from tasks import TaskMixture
from unified.config import load_preset
from unified.data.records import image_text_records
from unified.data.streams import DataError, SkipCounter, expand_urls, text_samples
from unified.training.trainer import Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    stdlib_shards(root / "text", 60, max_per_shard=30)  # text-000000.tar, text-000001.tar
    for name, start in (("a", 0), ("b", 1000)):
        for k in range(2):
            write(root / name / f"{name}-{k:06d}.tar",
                  [good(start + 20 * k + i) for i in range(20)])
    return root


def test_pipe_urls_read_like_local_paths(shards):
    url = f"pipe:cat {shards}/text/text-{{000000..000001}}.tar"
    assert expand_urls(url) == [f"pipe:cat {shards}/text/text-00000{i}.tar" for i in (0, 1)]
    assert expand_urls("https://example.com/x-{0..2}.tar")[2] == "https://example.com/x-2.tar"
    assert list(text_samples(url)) == list(text_samples(shards / "text"))
    recs = list(image_text_records(f"pipe:cat {shards}/a/a-{{000000..000001}}.tar"))
    assert [r["key"] for r in recs] == [f"{i:06d}" for i in range(40)]


def test_dead_sources_are_counted_and_a_stream_of_them_stops(shards):
    skips = SkipCounter()
    spec = [f"pipe:cat {shards}/text/text-000000.tar", "pipe:cat /nonexistent/x.tar"]
    assert len(list(text_samples(spec, skips=skips))) == 30 and skips.total >= 1
    dead = SkipCounter("text", limit=5)
    with pytest.raises(DataError, match="5 samples in a row.*nonexistent"):
        list(itertools.islice(text_samples("pipe:cat /nonexistent/x-{0..1}.tar",
                                           resample=True, skips=dead), 3))


def test_sources_mix_by_ratio_deterministically(shards):
    spec = {f"pipe:cat {shards}/a/a-{{000000..000001}}.tar": 0.75, str(shards / "b"): 0.25}

    def keys(seed):
        recs = image_text_records(spec, seed=seed, resample=True, same_on_all_ranks=True)
        return [r["key"] for _, r in zip(range(800), recs)]

    got = keys(3)
    share = Counter(int(k) < 1000 for k in got)[True] / len(got)
    assert abs(share - 0.75) < 0.05, share
    assert got == keys(3) and got != keys(4)


def test_training_reads_pipe_and_mixed_sources(shards, tmp_path):
    pairs = {f"pipe:cat {shards}/a/a-{{000000..000001}}.tar": 0.5, str(shards / "b"): 0.5}
    c = load_preset("shapes-tiny", [
        f'data.train={json.dumps(f"pipe:cat {shards}/text/text-{{000000..000001}}.tar")}',
        f"data.pairs={json.dumps(pairs)}", "data.batch_size=2", "data.pair_batch_size=4",
        "stage1.steps=2", "stage1.log_every=1", "stage1.ckpt_every=1000"])
    t = Trainer(c, 1, tmp_path / "run", tasks=TaskMixture(c))
    hist = t.train()
    assert len(hist) == 2 and t.skipped == 0 and hist[-1]["images_decoded"] == 8
