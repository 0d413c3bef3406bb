"""Sample captions and images in TensorBoard during stage 2 (rank 0): every
`log_samples_every` steps (None: with each checkpoint; 0: off) the model with its EMA prior
captions `log_samples` fixed held-out images and draws images of the same held-out captions,
logged with add_image / add_text under "samples/". The held-out records (data.pairs_heldout,
center crop at image.size, as evaluation preprocesses) are read once; generation uses the
model's generation defaults and seed 0, so runs and steps are comparable. Training is left as
it was: the global RNG is forked and every module's train / eval mode restored.

The trainer imports no task: the captions and images come from its task mixture's
`preview(model, images, captions)` (tasks/__init__.py).
"""

from __future__ import annotations

import logging

import torch

from unified.data.records import image_text_samples
from unified.data.streams import SkipCounter

log = logging.getLogger("cola.train")


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
    """A markdown table (TensorBoard's text plugin renders markdown)."""
    clean = [tuple(c.replace("|", "\\|").replace("\n", " ") or " " for c in r) for r in rows]
    lines = [f"| # | {head[0]} | {head[1]} |", "|---|---|---|"]
    return "\n".join(lines + [f"| {i} | {a} | {b} |" for i, (a, b) in enumerate(clean)])


class SampleLog:
    def __init__(self) -> None:
        self.fixed: tuple[torch.Tensor, list[str]] | None = None
        self.warned = False

    def due(self, tr, step: int) -> bool:
        """Whether trainer `tr` logs samples at `step` (stage 2 with an image side and
        held-out image-text data; not under FSDP, whose prior is sharded)."""
        t = tr.tcfg
        every = t.ckpt_every if t.log_samples_every is None else t.log_samples_every
        model = tr.model
        return (every > 0 and step % every == 0 and tr.stage == 2 and t.log_samples > 0
                and tr.tasks is not None and bool(tr.cfg.data.pairs_heldout) and not tr.fsdp
                and getattr(model, "image_vae", None) is not None and model.prior is not None)

    def held_out(self, tr) -> tuple[torch.Tensor, list[str]]:
        """The fixed held-out images [n, 3, S, S] and their captions (read once)."""
        if self.fixed is None:
            d, n = tr.cfg.data, tr.tcfg.log_samples
            recs = image_text_samples(d.pairs_heldout, image_size=tr.cfg.image.size,
                                      skips=SkipCounter("sample log", d.max_bad_samples),
                                      same_on_all_ranks=True, caption_key=d.caption_key)
            got = [r for _, r in zip(range(n), recs)]
            self.fixed = (torch.stack([r["image"] for r in got]) if got else torch.zeros(0),
                          [r["caption"] for r in got])
        return self.fixed

    @torch.no_grad()
    def log(self, tr, writer, step: int) -> bool:
        """Generate and log the samples at `step` if due (rank 0 only); True when logged."""
        if writer is None or not self.due(tr, step):
            return False
        images, captions = self.held_out(tr)
        if not captions:
            if not self.warned:
                log.warning("no readable held-out image-text sample in data.pairs_heldout: "
                            "no sample images or texts in TensorBoard")
                self.warned = True
            return False
        model = tr.inference_model()  # the EMA prior when EMA is on
        modes = {m: m.training for m in (*tr.model.modules(), *model.modules())}
        dev = tr.device
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                model.eval()
                texts, drawn = tr.tasks.preview(model, images.to(dev), captions)
        except ValueError as e:  # e.g. a setting generation refuses: the run goes on
            log.warning("step=%d: no sample captions and images logged: %s", step, e)
            return False
        finally:
            for m, mode in modes.items():
                m.train(mode)
        to01 = lambda x: ((x.float().clamp(-1, 1) + 1) / 2).cpu()  # noqa: E731
        for i, (real, made) in enumerate(zip(images, drawn)):
            writer.add_image(f"samples/heldout_image/{i}", to01(real), step)
            writer.add_image(f"samples/drawn_from_caption/{i}", to01(made), step)
        writer.add_text("samples/captions_of_heldout_images",
                        _table(list(zip(texts, captions)), ("generated", "real caption")), step)
        writer.add_text("samples/images_drawn_from",
                        _table([(c, f"samples/drawn_from_caption/{i}")
                                for i, c in enumerate(captions)], ("caption", "image tag")), step)
        writer.flush()
        log.info("step=%d logged %d sample captions and images to TensorBoard", step,
                 len(captions))
        return True
