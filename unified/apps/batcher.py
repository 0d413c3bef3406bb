"""Dynamic batching for the server: concurrent requests of the same task and knobs run as ONE
batched generation on one worker thread.

A `Job` is one HTTP request: one or more rows (its prompts times `n`), its own seeds, its own
token budget. The worker takes the oldest waiting job, waits `window` seconds when it was idle
(so requests arriving together form one batch), adds every waiting job with the same `key` (the
knobs a batch shares: task, steps, guidance, shift, sampler, temperature, top-k, top-p) up to
`max_batch` rows, and runs them. Text is generated block by block: after every block each job
gets its rows' text so far (cut at its own budget) and leaves when its rows are done; the batch
stops when no job is left (finished, cancelled by a client disconnect, or timed out). Every row
draws its noise and tokens from its own seed (unified.generate.row_generators), so a request's
output does not depend on its batch mates. Jobs join only at batch start (dynamic batching, not
continuous batching: a job arriving mid-batch waits for the next one).

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
                 window: float = 0.02):
        self.pipe, self.model = pipe, pipe.model
        self.max_batch, self.max_queue, self.window = max_batch, max_queue, window
        self.context = self.model.vae.config.max_len
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.running: list[Job] = []
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "jobs": 0, "cancelled": 0,
                      "timeouts": 0, "abandoned_batches": 0}
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
        """The next batch: the oldest live job and every compatible waiting one."""
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
                if wait > 0 and not self.running:  # idle: let its batch mates arrive
                    self._cv.wait(wait)
                    continue
                batch, rows = [], 0
                budget = tokens = 0
                for job in list(self._waiting):
                    if job.key != first.key or (batch and rows + job.rows > self.max_batch):
                        continue
                    b, t = max(budget, job.budget), max(tokens, job.prompt_tokens)
                    if batch and job.kind != "image" and t + b > self.context:
                        continue  # its prompt or budget would overflow a batch mate's context
                    batch.append(job)
                    rows, budget, tokens = rows + job.rows, b, t
                    self._waiting.remove(job)
                self.running = batch
                return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            start = time.monotonic()
            for job in batch:
                job.started = start
            rows = sum(j.rows for j in batch)
            self.stats["batches"] += 1
            self.stats["jobs"] += len(batch)
            self.stats["rows"] += rows
            self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
            try:
                if batch[0].kind == "image":
                    self._run_images(batch)
                else:
                    self._run_text(batch)
            except _Abandoned:
                self.stats["abandoned_batches"] += 1
            except ValueError as e:  # an input the checks let through: the user's error
                for job in batch:
                    job.push("error", ApiError(400, str(e)))
            except Exception as e:  # noqa: BLE001 - keep serving; the requests learn why
                log.exception("batch of %d rows failed", rows)
                for job in batch:
                    job.push("error", ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                               "server_error"))
            finally:
                with self._cv:
                    self.running = []
            log.debug("batch of %d jobs / %d rows in %.2f s", len(batch), rows,
                      time.monotonic() - start)

    def _all_closed(self, batch: list[Job]) -> bool:
        """Time out expired jobs; True when no job of the batch is left."""
        now = time.monotonic()
        for job in batch:
            if not job.closed and now > job.deadline:
                self._expire(job, "while generating")
        return all(j.closed for j in batch)

    def _run_text(self, batch: list[Job]) -> None:
        from tasks import image_to_text, text_to_text

        prompts = [p for j in batch for p in j.prompts]
        seeds = [s for j in batch for s in j.seeds]
        gen = dataclasses.replace(batch[0].gen, seed=seeds[0],
                                  max_new_tokens=max(j.budget for j in batch))
        if batch[0].kind == "caption":
            x = torch.cat([j.images for j in batch]).to(self.model.vae.device)
            questions = [q for j in batch for q in j.questions]
            it = image_to_text.stream(self.model, x, questions, prompts, gen, seeds=seeds)
            prefixes = prompts
        else:
            it = text_to_text.stream(self.model, prompts, gen, seeds=seeds)
            prefixes = [""] * len(prompts)
        tok = self.model.tokenizer
        ids: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        try:
            for out in it:
                at = 0
                for job in batch:
                    updates = []
                    for i in range(job.rows):
                        r = at + i
                        if done[r] or job.closed:
                            continue
                        ids[r].extend(out.new_ids[r][: job.budget - len(ids[r])])
                        finish = "length" if len(ids[r]) >= job.budget else \
                            "stop" if out.finished[r] else None
                        done[r] = finish is not None
                        text = prefixes[r] + tok.decode(ids[r], skip_special_tokens=True)
                        updates.append(RowUpdate(i, text, len(ids[r]), finish))
                    if updates:
                        job.push("rows", updates)
                    if all(done[at:at + job.rows]):
                        job.push("done")
                    at += job.rows
                if self._all_closed(batch):
                    if not all(done):  # the rest left (went away or timed out): stop early
                        raise _Abandoned
                    break
        finally:
            it.close()
        for job in batch:  # the engine stopped (every row at EOS or the budget)
            job.push("done")

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


class _Abandoned(Exception):
    """Every job of the running batch has gone: stop computing it."""
