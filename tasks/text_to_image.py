"""Text-to-image: [C][I], the caption a clean condition (dropped for CFG), the image one noisy
bidirectional block (DESIGN §3). Scored on the shapes world by analysing the image back into
its objects (tasks/shapes/evaluate.py)."""

from __future__ import annotations

from collections.abc import Callable

from tasks.base import SampleContext, encode_conditions
from unified.data.streams import TaskSample
from unified.generate import ImageGenerationConfig, ImageGenerator, ImageOutput
from unified.layout import MODALITY_IMAGE, MODALITY_TEXT, ONE_BLOCK, SEG_C, SEG_I, SegmentSpec
from unified.model import ColaModel
from vaes.tokenizer import encode_piece

NAME = "text_to_image"
CONDITION = [SegmentSpec(SEG_C, MODALITY_TEXT, 0, droppable=True)]
RECIPE = [*CONDITION, SegmentSpec(SEG_I, MODALITY_IMAGE, 0, target=True, blocks=ONE_BLOCK)]


class TextToImage:
    name = NAME

    def training_sample(self, record: dict, ctx: SampleContext) -> TaskSample:
        return TaskSample(NAME, [encode_piece(ctx.tokenizer, record["caption"], ctx.max_len)],
                          [record["image"]], RECIPE, ctx.cfg.cond_drop_prob)


def generate(model: ColaModel, prompts: list[str], gen: ImageGenerationConfig | None = None, *,
             use_cache: bool = True, trajectory: int = 0,
             on_step: Callable[[int, int], None] | None = None) -> ImageOutput:
    """Images for caption prompts (batched, one row per prompt)."""
    if not prompts:
        raise ValueError("no prompts given")
    rows = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError("the prompt is empty: describe the image to draw")
        ids = encode_piece(model.tokenizer, p.strip(), model.vae.config.max_len)
        rows.append(encode_conditions(model, CONDITION, [ids], []))
    return ImageGenerator(model).generate(rows, gen, use_cache, trajectory, on_step)
