"""Sample captions and images in TensorBoard during stage 2 (unified/training/samples.py): a
tiny run's event file holds image and text summaries of fixed held-out data, read back with
tensorboard's EventAccumulator, and logging them leaves the training losses as they were."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks import TaskMixture
from tasks.shapes.world import make_shapes_shards
from unified.config import load_preset
from unified.training.trainer import Trainer


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    make_shapes_shards(root / "shapes", n_train=60, n_heldout=10, difficulty=2, max_per_shard=30)
    c = cfg(root, "stage1.steps=2", "stage1.ckpt_every=1000")
    Trainer(c, 1, root / "s1", tasks=TaskMixture(c)).train()
    return root


def cfg(root, *extra):
    return load_preset("shapes-tiny", [
        "data.batch_size=0", f'data.pairs="{root / "shapes" / "train"}"',
        f'data.pairs_heldout="{root / "shapes" / "heldout"}"', *extra])


def run(root, out, *extra):
    c = cfg(root, "stage2.steps=2", "stage2.ckpt_every=1000", "stage2.ema_decay=0.5", *extra)
    return Trainer(c, 2, out, init=root / "s1" / "final", tasks=TaskMixture(c)).train()


def test_samples_are_in_the_event_file_and_training_is_unchanged(stage1, tmp_path):
    logged = run(stage1, tmp_path / "on", "stage2.log_samples_every=1", "stage2.log_samples=2")
    plain = run(stage1, tmp_path / "off", "stage2.log_samples_every=0")
    assert [h["loss"] for h in logged] == [h["loss"] for h in plain]

    events = EventAccumulator(str(tmp_path / "on" / "tensorboard"),
                              size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    images = sorted(t for t in tags["images"] if t.startswith("samples/"))
    assert images == ["samples/drawn_from_caption/0", "samples/drawn_from_caption/1",
                      "samples/heldout_image/0", "samples/heldout_image/1"]
    drawn = events.Images("samples/drawn_from_caption/0")
    assert [e.step for e in drawn] == [1, 2]  # every step here
    assert (drawn[0].width, drawn[0].height) == (32, 32) and drawn[0].encoded_image_string
    texts = [t for t in tags["tensors"] if t.startswith("samples/")]
    assert "samples/captions_of_heldout_images/text_summary" in texts
    table = events.Tensors("samples/captions_of_heldout_images/text_summary")[-1]
    text = table.tensor_proto.string_val[0].decode()
    assert "| generated | real caption |" in text and text.count("\n") == 3  # head + 2 rows
    off = EventAccumulator(str(tmp_path / "off" / "tensorboard"))
    off.Reload()
    assert not off.Tags()["images"]  # 0 = off
