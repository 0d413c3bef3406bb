"""The demo app in-process: its layout on a text-only checkpoint (the image tabs say so and
their endpoints refuse with that message), and the shipped examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from demo.app import build_app
from demo.examples import EXAMPLES_DIR, INDEX, load_examples, write_examples
from demo.process import free_port
from tasks.shapes.world import Scene, caption, parse_caption, render
from unified.apps.pipeline import UnifiedPipeline


def _markdown(app) -> str:
    cfg = app.get_config_file()
    return "\n".join(str(c["props"].get("value", "")) for c in cfg["components"]
                     if c["type"] == "markdown")


@pytest.fixture(scope="module")
def text_only_app(text_only_checkpoint):
    pipe = UnifiedPipeline.from_pretrained(text_only_checkpoint, device="cpu")
    assert not pipe.can_see_images
    app = build_app(pipe, title="tiny text-only")
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
               ssr_mode=False, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


def test_text_only_checkpoint_says_so_on_the_image_tabs(text_only_app):
    app, url = text_only_app
    text = _markdown(app)
    assert "**text only**" in text
    assert text.count("This checkpoint is text-only: it has no image side.") == 2
    cfg = app.get_config_file()
    runs = {c["props"].get("elem_id"): c["props"] for c in cfg["components"]
            if c["props"].get("elem_id") in ("t2t-run", "i2t-run", "t2i-run")}
    assert runs["t2t-run"]["interactive"] is not False
    assert runs["i2t-run"]["interactive"] is False and runs["t2i-run"]["interactive"] is False

    client = Client(url, verbose=False)
    text, stats = client.predict("The function returns", 8, 2, 2.0, 1.0, 0.0, 0,
                                 api_name="/generate_text")
    assert "model evaluations" in stats
    image = handle_file(str(load_examples().images[0].path))
    with pytest.raises(AppError, match="no image side"):
        client.predict(image, "", "", api_name="/caption")
    with pytest.raises(AppError, match="no image side"):
        client.predict("a large red circle at the top left", api_name="/text_to_image")


def test_unified_checkpoint_has_no_text_only_notice(tiny_unified):
    app = build_app(UnifiedPipeline.from_model(tiny_unified))
    text = _markdown(app)
    assert "text-only" not in text and "image-to-text and text-to-image" in text


def test_shipped_examples_are_the_shapes_world(tmp_path):
    """demo/examples/ is exactly what `python -m demo.examples` writes, each PNG is the
    rendering of its scene, and every caption and prompt is a well-formed shapes caption."""
    write_examples(tmp_path)
    assert json.loads((tmp_path / INDEX).read_text()) == json.loads((EXAMPLES_DIR / INDEX).read_text())
    ex = load_examples()
    assert len(ex.images) >= 4 and len(ex.image_prompts) >= 3 and ex.text_prompts
    assert any(e.question for e in ex.images) and any(e.prefix for e in ex.images)
    for e in ex.images:
        scene = Scene.from_json(e.scene)
        assert np.array_equal(np.asarray(Image.open(e.path).convert("RGB")),
                              np.asarray(render(scene)))
        assert caption(scene) == e.caption and e.caption.startswith(e.prefix)
    for prompt, scene in zip(ex.image_prompts, ex.image_prompt_scenes):
        assert parse_caption(prompt) == Scene.from_json(scene)
    assert "a large red circle at the top left" in ex.image_prompts
    assert ("two objects: a small blue square at the center and a large green cross at the "
            "bottom right") in ex.image_prompts


def test_checked_components_send_the_stock_properties(tiny_unified):
    """Knob, WholeNumber and ImageUpload render as the stock slider, number and image: the
    browser gets the same properties (a missing one breaks the page, not the API)."""
    import gradio as gr

    app = build_app(UnifiedPipeline.from_model(tiny_unified))
    stock = {"slider": gr.Slider(0, 1).get_config(), "number": gr.Number().get_config(),
             "image": gr.Image().get_config()}
    seen = set()
    for block in app.blocks.values():
        name = block.get_block_name()
        if type(block).__module__ == "demo.components":
            assert name in stock
            missing = set(stock[name]) - set(block.get_config())
            assert not missing, (type(block).__name__, missing)
            seen.add(type(block).__name__)
    assert seen == {"Knob", "WholeNumber", "ImageUpload"}
