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
from tasks.image_to_text import INSTRUCTION, ImageToText, shapes_scene
from tasks.text_to_image import TextToImage
from unified.config import ColaConfig
from unified.data.records import image_text_records
from unified.data.streams import SkipCounter, TaskSample, mix_streams

# every task, by name
REGISTRY = {m.NAME: m for m in (text_to_text, image_to_text, text_to_image)}
# the tasks trained on image-text records (text-to-text trains on packed prose rows)
TASKS = {t.name: t for t in (ImageToText(), TextToImage())}


class CaptionTooLongError(ValueError):
    """A caption longer than a text piece holds (with data.long_captions = "skip")."""


def fit_caption(tokenizer, text: str, budget: int) -> tuple[str, bool]:
    """(text, truncated): the caption cut to at most `budget` tokens with [bos] and [eos]
    (re-encoded to check; "" when nothing fits)."""
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    if len(ids) + 2 <= budget:
        return text, False
    keep = budget - 2
    while keep > 0:
        cut = tokenizer.decode(ids[:keep]).rstrip("\ufffd").strip()
        n = len(tokenizer.encode(cut, add_special_tokens=False, split_special_tokens=True))
        if cut and n + 2 <= budget:
            return cut, True
        keep -= max(1, (n + 2 - budget))
    return "", True


class TaskMixture:
    """Image-text records -> task samples, each record given to one task by `tasks.ratios`.

    One reader (resampled shards, the same stream on every rank; the trainer slices each
    global batch by rank) feeds every task; the choice of task and the tasks' own choices come
    from generators seeded by `seed`, so a resumed run replays the same samples. Images stay
    undecoded (unified.data.records.ImageRef) in the samples: the trainer decodes those of its own
    slices. A caption longer than a text piece holds is truncated (counted) or skipped, as
    `data.long_captions` says; the caption comes from `.txt` or the `.json` key
    `data.caption_key`."""

    def __init__(self, cfg: ColaConfig):
        unknown = set(cfg.tasks.ratios) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)} in tasks.ratios; "
                             f"known: {sorted(TASKS)}")
        if not cfg.data.pairs:
            raise ValueError("the task mixture needs image-text shards: set data.pairs")
        if cfg.data.long_captions not in ("truncate", "skip"):
            raise ValueError(f"data.long_captions must be 'truncate' or 'skip', got "
                             f"{cfg.data.long_captions!r}")
        self.cfg = cfg

    @property
    def names(self) -> list[str]:
        """The tasks drawn (ratio > 0)."""
        return [k for k, v in self.cfg.tasks.ratios.items() if v > 0]

    def texts(self, n: int, skips: SkipCounter | None = None) -> list[str]:
        """Example texts of the tasks (captions, instructions, questions and answers) for
        training the tokenizer (read without decoding any image)."""
        from tasks.shapes.world import questions

        out = [INSTRUCTION]
        records = image_text_records(self.cfg.data.pairs, resample=False, skips=skips,
                                     same_on_all_ranks=True, caption_key=self.cfg.data.caption_key)
        for _, rec in zip(range(n), records):
            if skips is not None:
                skips.ok()
            out.append(rec["caption"])
            scene = shapes_scene(rec.get("meta")) if self.cfg.tasks.question_prob > 0 else None
            if scene is not None:
                out.extend(f"{q} {a}" for q, a in questions(scene))
        return out

    def preview(self, model, images, captions: list[str], seed: int = 0
                ) -> tuple[list[str], object]:
        """(captions of `images` [N, 3, H, W], images [M, 3, H, W] of `captions`) with the
        model's generation defaults and a fixed seed: the trainer's sample log (the trainer
        imports no task: it asks the mixture it was handed)."""
        import dataclasses

        g = model.generation
        budget = min(g.caption.max_new_tokens, model.vae.config.max_len - 1)  # after [bos]
        texts = image_to_text.generate(model, images, gen=dataclasses.replace(
            g.caption, seed=seed, max_new_tokens=budget))
        drawn = text_to_image.generate(model, captions, dataclasses.replace(g.image, seed=seed))
        return texts, drawn.images

    def samples(self, tokenizer, seed: int, skips: SkipCounter | None = None,
                max_len: int | None = None, source=None) -> Iterator[TaskSample]:
        """Task samples from `source` (default data.pairs; e.g. data.pairs_heldout)."""
        cfg = self.cfg
        skips = skips if skips is not None else SkipCounter("pairs")
        max_len = max_len or cfg.data.seq_len
        block = cfg.layout.block_size
        budget = (max_len // block) * block  # an answer is padded to whole blocks
        records = iter(image_text_records(source or cfg.data.pairs, seed=seed, resample=True,
                                          shuffle_buffer=cfg.data.shuffle_buffer, skips=skips,
                                          same_on_all_ranks=True,
                                          caption_key=cfg.data.caption_key))
        ctx = SampleContext(tokenizer, random.Random(seed + 1), cfg.tasks, max_len, block,
                            cfg.layout.cond_drop_prob)

        def usable():  # records whose caption fits (truncated, or skipped)
            for rec in records:
                text, cut = fit_caption(tokenizer, rec["caption"], budget)
                if cut:
                    if cfg.data.long_captions == "skip" or not text:
                        exn = CaptionTooLongError(f"the caption does not fit {budget} tokens")
                        exn.key, exn.url = rec["key"], rec["url"]
                        skips(exn)
                        continue
                    skips.note("caption truncated", f"{rec['url']} {rec['key']}: to "
                               f"{budget} tokens")
                    rec = {**rec, "caption": text}
                yield rec

        fitted = usable()

        def task_stream(task):  # every task pulls the next record from the one reader
            for rec in fitted:
                yield task.training_sample(rec, ctx)

        streams = {name: task_stream(TASKS[name]) for name in cfg.tasks.ratios}
        for _, smp in mix_streams(streams, cfg.tasks.ratios, seed=seed):
            skips.ok()
            yield smp
