"""Continuous batching in the server's batcher (unified/apps/batcher.py) on the tiny unified
model, in process: a request joins a running batch at a block boundary and still gets its solo
output; finished rows stop being computed; a cancelled request frees its slot for a waiting
one; the fast batcher against the slow uncached reference engine."""

from __future__ import annotations

import asyncio

import pytest

from unified.apps.batcher import Batcher, Job
from unified.apps.pipeline import UnifiedPipeline
from unified.generate import GenerationConfig


@pytest.fixture(scope="module")
def pipe(tiny_unified):
    return UnifiedPipeline.from_model(tiny_unified)


def text_job(prompt: str, seed: int, budget: int, steps: int = 2, n: int = 1,
             temperature: float = 0.0) -> Job:
    gen = GenerationConfig(max_new_tokens=budget, steps=steps, seed=seed,
                           temperature=temperature)
    return Job("text", gen, [prompt] * n, [seed + i for i in range(n)], prompt_tokens=8,
               timeout=120)


async def result(job: Job, timeout: float = 120.0):
    last = {}
    while True:
        kind, payload = await asyncio.wait_for(job.events.get(), timeout)
        assert kind != "error", payload.message
        if kind == "rows":
            last.update({u.row: u for u in payload})
        if kind == "done":
            return [last[r] for r in sorted(last)]


async def first_block(job: Job):
    kind, updates = await asyncio.wait_for(job.events.get(), 60)
    assert kind == "rows" and updates[0].finish is None  # running, not done
    return updates


def solo(pipe, prompt, seed, budget, steps=2, temperature=0.0) -> str:
    return pipe.generate_text(prompt, max_new_tokens=budget, steps=steps, seed=seed,
                              temperature=temperature).text


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_request_joining_mid_flight_gets_its_solo_output(pipe, use_cache, temperature):
    """A long request runs; a second one (n = 2) arrives after its first block and joins the
    running batch at the next block boundary (one batch in all); both give their solo text."""

    async def main():
        b = Batcher(pipe, use_cache=use_cache)
        try:
            long = text_job("Return the number of", 3, 40, temperature=temperature)
            b.submit(long)
            head = await first_block(long)
            late = text_job("Open the file", 1, 9, n=2, temperature=temperature)
            b.submit(late)
            return head, await result(long), await result(late), dict(b.stats)
        finally:
            b.close()

    head, [long], late, stats = asyncio.run(main())
    assert stats["batches"] == 1 and stats["joined"] == 1 and stats["largest_batch"] == 3
    assert long.text.startswith(head[0].text)
    assert long.text == solo(pipe, "Return the number of", 3, 40, temperature=temperature)
    for r, u in enumerate(late):  # choice r has seed 1 + r
        assert u.text == solo(pipe, "Open the file", 1 + r, 9, temperature=temperature)
        assert u.finish == "length" and u.tokens == 9


def test_finished_rows_leave_and_stop_being_computed(pipe):
    """Budgets of 3 and 40 tokens (blocks of 4): once the short one is done, every later
    block computes one row; the short request is answered right after its own blocks."""

    async def main():
        b = Batcher(pipe, window=0.5)  # both start together
        try:
            short, long = text_job("Open the file", 0, 3), text_job("A list of", 2, 40)
            b.submit(short)
            b.submit(long)
            s = await result(short)
            blocks_when_short_done = b.stats["blocks"]
            return s, await result(long), blocks_when_short_done, dict(b.stats)
        finally:
            b.close()

    [s], [long], at, stats = asyncio.run(main())
    assert s.text == solo(pipe, "Open the file", 0, 3)
    assert long.text == solo(pipe, "A list of", 2, 40)
    assert stats["batches"] == 1 and stats["joined"] == 0
    assert at <= 2 < stats["blocks"]  # short is answered while long still runs
    # 2 rows for the short one's blocks, then 1: rows computed = blocks + short's blocks
    assert stats["row_blocks"] == stats["blocks"] + at


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(pipe):
    """max_batch 1: a second request waits while the first runs; the first's client goes
    away, its row leaves at the next block and the waiting request takes the slot in the
    same running batch, with its solo output."""

    async def main():
        b = Batcher(pipe, max_batch=1)
        try:
            first = text_job("Return the number of", 3, 48, steps=32)  # runs a while
            b.submit(first)
            await first_block(first)
            waiting = text_job("Open the file", 1, 9, steps=32)
            b.submit(waiting)
            await asyncio.sleep(0.05)
            assert b.snapshot()["waiting"] == 1  # no free slot: it waits
            b.cancel(first)
            return await result(waiting), dict(b.stats)
        finally:
            b.close()

    [u], stats = asyncio.run(main())
    assert u.text == solo(pipe, "Open the file", 1, 9, steps=32)
    assert stats["cancelled"] == 1 and stats["batches"] == 1 and stats["joined"] == 1
    assert stats["largest_batch"] == 1 and stats["abandoned_batches"] == 0


def test_a_bad_joiner_is_refused_alone(pipe):
    """A joiner whose prompt and budget overflow the context gets a 400; the running request
    is unaffected."""

    async def main():
        b = Batcher(pipe)
        try:
            long = text_job("A list of", 2, 24)
            b.submit(long)
            await first_block(long)
            bad = text_job("word " * 40, 0, 40)
            b.submit(bad)
            kind, err = await asyncio.wait_for(bad.events.get(), 60)
            return kind, err, await result(long)
        finally:
            b.close()

    kind, err, [long] = asyncio.run(main())
    assert kind == "error" and err.status == 400 and "too long" in err.message
    assert long.text == solo(pipe, "A list of", 2, 24)
