"""Continuous batching (unified/continuous.py) on the tiny unified model: rows that join a
running batch mid-flight, or share it with rows that finish and leave, give exactly the text
they give alone (fast batched path vs the slow uncached reference path, run alone); finished
and cancelled rows stop being computed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tasks import image_to_text
from tasks.shapes.world import render_array, scene_at
from unified.continuous import TextBatch
from unified.generate import GenerationConfig, TextGenerator

# (prompt, seed, budget): prompts of whole blocks, a partial block and only [bos] + 1 token
ROWS = [("Return the number of", 3, 9), ("Open the file", 1, 17), ("A", 7, 6),
        ("The path to the file is", 5, 12)]


def alone(model, prompt: str, seed: int, budget: int, gen: GenerationConfig,
          conditions=None) -> list[int]:
    """The reference: this row generated on its own by the uncached (slow) engine."""
    g = dataclasses.replace(gen, seed=seed, max_new_tokens=budget)
    ids: list[int] = []
    for out in TextGenerator(model).stream([prompt], g, use_cache=False,
                                           conditions=None if conditions is None
                                           else [conditions], seeds=[seed]):
        ids.extend(out.new_ids[0])
    return ids


def run_with_joins(batch: TextBatch, rows, join_at: dict[int, list[int]]) -> dict[int, list[int]]:
    """Rows join before the steps given in `join_at` (step -> row indices); run until every
    row finished. Returns each row's ids."""
    slots, step = {}, 0
    while True:
        for i in join_at.get(step, []):
            prompt, seed, budget = rows[i][:3]
            slots[i] = batch.add(prompt, seed, budget, tag=i,
                                 conditions=rows[i][3] if len(rows[i]) > 3 else None)
        if not batch.step() and step >= max(join_at):
            break
        step += 1
        assert step < 50
    return {i: s.generated for i, s in slots.items()}


@pytest.mark.parametrize("temperature,guidance,noise_scale",
                         [(0.0, 2.0, 1.0), (1.0, 2.0, 1.0), (0.0, 1.0, 1.0), (0.0, 2.0, 0.5)])
def test_rows_joining_mid_flight_give_their_solo_output(tiny_unified, temperature, guidance,
                                                        noise_scale):
    gen = GenerationConfig(steps=3, guidance=guidance, temperature=temperature,
                           noise_scale=noise_scale)
    joins = {0: [0, 1], 2: [2], 3: [3]}  # two start, one joins at block 2, one at block 3
    fast = run_with_joins(TextBatch(tiny_unified, gen), ROWS, joins)
    slow = run_with_joins(TextBatch(tiny_unified, gen, use_cache=False), ROWS, joins)
    for i, (prompt, seed, budget) in enumerate(ROWS):
        ref = alone(tiny_unified, prompt, seed, budget, gen)
        assert len(ref) == budget  # EOS is kept unlikely in the tiny model
        assert fast[i] == ref, (i, prompt)
        assert slow[i] == ref, (i, prompt)


def test_caption_rows_join_mid_flight_and_keep_their_solo_answer(tiny_unified):
    model = tiny_unified
    images = torch.stack([torch.from_numpy(render_array(scene_at(0, k, image_size=model.image_size)))
                          .float().permute(2, 0, 1) / 127.5 - 1 for k in range(3)])
    conds = image_to_text._conditions(model, images, [None, "what color is it?", None])
    rows = [("", 2, 8, conds[0]), ("a", 4, 11, conds[1]), ("the", 9, 5, conds[2])]
    gen = GenerationConfig(steps=2, guidance=2.0)
    got = run_with_joins(TextBatch(model, gen), rows, {0: [0], 1: [1], 2: [2]})
    for i, (prefix, seed, budget, cond) in enumerate(rows):
        assert got[i] == alone(model, prefix, seed, budget, gen, cond), i


def test_finished_and_cancelled_rows_leave_the_batch(tiny_unified):
    """Budgets of 3, 7 and 20 tokens with blocks of 4: each row stops being computed at the
    block boundary after it is done; a cancelled row leaves at once; the rest keep their
    solo output."""
    gen = GenerationConfig(steps=2)
    batch = TextBatch(tiny_unified, gen)
    short = batch.add("Open the file", 1, 3)
    mid = batch.add("Return the number of", 2, 7)
    long = batch.add("A list of the", 3, 20)
    gone = batch.add("If the value is", 4, 20)
    blocks = 0
    while batch.step():
        blocks += 1
        if blocks == 2:
            batch.leave([gone])  # its client went away
    per_block = batch.rows_per_block
    # "Open the file" = [bos] + 3 tokens: 0 in the first block... every row ends when its
    # budget is reached; the counts only go down, and the last blocks compute one row
    assert per_block[0] == 4 and per_block[-1] == 1
    assert all(a >= b for a, b in zip(per_block, per_block[1:]))
    assert sum(per_block) < 4 * len(per_block)
    assert short.finished and mid.finished and long.finished and not gone.finished
    assert len(gone.generated) < 20
    for s, prompt, seed in [(short, "Open the file", 1), (mid, "Return the number of", 2),
                            (long, "A list of the", 3)]:
        assert s.generated == alone(tiny_unified, prompt, seed, s.budget, gen)
    # after the last row left, the batch holds nothing and a new row starts from scratch
    assert len(batch) == 0 and batch.prior is None
    again = batch.add("Open the file", 1, 3)
    while batch.step():
        pass
    assert again.generated == short.generated


def test_a_bad_prompt_joins_nothing(tiny_unified):
    batch = TextBatch(tiny_unified, GenerationConfig(steps=1))
    batch.add("Open the file", 0, 4)
    with pytest.raises(ValueError, match="too long"):
        batch.add("word " * 80, 0, 4)
    assert len(batch) == 1 and len(batch.step()) == 1
