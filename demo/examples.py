"""The demo's pre-filled examples: prompts, and shapes-world scenes shipped as small PNGs.

`demo/examples/` holds one 32 x 32 PNG per image example and `examples.json`, which lists the
examples of each tab (and, for every image, the scene it shows, so tests can score answers).
The app only reads them (`load_examples`); `python -m demo.examples` rewrites them from the
shapes world (`write_examples`, the one place that imports tasks.shapes.world), and a test checks
that the shipped files are what it writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
INDEX = "examples.json"

# Text -> text: caption prefixes first, where following the prompt is visible (the prior
# completes the count, size and colour it is given: `cola eval shapes` "completion_valid"),
# then prose in the default corpus' register, which the small model continues with fragments
TEXT_PROMPTS = ["a large blue", "two objects: a small red", "The function returns",
                "Return the number of", "This module provides"]

# (file stem, objects as (shape, color, size, position), question, caption prefix). The
# questions are kinds the bundled model answers best (counts, where, how big); "what color /
# what shape is at ..." are right about 60% of the time (README, "The bundled model").
_IMAGE_EXAMPLES: list[tuple[str, list[tuple[str, str, str, str]], str, str]] = [
    ("red-circle", [("circle", "red", "large", "top left")], "", ""),
    ("square-and-cross", [("square", "blue", "small", "center"),
                          ("cross", "green", "large", "bottom right")], "", ""),
    ("two-objects", [("circle", "cyan", "large", "top right"),
                     ("triangle", "magenta", "small", "bottom left")],
     "how many objects are there?", ""),
    ("yellow-triangle", [("triangle", "yellow", "large", "top left")],
     "where is the large yellow triangle?", ""),
    ("green-square", [("square", "green", "large", "center")],
     "how big is the green square at the center?", ""),
    ("prefix", [("cross", "red", "small", "left"), ("circle", "yellow", "large", "right")],
     "", "two objects: a small red"),
]

# captions to draw (the last combines attributes the training split never pairs: a large
# blue circle is a held-out combination of the shapes world)
_IMAGE_PROMPTS: list[list[tuple[str, str, str, str]]] = [
    [("circle", "red", "large", "top left")],
    [("square", "blue", "small", "center"), ("cross", "green", "large", "bottom right")],
    [("triangle", "yellow", "large", "bottom")],
    [("square", "magenta", "large", "top right"), ("circle", "cyan", "small", "left")],
    [("circle", "blue", "large", "center")],
]


@dataclass(frozen=True)
class ImageExample:
    path: Path
    question: str
    prefix: str
    scene: dict[str, Any]  # tasks.shapes.world.Scene.to_json() of what the image shows
    caption: str  # its true caption


@dataclass(frozen=True)
class DemoExamples:
    text_prompts: list[str]
    images: list[ImageExample]
    image_prompts: list[str]
    image_prompt_scenes: list[dict[str, Any]]


def load_examples(folder: str | Path = EXAMPLES_DIR) -> DemoExamples:
    """Read the examples; image paths are absolute."""
    folder = Path(folder)
    data = json.loads((folder / INDEX).read_text())
    images = [ImageExample(folder / e["file"], e["question"], e["prefix"], e["scene"], e["caption"])
              for e in data["image_to_text"]]
    return DemoExamples(list(data["text_to_text"]), images,
                        [e["prompt"] for e in data["text_to_image"]],
                        [e["scene"] for e in data["text_to_image"]])


def write_examples(folder: str | Path = EXAMPLES_DIR) -> Path:
    """Render the example scenes and write them with the index; returns the index path."""
    from tasks.shapes.world import Obj, Scene, caption, render

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"text_to_text": TEXT_PROMPTS, "image_to_text": [], "text_to_image": []}
    for stem, objs, question, prefix in _IMAGE_EXAMPLES:
        scene = Scene(tuple(Obj(*o) for o in objs))
        render(scene).save(folder / f"{stem}.png", optimize=True)
        index["image_to_text"].append({"file": f"{stem}.png", "question": question,
                                       "prefix": prefix, "caption": caption(scene),
                                       "scene": scene.to_json()})
    for objs in _IMAGE_PROMPTS:
        scene = Scene(tuple(Obj(*o) for o in objs))
        index["text_to_image"].append({"prompt": caption(scene), "scene": scene.to_json()})
    path = folder / INDEX
    path.write_text(json.dumps(index, indent=1) + "\n")
    return path


if __name__ == "__main__":
    print(f"wrote {write_examples()}")
