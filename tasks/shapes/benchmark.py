"""The shapes benchmark (`cola eval shapes`): one unified checkpoint, all three tasks, scored
exactly on held-out scenes (tasks/shapes/evaluate.py).

- image-to-text: the caption generated for each image must parse to exactly its scene;
- text-to-image: the image generated from each scene's caption must analyse back to it;
- image VAE: PSNR of reconstructions, and the share whose reconstruction still analyses to
  the scene (the ceiling of text-to-image accuracy);
- questions: every question `tasks.shapes.world.questions` asks of the first `questions` scenes,
  answered by image_to_text, right when the answer is exactly the expected words (per kind:
  how_many, what_color, what_shape, how_big, where_is);
- caption completion (text-to-text, no image): each of the first `completions` scenes' caption
  cut after its first colour word ("two objects: a small red") is continued by the text prior
  alone, right when prompt + continuation is a whole valid caption (`parse_caption`): the
  prompt's count, size and colour are kept and the rest completed (issue 14: prompt following
  in the register the model knows);
every figure also split into scenes with a held-out attribute combination (never seen in
training: composition) and scenes of seen combinations.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tasks import image_to_text, text_to_image
from tasks.shapes.evaluate import (
    analyse_image,
    mean_scores,
    question_kind,
    score_answer,
    score_caption,
    score_image,
)
from tasks.shapes.world import COLORS, Scene, caption, parse_caption, questions
from unified.data.streams import image_text_samples
from unified.generate import GenerationConfig, ImageGenerationConfig, TextGenerator
from unified.model import ColaModel
from vaes.image_vae import psnr


def load_scenes(data: str | Path, n: int, image_size: int = 32):
    """(images [n, 3, S, S] in [-1, 1], scenes, held-out flags) of the first n records."""
    images, scenes, heldout = [], [], []
    for rec in image_text_samples(str(data), image_size=image_size, resample=False):
        if not rec.get("meta"):
            continue
        images.append(rec["image"])
        scenes.append(Scene.from_json(rec["meta"]))
        heldout.append(bool(rec["meta"].get("heldout_combo", False)))
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"no shapes records (with scene json) in {data}")
    return torch.stack(images), scenes, heldout


def _split(scores: list[dict], heldout: list[bool], prefix: str) -> dict:
    out = {f"{prefix}_{k}": v for k, v in mean_scores(scores).items() if k != "n"}
    for name, flag in (("heldout_combo", True), ("seen_combo", False)):
        part = [s for s, h in zip(scores, heldout) if h == flag]
        if part:
            out[f"{prefix}_exact_{name}"] = mean_scores(part)["exact"]
    return out


def item_seeds(seed: int, start: int, n: int) -> list[int]:
    """One seed per evaluated item (seed + its index): every item draws its own noise, so the
    items are independent samples and a figure does not depend on the batch size. With
    `rerank` K, item i uses seeds seed + i .. seed + i + K - 1; they may overlap a neighbour's,
    which only correlates two items' candidate sets."""
    return [seed + start + j for j in range(n)]


@torch.no_grad()
def evaluate_questions(model: ColaModel, images: torch.Tensor, scenes: list[Scene],
                       gen: GenerationConfig, batch: int = 50, rerank: int = 0) -> dict:
    """Share of right answers to every question of each scene, per kind and in all
    (`qa_<kind>`, `qa_all`, `qa_questions`); with `rerank` = K > 1 also the answers chosen
    among K samples by the prior's own answer flow loss (`qa_rerank<K>_<kind>`, ...)."""
    asked = [(i, q, a) for i, s in enumerate(scenes) for q, a in questions(s)]
    ways = {"qa": 0, **({f"qa_rerank{rerank}": rerank} if rerank > 1 else {})}
    right = {name: defaultdict(list) for name in ways}
    for k in range(0, len(asked), batch):
        part = asked[k:k + batch]
        x = images[[i for i, _, _ in part]].to(model.vae.device)
        for name, r in ways.items():
            answers = image_to_text.generate(model, x, [q for _, q, _ in part], gen=gen,
                                             rerank=r, seeds=item_seeds(gen.seed, k, len(part)))
            for (_, q, a), got in zip(part, answers):
                right[name][question_kind(q)].append(score_answer(got, a))
    report = {}
    for name, kinds in right.items():
        report.update({f"{name}_{kind}": sum(v) / len(v) for kind, v in sorted(kinds.items())})
        every = [r for v in kinds.values() for r in v]
        report[f"{name}_all"] = sum(every) / max(1, len(every))
    report["qa_questions"] = len(asked)
    return report


def completion_prompt(text: str) -> str:
    """A caption cut after its first colour word: "two objects: a small red circle at ..." ->
    "two objects: a small red"."""
    words = text.split()
    cut = next(i for i, w in enumerate(words) if w in COLORS)
    return " ".join(words[:cut + 1])


def completion_text(continuation: str) -> str:
    """A continuation up to its first period or newline (the end of one caption)."""
    return continuation.split("\n")[0].split(".")[0]


@torch.no_grad()
def evaluate_completions(model: ColaModel, scenes: list[Scene], gen: GenerationConfig,
                         batch: int = 50) -> dict:
    """Share of caption prefixes (`completion_prompt`) the text prior alone completes into a
    valid caption (`completion_valid`), with `completion_prompts` and two examples."""
    engine, ok, examples = TextGenerator(model), [], []
    prompts = [completion_prompt(caption(s)) for s in scenes]
    for k in range(0, len(prompts), batch):
        part = prompts[k:k + batch]
        outs = engine.generate(part, gen, seeds=item_seeds(gen.seed, k, len(part)))
        for p, o in zip(part, outs):
            full = p + completion_text(o)
            ok.append(parse_caption(full, model.image_size) is not None)
            if len(examples) < 2:
                examples.append((p, o))
    return {"completion_valid": sum(ok) / max(1, len(ok)), "completion_prompts": len(ok),
            "completion_examples": examples}


@torch.no_grad()
def evaluate_shapes(model: ColaModel, data: str | Path, n: int = 500, batch: int = 50, *,
                    text_gen: GenerationConfig | None = None,
                    image_gen: ImageGenerationConfig | None = None, rerank: int = 0,
                    questions: int = 100, completions: int = 0, progress: bool = True) -> dict:
    """Every figure of the shapes benchmark on the first `n` records of `data`; with
    `rerank` = K > 1 also the captions chosen among K samples by the text-to-image scorer
    (`caption_rerank_*`), beside the plain first samples (`caption_*`), and the answers
    chosen by their own flow loss (`qa_rerank_*`); the questions of the
    first `questions` scenes (0: none); the text-only caption completions of the first
    `completions` scenes (0: none)."""
    text_gen = text_gen or GenerationConfig(max_new_tokens=image_to_text.MAX_NEW_TOKENS)
    image_gen = image_gen or ImageGenerationConfig()
    images, scenes, heldout = load_scenes(data, n, model.image_size)
    dev = model.vae.device
    report: dict = {"scenes": len(scenes), "heldout_combo_scenes": sum(heldout)}
    cap_scores, rerank_scores, img_scores, recon_ok, psnrs, examples = [], [], [], [], [], []
    t_cap = t_img = t_rerank = 0.0
    bar = tqdm(total=len(scenes), desc="shapes eval", disable=not progress)
    for i in range(0, len(scenes), batch):
        x, sc = images[i:i + batch].to(dev), scenes[i:i + batch]
        t0 = time.perf_counter()
        caps = image_to_text.generate(model, x, gen=text_gen,
                                      seeds=item_seeds(text_gen.seed, i, len(sc)))
        t1 = time.perf_counter()
        if rerank > 1:
            best = image_to_text.generate(model, x, gen=text_gen, rerank=rerank,
                                          seeds=item_seeds(text_gen.seed, i, len(sc)))
            rerank_scores += [score_caption(c, s) for c, s in zip(best, sc)]
            t_rerank += time.perf_counter() - t1
            t1 = time.perf_counter()
        out = text_to_image.generate(model, [caption(s) for s in sc], image_gen,
                                     seeds=item_seeds(image_gen.seed, i, len(sc)))
        t2 = time.perf_counter()
        t_cap, t_img = t_cap + t1 - t0, t_img + t2 - t1
        recon = model.decode_image_tokens(model.encode_images(x))
        psnrs += psnr(recon.float(), x.float()).tolist()
        for j, s in enumerate(sc):
            cap_scores.append(score_caption(caps[j], s))
            img_scores.append(score_image(out.images[j].permute(1, 2, 0).cpu().numpy(), s,
                                          value_range=(-1, 1)))
            recon_ok.append(analyse_image(recon[j].permute(1, 2, 0).cpu().numpy(),
                                          value_range=(-1, 1)) == s)
            if len(examples) < 5:
                examples.append((caps[j], caption(s)))
        bar.update(len(sc))
    bar.close()
    report.update(_split(cap_scores, heldout, "caption"))
    if rerank_scores:
        report.update(_split(rerank_scores, heldout, f"caption_rerank{rerank}"))
        report[f"caption_rerank{rerank}_seconds_per_image"] = t_rerank / len(scenes)
    report.update(_split(img_scores, heldout, "image"))
    report["image_vae_psnr_db"] = sum(psnrs) / len(psnrs)
    report["image_vae_recon_exact"] = sum(recon_ok) / len(recon_ok)
    report["caption_seconds_per_image"] = t_cap / len(scenes)
    report["image_seconds_per_image"] = t_img / len(scenes)
    if questions > 0:
        k = min(questions, len(scenes))
        answer_gen = dataclasses.replace(text_gen, max_new_tokens=16)  # one block
        report.update(evaluate_questions(model, images[:k], scenes[:k], answer_gen, batch,
                                         rerank))
    if completions > 0:
        report.update(evaluate_completions(model, scenes[:completions],
                                           dataclasses.replace(text_gen, max_new_tokens=32),
                                           batch))
    report["examples"] = examples
    return report
