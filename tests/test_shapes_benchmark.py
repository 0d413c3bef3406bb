"""`cola eval shapes` (tasks/shapes/benchmark.py) on a tiny random unified model: every figure is
present and in range, the question figures count every question the scenes ask, and the
command line prints them. What the figures are on a trained model is tested through the demo
(tests/test_demo_meaning.py) and reported in the README."""

from __future__ import annotations

import pytest

from tasks.shapes.benchmark import evaluate_shapes
from tasks.shapes.evaluate import question_kind, score_answer
from tasks.shapes.world import Scene, questions
from unified.apps.cli import main
from unified.generate import GenerationConfig, ImageGenerationConfig


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from tasks.shapes.world import make_shapes_shards

    root = tmp_path_factory.mktemp("shapes")
    make_shapes_shards(root, n_train=1, n_heldout=6, difficulty=2)
    return root / "heldout"


def test_every_figure_is_reported_in_range(tiny_unified, heldout):
    gen = GenerationConfig(max_new_tokens=16, steps=2, guidance=2.0)
    report = evaluate_shapes(tiny_unified, heldout, n=4, batch=3, text_gen=gen,
                             image_gen=ImageGenerationConfig(steps=2), rerank=2, questions=2,
                             completions=3, progress=False)
    assert report["scenes"] == 4 and len(report["examples"]) == 4
    for prefix in ("caption", "caption_rerank2", "image"):
        for key in ("exact", "count", "shape", "color", "position"):
            assert 0.0 <= report[f"{prefix}_{key}"] <= 1.0
    assert 0.0 <= report["image_vae_recon_exact"] <= 1.0 and report["image_vae_psnr_db"] > 0
    assert report["qa_questions"] >= 2 * 3  # >= 3 a scene
    kinds = ("how_many", "what_color", "what_shape", "how_big", "where_is", "all")
    asked = {k for k in kinds if f"qa_{k}" in report}
    assert {"how_many", "all"} <= asked
    assert {k for k in kinds if f"qa_rerank2_{k}" in report} == asked  # reranked among 2
    assert all(0.0 <= report[f"{w}_{k}"] <= 1.0 for w in ("qa", "qa_rerank2") for k in asked)
    assert report["completion_prompts"] == 3 and 0.0 <= report["completion_valid"] <= 1.0
    assert len(report["completion_examples"]) == 2


def test_caption_completion_prompts_and_scoring():
    from tasks.shapes.benchmark import completion_prompt, completion_text
    from tasks.shapes.world import parse_caption

    two = "two objects: a small red circle at the top left and a large blue cross at the center"
    assert completion_prompt(two) == "two objects: a small red"
    assert completion_prompt("a large green square at the right") == "a large green"
    assert completion_text(" circle at the top left and a large blue cross at the center. a") == \
        " circle at the top left and a large blue cross at the center"
    p = completion_prompt(two)
    assert parse_caption(p + completion_text(two[len(p):] + ".\nmore")) is not None
    assert parse_caption(p + " circle at the top left") is None  # "two objects" with one
    assert parse_caption(p + " circle at the moon and a large blue cross at the center") is None


def test_answers_and_question_kinds():
    scene = Scene.from_json({"image_size": 32, "objects": [
        {"shape": "circle", "color": "red", "size": "large", "position": "top left"}]})
    qa = dict(questions(scene))
    assert [question_kind(q) for q in qa] == ["how_many", "what_color", "what_shape",
                                              "how_big", "where_is"]
    assert score_answer(" red.", qa["what color is the object at the top left?"])
    assert score_answer("at  the top left", "at the top left")
    assert not score_answer("red circle", "red") and not score_answer("", "one")


def test_cli_prints_the_figures(tiny_unified_checkpoint, heldout, capsys):
    assert main(["eval", "shapes", "--checkpoint", str(tiny_unified_checkpoint),
                 "--shapes-data", str(heldout), "-n", "2", "--steps", "2", "--image-steps",
                 "2", "--rerank", "0", "--questions", "1"]) == 0
    out = capsys.readouterr().out
    for key in ("caption_exact", "image_exact", "image_vae_psnr_db", "qa_all"):
        assert f"{key}:" in out
    assert "caption_rerank" not in out


def test_cli_eval_all_draws_missing_heldout_scenes_first(tiny_unified_checkpoint, tmp_path,
                                                          capsys, caplog):
    """A fresh install has no data/shapes: `cola eval all` draws the held-out scenes from
    evaluation seeds before any evaluation runs, and reports text and shapes figures."""
    missing = tmp_path / "no-such-folder"
    assert main(["eval", "all", "--checkpoint", str(tiny_unified_checkpoint),
                 "--shapes-data", str(missing), "-n", "2", "--steps", "2", "--image-steps",
                 "2", "--rerank", "0", "--questions", "0", "--max-docs", "3"]) == 0
    out = capsys.readouterr().out
    assert "token_accuracy:" in out and "caption_exact:" in out and "scenes: 2" in out
    assert "no held-out shapes data" in caplog.text
