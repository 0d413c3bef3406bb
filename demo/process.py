"""Run the demo server in a child process (`python -m unified.apps.cli demo ...`) and wait until it
answers: for the tests, the load benchmark and the browser check.

    with DemoProcess(checkpoint="demo/checkpoint") as url:
        Client(url).predict("The function returns", api_name="/generate_text")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoProcess:
    """`cola demo` on 127.0.0.1 and a free port, started on enter and stopped on exit.

    `threads` caps torch's threads in the child (COLA_THREADS); its output goes to `log_path`
    (`.log_text()` reads it, and a failed start raises with its tail)."""

    def __init__(self, checkpoint: str | Path | None = None, *, port: int | None = None,
                 threads: int = 1, concurrency: int = 2, max_queue: int = 64,
                 timeout: float = 120.0, extra_args: list[str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.cmd = [sys.executable, "-m", "unified.apps.cli", "demo", "--port", str(self.port),
                    "--concurrency", str(concurrency), "--max-queue", str(max_queue),
                    *(["--checkpoint", str(checkpoint)] if checkpoint else []),
                    *(extra_args or [])]
        self.threads, self.timeout = threads, timeout
        self.log_path = Path(tempfile.mkstemp(prefix="cola-demo-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> str:
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
               "COLA_THREADS": str(self.threads), "OMP_NUM_THREADS": str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the demo exited with code {self.proc.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "gradio_api/info", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the demo did not answer within {self.timeout:.0f} s:\n"
                           f"{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
