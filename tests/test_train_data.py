"""The trainer's data stream (unified/training/batches.py): every rank decodes only the images
of its own slices, yet its micro-batches are exactly the single process's slices; DataLoader
workers give the same steps as the training process itself."""

import pytest
import torch
from conftest import stdlib_shards

from tasks import TaskMixture
from tasks.shapes.world import make_shapes_shards
from unified.config import load_preset
from unified.training.batches import Slicing, StepStream
from unified.training.trainer import Trainer

ROWS, PAIRS = 4, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    stdlib_shards(root / "text", 120, max_per_shard=60)
    make_shapes_shards(root / "shapes", n_train=120, n_heldout=0, difficulty=2, max_per_shard=60)
    return root


def cfg(data, *extra):
    return load_preset("shapes-tiny", [f'data.train="{data / "text"}"',
                                       f'data.pairs="{data / "shapes" / "train"}"',
                                       f"data.batch_size={ROWS}", f"data.pair_batch_size={PAIRS}",
                                       *extra])


def stream(c, tok, slicing, start=0):
    from unified.data.streams import text_batches

    mix = TaskMixture(c)
    return StepStream(lambda: text_batches(c.data.train, tok, seq_len=c.data.seq_len,
                                           batch_size=ROWS, seed=0, same_on_all_ranks=True),
                      lambda: mix.samples(tok, 0), slicing, seed=0, start=start,
                      seq_len=c.data.seq_len, pad_id=tok.pad_token_id, image_size=c.image.size)


def steps(s: StepStream, n: int) -> list[dict]:
    return [item for _, item in zip(range(n), s)]


def test_each_rank_decodes_only_its_share_and_cuts_the_single_process_slices(
        data, unified_tokenizer):
    c, tok = cfg(data), unified_tokenizer
    single = steps(stream(c, tok, Slicing(0, 1, 2, ROWS, PAIRS)), 3)  # 2 slices, one process
    ranks = [steps(stream(c, tok, Slicing(r, 2, 1, ROWS, PAIRS)), 3) for r in (0, 1)]
    for pos in range(3):
        assert single[pos]["decoded"] == PAIRS  # one process decodes the whole global batch
        for r in (0, 1):
            item = ranks[r][pos]
            assert item["pos"] == pos and item["decoded"] == PAIRS // 2  # a rank: its half
            mine, ref = item["micro"][0], single[pos]["micro"][r]
            assert torch.equal(mine["text"]["input_ids"], ref["text"]["input_ids"])
            assert mine["rng"] == ref["rng"]
            assert torch.equal(mine["pairs"]["images"], ref["pairs"]["images"])
            assert mine["pairs"]["tasks"] == ref["pairs"]["tasks"]
            assert mine["pairs"]["seeds"] == ref["pairs"]["seeds"]
            assert mine["pairs"]["images"].shape == (PAIRS // 2, 3, 32, 32)
    # a resumed stream starts at its position without decoding what it skips
    later = steps(stream(c, tok, Slicing(1, 2, 1, ROWS, PAIRS), start=2), 1)[0]
    assert later["pos"] == 2 and later["decoded"] == PAIRS // 2
    assert torch.equal(later["micro"][0]["pairs"]["images"],
                       ranks[1][2]["micro"][0]["pairs"]["images"])


def test_dataloader_workers_give_the_same_steps(data, unified_tokenizer):
    c, tok = cfg(data), unified_tokenizer
    ref = steps(stream(c, tok, Slicing(1, 2, 1, ROWS, PAIRS)), 4)
    loader = torch.utils.data.DataLoader(stream(c, tok, Slicing(1, 2, 1, ROWS, PAIRS)),
                                         batch_size=None, num_workers=2)
    got = steps(loader, 4)
    assert [g["pos"] for g in got] == [0, 1, 2, 3]
    for g, r in zip(got, ref):
        assert g["decoded"] == r["decoded"] == PAIRS // 2
        assert torch.equal(g["micro"][0]["pairs"]["images"], r["micro"][0]["pairs"]["images"])
        assert torch.equal(g["micro"][0]["text"]["input_ids"], r["micro"][0]["text"]["input_ids"])


def test_training_with_workers_equals_training_without(data, tmp_path):
    base = ["stage1.steps=3", "stage1.log_every=1", "stage1.ckpt_every=1000"]
    a = Trainer(cfg(data, *base), 1, tmp_path / "a", tasks=TaskMixture(cfg(data))).train()
    c = cfg(data, *base, "data.workers=2")
    b = Trainer(c, 1, tmp_path / "b", tasks=TaskMixture(c)).train()
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-6)
    assert b[-1]["images_decoded"] == 3 * PAIRS
