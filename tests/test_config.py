"""Presets and overrides: one source (base chains), every value type- and enum-checked at load
with a message naming the key."""

import pytest

from unified.config import ConfigError, load_preset, preset_names
from unified.layout import TimeConfig


@pytest.mark.parametrize("override,key", [
    ("optim.lr=abc", "optim.lr"),
    ("image.size=256.0", "image.size"),  # a float where an integer belongs
    ("stage2.precision=\"fp16\"", "stage2.precision"),  # not an allowed value
    ("stage1.compile=1", "stage1.compile"),  # a number is not a boolean
    ("loss.beta=NaN", "loss.beta"),
    ("tasks.ratios.image_to_text=\"half\"", "tasks.ratios.image_to_text"),
    ("image.widths=[8, \"x\"]", "image.widths[1]"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("layout.time=3", "layout.time"),  # a section given a value
])
def test_a_wrong_value_names_its_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_preset("text-tiny", [override])
    assert str(e.value).startswith(f"config key {key}")


def test_unknown_keys_and_sections_are_named():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_preset("text-tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="'nosuch'"):
        load_preset("text-tiny", ["nosuch.x=1"])


def test_good_values_are_converted_losslessly():
    cfg = load_preset("text-tiny", ["optim.lr=1", "image.widths=[8, 16]", "stage1.batch_size=null",
                                    "layout.time.loc=1.5"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.image.widths == (8, 16)
    assert cfg.stage1.batch_size is None
    assert cfg.layout.time == TimeConfig(1.5, 1.0)


def test_every_preset_loads_and_a_base_supplies_what_a_preset_leaves_out():
    for name in preset_names():
        assert load_preset(name).name == name
    base, child = load_preset("text-default"), load_preset("shapes-default")
    assert child.data.seq_len == base.data.seq_len == 128  # stated once, in text-default
    assert child.stage2.steps == 4000 and base.stage2.steps == 3000  # the child's own value
    assert load_preset("text-1b").data.seq_len == load_preset("text-300m").data.seq_len


def test_base_chains_and_legacy_keys(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text('base = "text-tiny"\n[layout]\ntime_loc = 0.5\n[tasks]\ncond_drop_prob = 0.2\n')
    cfg = load_preset(str(a))
    assert cfg.layout.time == TimeConfig(0.5, 1.0)  # old spelling, one home now
    assert cfg.layout.cond_drop_prob == 0.2
    assert cfg.data.seq_len == load_preset("text-tiny").data.seq_len
    b = tmp_path / "b.toml"
    b.write_text(f'base = "{tmp_path / "c.toml"}"\n')
    (tmp_path / "c.toml").write_text(f'base = "{b}"\n')
    with pytest.raises(ConfigError, match="circle"):
        load_preset(str(b))
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_preset(str(bad))
