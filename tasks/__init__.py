"""Tasks: one module per task (text_to_text, image_to_text, text_to_image), each the same shape:
`NAME`, the layout `recipe(prompt)` (SegmentSpecs placed by unified.layout.place), decoding
(`stream` / `generate`) and the task's metric beside it; the registry of them all; and the
mixture that turns image-text records into a stream of task samples by ratio. Synthetic worlds
with exact evaluators live in subpackages of their own (tasks/shapes, tasks/textworld).

The trainer is task-agnostic: `cola train` (the composition root) hands it a `TaskMixture`,
which it asks for example texts (to train the tokenizer) and for task samples.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tasks import image_to_text, text_to_image, text_to_text
from tasks.base import SampleContext
from tasks.image_to_text import INSTRUCTION, ImageToText
from tasks.text_to_image import TextToImage
from unified.config import ColaConfig
from unified.data.streams import SkipCounter, TaskSample, image_text_samples, mix_streams

# every task, by name
REGISTRY = {m.NAME: m for m in (text_to_text, image_to_text, text_to_image)}
# the tasks trained on image-text records (text-to-text trains on packed prose rows)
TASKS = {t.name: t for t in (ImageToText(), TextToImage())}


class TaskMixture:
    """Image-text records -> task samples, each record given to one task by `tasks.ratios`.

    One reader (resampled shards, the same stream on every rank; the trainer slices each
    global batch by rank) feeds every task; the choice of task and the tasks' own choices come
    from generators seeded by `seed`, so a resumed run replays the same samples."""

    def __init__(self, cfg: ColaConfig):
        unknown = set(cfg.tasks.ratios) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)} in tasks.ratios; "
                             f"known: {sorted(TASKS)}")
        if not cfg.data.pairs:
            raise ValueError("the task mixture needs image-text shards: set data.pairs")
        self.cfg = cfg

    def texts(self, n: int, skips: SkipCounter | None = None) -> list[str]:
        """Example texts of the tasks (captions, instructions, questions and answers) for
        training the tokenizer."""
        from tasks.shapes.world import Scene, questions

        out = [INSTRUCTION]
        for _, rec in zip(range(n), image_text_samples(self.cfg.data.pairs, resample=False,
                                                          image_size=self.cfg.image.size,
                                                          skips=skips, same_on_all_ranks=True)):
            out.append(rec["caption"])
            if self.cfg.tasks.question_prob > 0 and rec.get("meta"):
                out.extend(f"{q} {a}" for q, a in questions(Scene.from_json(rec["meta"])))
        return out

    def samples(self, tokenizer, seed: int, skips: SkipCounter | None = None,
                max_len: int | None = None) -> Iterator[TaskSample]:
        cfg = self.cfg
        records = iter(image_text_samples(cfg.data.pairs, image_size=cfg.image.size, seed=seed,
                                          resample=True, shuffle_buffer=cfg.data.shuffle_buffer,
                                          skips=skips, same_on_all_ranks=True))
        ctx = SampleContext(tokenizer, random.Random(seed + 1), cfg.tasks,
                            max_len or cfg.data.seq_len, cfg.layout.block_size,
                            cfg.layout.cond_drop_prob)

        def task_stream(task):  # every task pulls the next record from the one reader
            for rec in records:
                yield task.training_sample(rec, ctx)

        streams = {name: task_stream(TASKS[name]) for name in cfg.tasks.ratios}
        yield from (smp for _, smp in mix_streams(streams, cfg.tasks.ratios, seed=seed))
