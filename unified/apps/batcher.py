"""Batching for the server: concurrent requests of the same task and knobs run as ONE
batched generation on one worker thread.

A `Job` is one HTTP request: one or more rows (its prompts times `n`), its own seeds, its own
token budget. Jobs merge only when their `key` agrees (the knobs a batch shares: task, steps,
guidance, shift, sampler, temperature, top-k, top-p).

Text (completions, chat, captions) is batched CONTINUOUSLY at block boundaries
(unified/continuous.py): the oldest waiting job starts a batch; before every block, waiting
jobs with the batch's key join it (up to `max_batch` rows, first come first served: a job of
another key at the head of the queue stops the joining, so the batch drains and that job runs
next), and rows that are finished (EOS or their budget), whose client went away or whose
request timed out leave it, so the rows that stay stop paying for them. After every block
each job gets its rows' text so far. Images run as one batch of the compatible jobs waiting
when it starts (`window`: how long an idle server waits for batch mates; 0 by default, as
text jobs join at the next block anyway). A row's prefix is encoded alone and its noise and
tokens come from its own seed, so a request's output depends on its own inputs only, never
on what it is batched with or when it joined.

Results go back to the request's asyncio loop as events on `job.events`:
("rows", [RowUpdate]), ("images", [PIL.Image]), ("error", ApiError), ("done", None).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from unified.apps.errors import ApiError
from unified.continuous import Slot, TextBatch
from unified.generate import GenerationConfig, ImageGenerationConfig

log = logging.getLogger("cola.serve")


@dataclass
class RowUpdate:
    row: int  # the row within its job (the choice index)
    text: str  # the row's whole text so far (a caption's prefix included)
    tokens: int  # tokens generated so far
    finish: str | None  # "stop" (end of text), "length" (budget), or None (more to come)


@dataclass(eq=False)
class Job:
    """One request. `kind`: "text" (continue prompts), "caption" (answer about images) or
    "image" (draw prompts). Rows: prompts[r] (a caption's prefix), seeds[r], and for captions
    images[r] and questions[r]."""

    kind: str
    gen: GenerationConfig | ImageGenerationConfig
    prompts: list[str]
    seeds: list[int]
    images: torch.Tensor | None = None
    questions: list[str | None] | None = None
    prompt_tokens: int = 0  # the longest row's prompt, in tokens (the context check)
    prompt_usage: int = 0  # the request's prompt tokens, for `usage`
    timeout: float = 300.0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    closed: bool = False  # finished, failed or cancelled: no more events
    deadline: float = 0.0
    started: float = 0.0  # when its batch started (0 while waiting)

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def budget(self) -> int:
        return getattr(self.gen, "max_new_tokens", 0)

    @property
    def key(self) -> tuple:
        """Jobs merge only when these agree (one GenerationConfig for the batch)."""
        g = dataclasses.replace(self.gen, seed=0)
        if isinstance(g, GenerationConfig):
            g = dataclasses.replace(g, max_new_tokens=1)  # the batch runs to the largest budget
        return self.kind, g

    def push(self, kind: str, payload=None) -> None:
        if self.closed:
            return
        if kind in ("done", "error"):
            self.closed = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the request's loop is gone (server shutting down)
            self.closed = True


class QueueFull(ApiError):
    def __init__(self, max_queue: int):
        super().__init__(429, f"the server is busy: {max_queue} requests are already waiting; "
                              f"retry later", "rate_limit_error", code="queue_full")


class Batcher:
    """One worker thread running batches of compatible jobs; a bounded waiting queue."""

    def __init__(self, pipe, *, max_batch: int = 16, max_queue: int = 64,
                 window: float = 0.0, use_cache: bool = True):
        self.pipe, self.model = pipe, pipe.model
        self.max_batch, self.max_queue, self.window = max_batch, max_queue, window
        self.use_cache = use_cache  # False: the slow uncached reference engine (tests)
        self.context = self.model.vae.config.max_len
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.running: list[Job] = []
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "jobs": 0, "cancelled": 0,
                      "timeouts": 0, "abandoned_batches": 0, "joined": 0, "blocks": 0,
                      "row_blocks": 0}
        self._thread = threading.Thread(target=self._loop, name="cola-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ request side
    def submit(self, job: Job) -> None:
        """Queue a job (from the event loop); QueueFull (HTTP 429) when `max_queue` wait."""
        job.loop = asyncio.get_running_loop()
        job.deadline = time.monotonic() + job.timeout
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job from the queue, or from its running batch (the
        batch stops computing once no job in it is left)."""
        with self._cv:
            self.stats["cancelled"] += not job.closed
            job.closed = True
            if job in self._waiting:
                self._waiting.remove(job)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def snapshot(self) -> dict:
        with self._cv:
            return {**self.stats, "waiting": len(self._waiting),
                    "running": sum(not j.closed for j in self.running)}

    # ------------------------------------------------------------------ worker side
    def _expire(self, job: Job, where: str) -> None:
        self.stats["timeouts"] += 1
        job.push("error", ApiError(504, f"the request timed out after {job.timeout:g} s "
                                        f"({where})", "timeout_error", code="timeout"))

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest live job, and for images every compatible waiting one
        (text jobs join a running text batch between blocks: `_joiners`)."""
        with self._cv:
            while True:
                if self._stop:
                    return None
                now = time.monotonic()
                for job in list(self._waiting):
                    if job.closed or now > job.deadline:
                        self._waiting.remove(job)
                        if not job.closed:
                            self._expire(job, "waiting in the queue")
                if not self._waiting:
                    self._cv.wait()
                    continue
                first = self._waiting[0]
                wait = first.deadline - first.timeout + self.window - now  # since it arrived
                if wait > 0 and self.max_batch > 1:  # idle: let its batch mates arrive
                    self._cv.wait(wait)
                    continue
                if first.kind != "image":
                    self._waiting.popleft()
                    self.running = [first]
                    return self.running
                batch, rows = [], 0
                for job in list(self._waiting):
                    if job.key != first.key or (batch and rows + job.rows > self.max_batch):
                        continue
                    batch.append(job)
                    rows += job.rows
                    self._waiting.remove(job)
                self.running = batch
                return batch

    def _joiners(self, key: tuple, free: int) -> list[Job]:
        """Waiting jobs that join the running text batch now: the oldest ones with its key
        that fit in `free` rows, up to the first one that does not (first come, first
        served: a job of another key stops the joining, the batch drains and it runs)."""
        out = []
        with self._cv:
            now = time.monotonic()
            for job in list(self._waiting):
                if job.closed or now > job.deadline:
                    continue  # _take drops and answers it
                if job.key != key or job.rows > free:
                    break
                self._waiting.remove(job)
                out.append(job)
                free -= job.rows
            self.running.extend(out)
        return out

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            start = time.monotonic()
            rows = sum(j.rows for j in batch)
            self.stats["batches"] += 1
            try:
                if batch[0].kind == "image":
                    self._count(batch)
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
                    self._run_images(batch)
                else:
                    self._run_text(batch[0])
            except _Abandoned:
                self.stats["abandoned_batches"] += 1
            except ValueError as e:  # an input the checks let through: the user's error
                for job in batch:
                    job.push("error", ApiError(400, str(e)))
            except Exception as e:  # noqa: BLE001 - keep serving; the requests learn why
                log.exception("batch of %d rows failed", rows)
                for job in self.running:
                    job.push("error", ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                               "server_error"))
            finally:
                with self._cv:
                    self.running = []
            log.debug("batch of %d jobs in %.2f s", len(batch), time.monotonic() - start)

    def _count(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            job.started = now
        self.stats["jobs"] += len(jobs)
        self.stats["rows"] += sum(j.rows for j in jobs)

    def _all_closed(self, batch: list[Job]) -> bool:
        """Time out expired jobs; True when no job of the batch is left."""
        now = time.monotonic()
        for job in batch:
            if not job.closed and now > job.deadline:
                self._expire(job, "while generating")
        return all(j.closed for j in batch)

    def _run_text(self, first: Job) -> None:
        """Continuous batching: `first` starts a TextBatch; between blocks compatible waiting
        jobs join (up to `max_batch` rows) and finished, cancelled or timed-out rows leave.
        The batch ends when no row is left and no compatible job waits."""
        batch = TextBatch(self.model, dataclasses.replace(first.gen, max_new_tokens=1),
                          use_cache=self.use_cache)
        live: list[_Running] = []
        joining, cut, blocks = [first], False, 0
        while True:
            for run in live:
                if not run.job.closed and time.monotonic() > run.job.deadline:
                    self._expire(run.job, "while generating")
            gone = [r for r in live if r.job.closed]  # cancelled or timed out: leave now
            cut = cut or bool(gone)
            batch.leave([s for r in gone for s in r.slots])
            live = [r for r in live if not r.job.closed]
            joining += self._joiners(first.key, self.max_batch - len(batch)
                                     - sum(j.rows for j in joining))
            for job in joining:
                run = self._admit(batch, job)
                if run is not None:
                    live.append(run)
                    self.stats["joined"] += blocks > 0
            joining = []
            if not len(batch):
                break
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            outs = batch.step()
            blocks, cut = blocks + 1, False
            self.stats["blocks"] += 1
            self.stats["row_blocks"] += len(outs)
            for run in live:
                run.report(outs, self.model.tokenizer)
            live = [r for r in live if not r.finished]
            batch.leave([s for s, _ in outs if s.finished])  # their slots are free now
        if cut:
            raise _Abandoned

    def _admit(self, batch: TextBatch, job: Job) -> _Running | None:
        """The job's rows join the batch (its prefixes encoded); None when the job cannot run
        (it is answered 400 and none of its rows stays)."""
        self._count([job])
        conditions = [None] * job.rows
        try:
            if job.kind == "caption":
                from tasks.image_to_text import _conditions

                conditions = _conditions(self.model, job.images.to(self.model.vae.device),
                                         job.questions)
            slots = []
            for r in range(job.rows):
                slots.append(batch.add(job.prompts[r], job.seeds[r], job.budget, (job, r),
                                       conditions[r]))
        except ValueError as e:
            batch.leave(slots)
            job.push("error", ApiError(400, str(e)))
            return None
        return _Running(job, slots, [job.prompts[r] if job.kind == "caption" else ""
                                     for r in range(job.rows)])

    def _run_images(self, batch: list[Job]) -> None:
        from tasks import text_to_image
        from unified.apps.pipeline import to_pil

        prompts = [p for j in batch for p in j.prompts]
        seeds = [s for j in batch for s in j.seeds]
        gen = dataclasses.replace(batch[0].gen, seed=seeds[0])

        def on_step(_i: int, _steps: int) -> None:
            if self._all_closed(batch):
                raise _Abandoned

        out = text_to_image.generate(self.model, prompts, gen, seeds=seeds, on_step=on_step)
        images = to_pil(out.images)
        at = 0
        for job in batch:
            job.push("images", images[at:at + job.rows])
            job.push("done")
            at += job.rows


@dataclass(eq=False)
class _Running:
    """A job in the running text batch: its rows' slots and text prefixes (a caption's)."""

    job: Job
    slots: list[Slot]
    prefixes: list[str]
    finished: bool = False

    def report(self, outs: list[tuple[Slot, list[int]]], tok) -> None:
        """Push the job's rows computed this block; "done" once every row is."""
        if self.job.closed:  # cancelled or timed out meanwhile: it leaves before the next block
            return
        mine = {id(s) for s in self.slots}
        updates = []
        for slot, _new in outs:
            if id(slot) not in mine:
                continue
            r = slot.tag[1]
            finish = None
            if slot.finished:
                finish = "length" if len(slot.generated) >= slot.budget else "stop"
            text = self.prefixes[r] + tok.decode(slot.generated, skip_special_tokens=True)
            updates.append(RowUpdate(r, text, len(slot.generated), finish))
        if updates:
            self.job.push("rows", updates)
        if all(s.finished for s in self.slots):
            self.finished = True
            self.job.push("done")


class _Abandoned(Exception):
    """Every job of the running batch has gone: stop computing it."""
