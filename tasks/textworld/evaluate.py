"""The text-world benchmark (`cola eval textworld`): a model continues held-out prompts and each
continuation is scored exactly (tasks/textworld/scorer.py), per task.

Works on a Cola model folder and on the AR / masked-diffusion baselines (unified/baselines.py),
all greedy where the model has a choice: Cola samples the flow from `seed` and decodes greedily;
the AR decodes greedily; the MDLM unmasks its most confident tokens (LLaDA, temperature 0).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.textworld.generator import TASKS, Problem, heldout_problems
from tasks.textworld.scorer import extract_answer, partial, score
from unified.baselines import ARModel, MDLMModel, prompt_ids


@dataclass(frozen=True)
class Decoding:
    """How answers are generated: Cola's ODE steps per block, CFG scale and starting noise std
    (`noise_scale`: 1 samples the flow, 0 follows it from the noise's mean, the flow's greedy
    decoding), the MDLM's denoising passes per block and block size, the noise seed, the batch
    size."""

    steps: int = 8
    guidance: float = 2.0
    noise_scale: float = 1.0
    mdlm_steps: int = 8
    mdlm_block: int = 16
    seed: int = 0
    batch: int = 32


def load_problems(data: str | Path, n: int, skips=None) -> list[Problem]:
    """The first n problems of text-world shards (their KEY.json); a bad record is skipped,
    logged and counted in `skips` (a unified.data.streams.SkipCounter)."""
    from unified.data.streams import SkipCounter, raw_samples

    skips = skips if skips is not None else SkipCounter("text-world shards")
    out = []
    for sample in raw_samples(str(data), handler=skips):
        try:
            out.append(Problem.from_json(json.loads(sample.get("json") or b"null")))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            e.url, e.key = sample.get("__url__"), sample.get("__key__")  # type: ignore[attr-defined]
            skips(e)
            continue
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no text-world records in {data}")
    return out


def problems_for_eval(data: str | Path | None, n: int, seed: int = 0,
                      skips=None) -> tuple[list[Problem], str]:
    """(problems, where they came from): shards when `data` exists, else the first n problems
    of the evaluation stream that `cola make-shards textworld` draws its held-out split from
    (the shards also leave out any problem whose prompt is in their training split)."""
    if data is not None and Path(data).exists():
        return load_problems(data, n, skips), str(data)
    return heldout_problems(n, seed), f"generated (evaluation stream of seed {seed})"


def answer_budget(tokenizer, problems: Iterable[Problem], margin: int = 2) -> int:
    """New tokens enough for the longest answer (with its leading space) plus `margin`."""
    return max(len(tokenizer.encode(" " + p.answer, add_special_tokens=False)) for p in problems) \
        + margin


@torch.no_grad()
def generate_answers(model, prompts: list[str], max_new_tokens: int, dec: Decoding) -> list[str]:
    """Continuations of `prompts` by a Cola model or an AR / MDLM baseline."""
    out: list[str] = []
    for i in range(0, len(prompts), dec.batch):
        part = prompts[i:i + dec.batch]
        if isinstance(model, ARModel):
            out.extend(model.generate(part, max_new_tokens, temperature=0.0, seed=dec.seed))
        elif isinstance(model, MDLMModel):
            out.extend(model.generate(part, max_new_tokens, block_size=dec.mdlm_block,
                                      steps=dec.mdlm_steps, temperature=0.0, seed=dec.seed))
        else:
            from unified.generate import GenerationConfig, TextGenerator

            gen = GenerationConfig(max_new_tokens=max_new_tokens, steps=dec.steps,
                                   guidance=dec.guidance, temperature=0.0, seed=dec.seed,
                                   noise_scale=dec.noise_scale)
            out.extend(TextGenerator(model).generate(part, gen))
    return out


def check_fits(model, problems: list[Problem], max_new_tokens: int) -> None:
    """Fail early, naming the problem, when a prompt plus its answer exceeds the context."""
    context = model.vae.config.max_len if hasattr(model, "vae") else None
    if context is None:
        return
    for p in problems:
        n = len(prompt_ids(model.tokenizer, p.prompt)) + max_new_tokens
        if n > context:
            raise ValueError(f"a {p.task} prompt needs {n} tokens with its answer, more than the "
                             f"model's context of {context} tokens: {p.prompt[:50]!r}...")


def evaluate_textworld(model, problems: list[Problem], dec: Decoding | None = None,
                       n_examples: int = 2) -> dict:
    """Exact match per task (`exact_<task>`, `n_<task>`) and over all (`exact_all`); partial
    credit (`partial_<task>`, `partial_all`: tasks.textworld.scorer.partial), which shows
    progress before whole answers come right; and a few (task, prompt, continuation, answer)
    examples per task."""
    dec = dec or Decoding()
    right: dict[str, list[float]] = defaultdict(list)
    part_credit: dict[str, list[float]] = defaultdict(list)
    examples = []
    for task in TASKS:
        part = [p for p in problems if p.task == task]
        if not part:
            continue
        budget = answer_budget(model.tokenizer, part)
        check_fits(model, part, budget)
        got = generate_answers(model, [p.prompt for p in part], budget, dec)
        for p, g in zip(part, got):
            right[task].append(score(task, p.prompt, g))
            part_credit[task].append(partial(task, p.prompt, g))
        examples += [(task, p.prompt, extract_answer(g), p.answer)
                     for p, g in zip(part[:n_examples], got)]
    report: dict = {}
    for task, v in right.items():
        report[f"exact_{task}"] = sum(v) / len(v)
        report[f"partial_{task}"] = sum(part_credit[task]) / len(v)
        report[f"n_{task}"] = len(v)
    every = [x for v in right.values() for x in v]
    report["exact_all"] = sum(every) / max(1, len(every))
    every = [x for v in part_credit.values() for x in v]
    report["partial_all"] = sum(every) / max(1, len(every))
    report["examples"] = examples
    return report


@torch.no_grad()
def copy_geometry(model, problems: list[Problem]) -> dict[str, float]:
    """Can a Cola model's latents be copied? For every answer token that also occurs in its
    own prompt (sorting's numbers, latin's cells, recall's value), compare the answer token's
    latent (the Text VAE's normalized posterior mean of the whole document) with the prompt's
    latents of the same problem:

    - `copy_same_token`: share of those answer latents whose nearest prompt latent encodes the
      same token (1 = copying a prompt latent decodes to the right token);
    - `copy_dist_same`: mean distance to the nearest prompt latent of the same token;
    - `copy_dist_other`: mean distance to the nearest prompt latent of any other token;
    - `copy_tokens`: how many answer tokens were measured.

    When the answer's latents sit next to the prompt's (same << other), the Text VAE is not
    what stops the prior from copying a value out of its prompt."""
    same_nn, d_same, d_other = [], [], []
    for p in problems:
        pid = prompt_ids(model.tokenizer, p.prompt)
        aid = model.tokenizer.encode(" " + p.answer, add_special_tokens=False)
        z = model.encode_texts([pid + aid])[0].float()  # [len(pid) + len(aid), d]
        zp, za = z[:len(pid)], z[len(pid):len(pid) + len(aid)]
        tp = torch.tensor(pid, device=z.device)
        for j, tok in enumerate(aid):
            hit = tp == tok
            if not hit.any() or hit.all():
                continue
            dist = (zp - za[j]).norm(dim=-1)  # [len(pid)]
            same_nn.append(float(bool(hit[dist.argmin()])))
            d_same.append(float(dist[hit].min()))
            d_other.append(float(dist[~hit].min()))
    n = len(same_nn)
    mean = lambda v: sum(v) / n if n else float("nan")  # noqa: E731
    return {"copy_same_token": mean(same_nn), "copy_dist_same": mean(d_same),
            "copy_dist_other": mean(d_other), "copy_tokens": n}
