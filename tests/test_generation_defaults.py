"""Generation defaults travel with the model (model_index.json "generation"): the pipeline,
the demo and the command line start from them; a knob given explicitly still wins."""

import json

import pytest
from conftest import make_tiny_unified

from demo.app import Defaults
from unified.apps.cli import main
from unified.apps.pipeline import UnifiedPipeline
from unified.model import ColaModel
from unified.sampling import GenerationDefaults
from vaes.weights import ModelFileError


@pytest.fixture(scope="module")
def folder(unified_tokenizer, tmp_path_factory):
    model = make_tiny_unified(unified_tokenizer)
    model.generation = GenerationDefaults.from_json(
        {"text": {"steps": 3, "max_new_tokens": 4}, "caption": {"max_new_tokens": 5},
         "image": {"steps": 2, "guidance": 1.0}})
    out = tmp_path_factory.mktemp("defaults") / "model"
    model.save_pretrained(out)
    return out


def test_saved_and_loaded(folder):
    saved = json.loads((folder / "model_index.json").read_text())["generation"]
    assert saved["text"]["steps"] == 3 and saved["image"]["guidance"] == 1.0
    assert ColaModel.from_pretrained(folder).generation.caption.max_new_tokens == 5
    pipe = UnifiedPipeline.from_pretrained(folder)
    assert pipe.defaults.text.steps == 3 and pipe.defaults.text.guidance == 2.0  # kept default
    assert Defaults.of(pipe.defaults).image_steps == 2  # the demo's knobs start there


def test_the_pipeline_uses_them_and_an_explicit_knob_wins(folder):
    pipe = UnifiedPipeline.from_pretrained(folder)
    implicit = pipe.generate_text("the file is")
    explicit = pipe.generate_text("the file is", steps=3, max_new_tokens=4, guidance=2.0)
    assert implicit.texts == explicit.texts and implicit.nfe == explicit.nfe
    assert pipe.generate_text("the file is", steps=5).nfe > implicit.nfe
    img = pipe.text_to_image("a red circle")
    assert img.nfe == 1 + 2  # the prefix, then 2 steps of one (guidance 1) branch


def test_the_command_line_uses_them(folder, capsys):
    assert main(["generate", "the file is", "--checkpoint", str(folder)]) == 0
    pipe = UnifiedPipeline.from_pretrained(folder)
    want = "the file is" + pipe.generate_text("the file is").text
    assert capsys.readouterr().out.strip() == want.strip()


def test_a_bad_generation_entry_names_the_file(folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["generation"]["text"]["steps"] = 0
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="model_index.json.*generation.text"):
        ColaModel.from_pretrained(bad)
