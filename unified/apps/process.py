"""Run `cola serve` in a child process on a free loopback port and wait until it answers: for
the tests and the load benchmark.

    with ServeProcess(api_key="k") as url:          # url = http://127.0.0.1:PORT/
        OpenAI(base_url=url + "v1", api_key="k").models.list()
"""

from __future__ import annotations

from pathlib import Path

from demo.process import DemoProcess, free_port

__all__ = ["ServeProcess", "free_port"]


class ServeProcess(DemoProcess):
    """`cola serve` started on enter and stopped on exit (see demo.process.DemoProcess):
    `concurrency` is --max-batch, `max_queue` is --max-queue; `api_key` is --api-key."""

    ready_path = "health"

    def __init__(self, checkpoint: str | Path | None = None, *, api_key: str | None = None,
                 max_batch: int = 16, max_queue: int = 64, threads: int = 1,
                 timeout: float = 120.0, extra_args: list[str] | None = None):
        extra = [*(["--api-key", api_key] if api_key else []), *(extra_args or [])]
        super().__init__(checkpoint, threads=threads, concurrency=max_batch,
                         max_queue=max_queue, timeout=timeout, extra_args=extra)

    def command(self, concurrency: int, max_queue: int) -> list[str]:
        return ["serve", "--max-batch", str(concurrency), "--max-queue", str(max_queue)]
