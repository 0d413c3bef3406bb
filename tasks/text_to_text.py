"""Text-to-text (Cola DLM's own task): [C][N] over packed prose. Training uses the vectorized
packed-row layout (unified.layout.text_to_text_layout: a random prompt split per sample, its
whole blocks C dropped for CFG, the tail pinned inside the first target block); generation
continues a prompt block by block; the Text VAE is scored by held-out reconstruction."""

from __future__ import annotations

from collections.abc import Iterator

from tasks.text_to_text import evaluate_text_vae
from unified.generate import BlockOutput, GenerationConfig, TextGenerator
from unified.layout import MODALITY_TEXT, SEG_N, SegmentSpec
from unified.model import ColaModel

NAME = "text_to_text"


def recipe(prompt: int) -> list[SegmentSpec]:
    """[C][N] as a recipe: one text whose first `prompt` tokens are given (whole blocks: the
    C condition CFG drops; the rest pinned in the first target block). Training packs prose
    rows through the equivalent vectorized text_to_text_layout instead."""
    return [SegmentSpec(SEG_N, MODALITY_TEXT, 0, target=True, prompt=prompt,
                        prompt_droppable=True)]


def stream(model: ColaModel, prompts: list[str], gen: GenerationConfig | None = None, *,
           use_cache: bool = True) -> Iterator[BlockOutput]:
    """Continuations of prompts, one BlockOutput per generated block."""
    return TextGenerator(model).stream(prompts, gen, use_cache)


def generate(model: ColaModel, prompts: list[str], gen: GenerationConfig | None = None
             ) -> list[str]:
    return TextGenerator(model).generate(prompts, gen)


def score(model: ColaModel, data: str | None = None, max_docs: int = 500) -> dict:
    """Held-out token reconstruction of the Text VAE (clean, and noised to t = 0.1)."""
    return evaluate_text_vae(model, data, max_docs=max_docs)
