"""What a training run logs (rank 0): one JSON line per logged step in `metrics.jsonl`,
TensorBoard scalars, the progress bar and a console line.

Losses are averaged over the logging window (every step since the last log, not just the
last one). A resumed run logs no step twice: `metrics.jsonl` is cut back to the checkpoint's
step and TensorBoard purges the events after it (`purge_step`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("cola.train")


class Monitor:
    def __init__(self, out: Path, stage: int, step: int, bar=None) -> None:
        """`step`: the step the run starts from (its checkpoint's); later records of an
        earlier attempt are dropped from metrics.jsonl and purged from TensorBoard."""
        self.stage, self.bar = stage, bar
        self.path = Path(out) / "metrics.jsonl"
        self._trim(step)
        self.file = self.path.open("a")
        self.writer = self._tensorboard(Path(out) / "tensorboard", step)
        self.window: dict[str, list[float]] = {}

    def _trim(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    @staticmethod
    def _tensorboard(folder: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; tolerate a trimmed install
            log.warning("tensorboard is not installed: no event files are written")
            return None
        # events of steps after the checkpoint were written by the attempt that died
        return SummaryWriter(str(folder), purge_step=step + 1 if step > 0 else None)

    def add(self, values: dict[str, float]) -> None:
        """One step's loss values (averaged into the next logged record)."""
        for k, v in values.items():
            acc = self.window.setdefault(k, [0.0, 0])
            acc[0] += float(v)
            acc[1] += 1

    def log(self, step: int, extra: dict) -> dict:
        """Write the window's means plus `extra` (lr, throughput, counts) for `step`."""
        rec = {"step": step, **{k: s / n for k, (s, n) in self.window.items()},
               "window": max((n for _, n in self.window.values()), default=0), **extra}
        self.window = {}
        self.write(rec, prefix=f"stage{self.stage}")
        if self.bar is not None:
            self.bar.set_postfix({k: f"{rec[k]:.3g}" for k in rec
                                  if k in ("loss", "recon", "acc", "fm", "ref_kl")})
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in rec.items()))
        return rec

    def write(self, rec: dict, prefix: str) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, rec["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
