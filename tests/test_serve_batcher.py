"""The server's batcher on the tiny unified model, in process: requests arriving together run as
one batch and each still gets its solo output; timeouts, cancellation and a full queue."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from unified.apps.batcher import Batcher, Job, QueueFull
from unified.apps.pipeline import UnifiedPipeline
from unified.generate import GenerationConfig, ImageGenerationConfig


@pytest.fixture(scope="module")
def pipe(tiny_unified):
    return UnifiedPipeline.from_model(tiny_unified)


def text_job(prompt: str, seed: int, budget: int = 8, steps: int = 2, timeout: float = 60.0,
             temperature: float = 0.0) -> Job:
    gen = GenerationConfig(max_new_tokens=budget, steps=steps, seed=seed,
                           temperature=temperature)
    return Job("text", gen, [prompt], [seed], prompt_tokens=8, timeout=timeout)


async def result(job: Job, timeout: float = 120.0):
    """The job's final row updates (or its ApiError)."""
    last = {}
    while True:
        kind, payload = await asyncio.wait_for(job.events.get(), timeout)
        if kind == "error":
            return payload
        if kind == "rows":
            last.update({u.row: u for u in payload})
        if kind == "images":
            return payload
        if kind == "done":
            return [last[r] for r in sorted(last)]


def test_requests_arriving_together_share_a_batch_and_keep_their_solo_output(pipe):
    asks = [("Return the number of", 3, 4), ("Open the file", 1, 8), ("A", 7, 12)]

    async def main():
        b = Batcher(pipe, window=0.3)
        try:
            jobs = [text_job(p, s, n) for p, s, n in asks]
            jobs.append(text_job("Open the file", 1, 8, temperature=1.0))  # another key
            for j in jobs:
                b.submit(j)
            return await asyncio.gather(*map(result, jobs)), dict(b.stats)
        finally:
            b.close()

    outs, stats = asyncio.run(main())
    assert stats["batches"] == 2 and stats["largest_batch"] == 3 and stats["rows"] == 4
    for (p, seed, budget), [u] in zip(asks, outs):
        assert u.text == pipe.generate_text(p, max_new_tokens=budget, steps=2, seed=seed).text
        assert u.tokens == budget and u.finish == "length"  # EOS is unlikely in the tiny model
    assert outs[3][0].text == pipe.generate_text("Open the file", max_new_tokens=8, steps=2,
                                                 seed=1, temperature=1.0).text


def test_images_of_a_batch_equal_their_solo_images(pipe):
    async def main():
        b = Batcher(pipe, window=0.3)
        try:
            jobs = [Job("image", ImageGenerationConfig(steps=2, seed=s), [p], [s])
                    for p, s in [("a red circle", 5), ("a blue square", 2)]]
            for j in jobs:
                b.submit(j)
            return await asyncio.gather(*map(result, jobs)), dict(b.stats)
        finally:
            b.close()

    outs, stats = asyncio.run(main())
    assert stats["batches"] == 1 and stats["rows"] == 2
    for (p, s), [image] in zip([("a red circle", 5), ("a blue square", 2)], outs):
        alone = pipe.text_to_image(p, steps=2, seed=s).images[0]
        assert np.abs(np.asarray(image, np.int16) - np.asarray(alone, np.int16)).max() <= 1


def test_timeouts_cancellation_and_a_full_queue(pipe):
    async def main():
        b = Batcher(pipe, max_queue=1, window=0.0)
        try:
            late = text_job("Open the file", 0, timeout=0.0)  # expired before it can start
            b.submit(late)
            err = await result(late)
            assert err.status == 504 and err.code == "timeout"

            long = text_job("A", 0, budget=60, steps=32)  # many blocks: runs a while
            b.submit(long)
            kind, _ = await asyncio.wait_for(long.events.get(), 60)
            assert kind == "rows"  # its first block is out: it is running
            waiting = text_job("Open the file", 2)
            b.submit(waiting)
            with pytest.raises(QueueFull) as full:
                b.submit(text_job("Open the file", 3))
            assert full.value.status == 429
            b.cancel(long)  # the client went away: the batch stops at the next block
            [u] = await result(waiting)
            assert u.text == pipe.generate_text("Open the file", max_new_tokens=8, steps=2,
                                                seed=2).text
            return dict(b.stats)
        finally:
            b.close()

    stats = asyncio.run(main())
    assert stats["timeouts"] == 1 and stats["cancelled"] == 1
    assert stats["abandoned_batches"] == 1 and stats["batches"] == 2
