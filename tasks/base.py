"""What every task shares: the Task interface and how its condition segments are encoded.

A task (DESIGN §2 tasks/) says how an image-text record becomes a training sample (token ids of
its text pieces, its images, and the layout recipe of SegmentSpecs that place them in the joint
sequence), how generation is conditioned and decoded, and how its output is scored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import torch

from unified.config import TasksConfig
from unified.data.streams import TaskSample
from unified.layout import Segment, SegmentSpec, place
from unified.model import ColaModel


@dataclass
class SampleContext:
    """What a task needs to turn records into samples: the tokenizer, the mixture's random
    stream, the task settings, the longest text piece, the prior's text block size and the
    CFG condition-drop probability (layout.cond_drop_prob)."""

    tokenizer: object
    rng: random.Random
    cfg: TasksConfig
    max_len: int
    block_size: int
    cond_drop_prob: float


class Task(Protocol):
    name: str

    def training_sample(self, record: dict, ctx: SampleContext) -> TaskSample:
        """A record {"image", "caption": str, "meta": dict | None} as a sample; the image
        ([3, H, W] in [-1, 1], or an undecoded unified.data.records.ImageRef that the trainer
        decodes for the rank that trains on it) goes into the sample as it is."""
        ...


@torch.no_grad()
def encode_conditions(model: ColaModel, recipe: list[SegmentSpec], texts: list[list[int]],
                      images: list[torch.Tensor]) -> list[Segment]:
    """Place one row's condition recipe: its text pieces (token ids) encoded by the Text VAE
    (normalized posterior means), its images (in [-1, 1]) by the image VAE."""
    lat = model.encode_texts(texts) if texts else None
    text_z = [lat[i, : len(t)] for i, t in enumerate(texts)]
    img_z = list(model.encode_images(torch.stack(images).to(model.vae.device))) if images else []
    grid = model.image_grid(*images[0].shape[-2:]).to(model.vae.device) if images else \
        torch.zeros(0, 2)  # a row's images share one size
    return place(recipe, text_z, img_z, grid)
