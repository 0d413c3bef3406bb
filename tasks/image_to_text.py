"""Image-to-text (captioning and visual questions): [P][I][C][N] (DESIGN §3). The instruction
or question P and the image I form one bidirectional condition block that CFG drops as a
whole; the answer text follows, its given prefix (at least [bos]) clean, the rest generated
block by block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tasks.base import SampleContext, encode_conditions
from unified.data.streams import TaskSample, collate_task_samples
from unified.generate import GenerationConfig, ImageGenerator, TextGenerator
from unified.layout import MODALITY_IMAGE, MODALITY_TEXT, ONE_BLOCK, SEG_I, SEG_N, SEG_P, SegmentSpec
from unified.model import ColaModel
from unified.sampling import CAPTION_TOKENS
from vaes.tokenizer import encode_piece

NAME = "image_to_text"
INSTRUCTION = "describe the image."
MAX_NEW_TOKENS = CAPTION_TOKENS  # a caption or an answer (a model saves its own default)
CONDITION = [SegmentSpec(SEG_P, MODALITY_TEXT, 0, blocks=ONE_BLOCK, droppable=True),
             SegmentSpec(SEG_I, MODALITY_IMAGE, 0, blocks=ONE_BLOCK, join_previous=True,
                         droppable=True)]


def recipe(prompt: int) -> list[SegmentSpec]:
    """The training recipe with the answer's first `prompt` tokens given."""
    return [*CONDITION, SegmentSpec(SEG_N, MODALITY_TEXT, 1, target=True, prompt=prompt)]


def shapes_scene(meta):
    """The shapes-world scene a record's .json describes, or None for any other metadata
    (real img2dataset metadata, garbage): questions are a shapes-only feature."""
    if not isinstance(meta, dict) or not isinstance(meta.get("objects"), list):
        return None
    from tasks.shapes.world import Scene

    try:
        return Scene.from_json(meta)
    except (KeyError, TypeError, ValueError):
        return None


class ImageToText:
    name = NAME

    def training_sample(self, record: dict, ctx: SampleContext) -> TaskSample:
        """Caption the image, or (share `question_prob`, when the record carries a shapes
        scene) answer a question about it; a share `caption_prefix_prob` of samples give a
        random prefix of the answer, so continuing a user's caption is learned too. The
        answer is padded to whole blocks, as generation fills them."""
        cfg, rng, tok = ctx.cfg, ctx.rng, ctx.tokenizer
        instruction, answer = INSTRUCTION, record["caption"]
        scene = shapes_scene(record.get("meta")) if cfg.question_prob > 0 else None
        if scene is not None and rng.random() < cfg.question_prob:
            from tasks.shapes.world import questions

            instruction, answer = rng.choice(questions(scene))
        ids = encode_piece(tok, answer, ctx.max_len, pad_to=ctx.block_size)
        n_real = ids.index(tok.eos_token_id) + 1
        prompt = 1  # [bos]
        if n_real > 2 and rng.random() < cfg.caption_prefix_prob:
            prompt = rng.randrange(1, n_real - 1)
        return TaskSample(NAME, [encode_piece(tok, instruction, ctx.max_len), ids],
                          [record["image"]], recipe(prompt), ctx.cond_drop_prob)


def _instruction(question: str | None) -> str:
    return INSTRUCTION if question is None or not question.strip() else \
        " ".join(question.lower().split())


def _conditions(model: ColaModel, images: torch.Tensor, questions: list[str | None]):
    rows = []
    for img, q in zip(images, questions):
        ids = encode_piece(model.tokenizer, _instruction(q), model.vae.config.max_len)
        rows.append(encode_conditions(model, CONDITION, [ids], [img]))
    return rows


@torch.no_grad()
def answer_flow_loss(model: ColaModel, images: torch.Tensor, questions: list[str | None],
                     answers: list[str], seeds: tuple[int, ...] = (0, 1, 2, 3)) -> torch.Tensor:
    """How well the prior explains each answer to its question about its image: the summed
    flow-matching loss of the answer's latents, laid out exactly as in training (the sample's
    2L layout, model.pair_layout), averaged over `seeds`. Each seed fixes a sample's times and
    noise, and every row uses the same seeds (common random numbers), so rows that share an
    image and a question compare their answers, not their noise. Lower is better: the prior's
    likelihood proxy for an answer ("self-scoring"). images [B, 3, H, W] in [-1, 1]; returns
    [B]. An answer longer than the Text VAE's context raises ValueError."""
    tok, max_len, bs = model.tokenizer, model.vae.config.max_len, model.block_size
    samples = [TaskSample(NAME, [encode_piece(tok, _instruction(q), max_len),
                                 encode_piece(tok, a, max_len, pad_to=bs)], [img], recipe(1))
               for img, q, a in zip(images, questions, answers)]
    total = torch.zeros(len(samples))
    for seed in seeds:
        for smp in samples:
            smp.seed = seed
        pairs = collate_task_samples(samples, seq_len=max_len, pad_id=tok.pad_token_id)
        dev = model.vae.device
        rows = {k: v.to(dev) for k, v in pairs["pieces"].items()}
        pairs["images"] = pairs["images"].to(dev)
        mean, _ = model.vae.encode(rows["input_ids"], rows["sample_ids"], rows["positions"])
        lay = model.pair_layout(pairs, model.vae.normalize(mean))
        err, _ = model._flow_loss(lay, per_row=True)  # [B]: summed over the answer's latents
        total += err.float().cpu()
    return total / len(seeds)


def stream(model: ColaModel, images: torch.Tensor, questions: list[str | None] | None = None,
           prefixes: list[str] | None = None, gen: GenerationConfig | None = None, *,
           use_cache: bool = True, seeds: list[int] | None = None):
    """Yield BlockOutputs of the answers for images [B, 3, H, W] in [-1, 1]; `questions` (None
    = describe the image), answer `prefixes` and `seeds` (default gen.seed) per image are
    optional."""
    b = images.shape[0]
    if b == 0:
        raise ValueError("no images given")
    questions = questions or [None] * b
    prefixes = prefixes or [""] * b
    rows = _conditions(model, images, questions)
    yield from TextGenerator(model).stream(prefixes, gen, use_cache, conditions=rows, seeds=seeds)


@dataclass
class Answers:
    texts: list[str]  # one per image, prefix included
    nfe: int  # prior forward calls in all (samples and scoring)


def answer(model: ColaModel, images: torch.Tensor, questions: list[str | None] | None = None,
           prefixes: list[str] | None = None, gen: GenerationConfig | None = None, *,
           use_cache: bool = True, rerank: int = 0, seeds: list[int] | None = None) -> Answers:
    """The answers (prefix included) for a batch of images [B, 3, H, W] in [-1, 1]; `seeds`:
    one per image (default gen.seed for every image).

    `rerank` = K > 1: sample K answers per image (seeds seed .. seed + K - 1) and keep one.
    A caption is the one under which the same prior best explains the image, i.e. with the
    lowest text-to-image flow loss ("analysis by synthesis", see `rerank_captions`); an
    answer to a question is the one the prior itself explains best given the image and the
    question, i.e. with the lowest flow loss of the answer (`answer_flow_loss`)."""
    gen = gen or GenerationConfig()
    b = images.shape[0]
    if b == 0:
        raise ValueError("no images given")
    prefixes = prefixes or [""] * b
    rows = _conditions(model, images, questions or [None] * b)  # encoded once for K samples
    engine = TextGenerator(model)
    samples, nfe = [], 0
    for k in range(max(1, rerank)):
        g = dataclasses.replace(gen, seed=gen.seed + k)
        row_seeds = None if seeds is None else [s + k for s in seeds]
        *_, last = engine.stream(prefixes, g, use_cache, conditions=rows, seeds=row_seeds)
        samples.append([(p + t) for p, t in zip(prefixes, last.texts)])
        nfe += last.nfe
    best = samples[0]
    if rerank > 1:
        asks = questions or [None] * images.shape[0]
        todo = [i for i, q in enumerate(asks) if q is None or not q.strip()]
        if todo:
            chosen, calls = rerank_captions(model, images[todo], [[c[i] for c in samples]
                                                                  for i in todo])
            nfe += calls
            for i, caption in zip(todo, chosen):
                best[i] = caption
        asked = [i for i in range(b) if i not in set(todo)]
        if asked:
            chosen, calls = rerank_answers(model, images[asked], [asks[i] for i in asked],
                                           [[c[i] for c in samples] for i in asked])
            nfe += calls
            for i, text in zip(asked, chosen):
                best[i] = text
    return Answers(best, nfe)


def generate(model: ColaModel, images: torch.Tensor, questions: list[str | None] | None = None,
             prefixes: list[str] | None = None, gen: GenerationConfig | None = None, *,
             use_cache: bool = True, rerank: int = 0, seeds: list[int] | None = None
             ) -> list[str]:
    """The answer texts of `answer`."""
    return answer(model, images, questions, prefixes, gen, use_cache=use_cache,
                  rerank=rerank, seeds=seeds).texts


@torch.no_grad()
def rerank_answers(model: ColaModel, images: torch.Tensor, questions: list[str],
                   candidates: list[list[str]], seeds: tuple[int, ...] = (0, 1, 2, 3)
                   ) -> tuple[list[str], int]:
    """For each question about its image [3, H, W], its candidate answer with the lowest
    `answer_flow_loss` (ties and unscorable candidates: the earlier sample), and the prior
    calls it took. One candidate per distinct text: K samples that agree are scored once."""
    rows = []
    for i, cands in enumerate(candidates):
        fit = [c for c in dict.fromkeys(cands) if _fits(model, c)]
        if len(fit) > 1:  # a choice to make
            rows += [(i, c) for c in fit]
    best = {i: (cands[0], float("inf")) for i, cands in enumerate(candidates)}
    if not rows:
        return [cands[0] for cands in candidates], 0
    owner = [i for i, _ in rows]
    loss = answer_flow_loss(model, images[owner], [questions[i] for i in owner],
                            [c for _, c in rows], seeds)
    for (i, c), v in zip(rows, loss.tolist()):
        if v < best[i][1]:
            best[i] = (c, v)
    return [best[i][0] for i in range(len(candidates))], len(seeds)


def _fits(model: ColaModel, answer: str) -> bool:
    """Whether an answer fits the Text VAE's context as one piece padded to whole blocks."""
    try:
        encode_piece(model.tokenizer, answer, model.vae.config.max_len, pad_to=model.block_size)
    except ValueError:
        return False
    return True


@torch.no_grad()
def rerank_captions(model: ColaModel, images: torch.Tensor, candidates: list[list[str]]
                    ) -> tuple[list[str], int]:
    """For each image [3, H, W] its candidate caption with the lowest text-to-image flow loss
    of the image's latent tokens (unified.generate.ImageGenerator.flow_loss), and the prior
    calls it took."""
    from tasks import text_to_image

    tokens = model.encode_images(images.to(model.vae.device))  # [B, n, d]
    rows, owner, texts = [], [], []
    for i, cands in enumerate(candidates):
        for c in dict.fromkeys(cands):  # unique, in sampling order
            try:
                ids = encode_piece(model.tokenizer, c, model.vae.config.max_len)
            except ValueError:  # longer than any caption condition: not a candidate
                continue
            rows.append(encode_conditions(model, text_to_image.CONDITION, [ids], []))
            owner.append(i)
            texts.append(c)
    best = {i: (cands[0], float("inf")) for i, cands in enumerate(candidates)}
    nfe = 0
    if rows:
        loss, nfe = ImageGenerator(model).flow_loss(rows, tokens[owner])
        for i, c, v in zip(owner, texts, loss.tolist()):
            if v < best[i][1]:
                best[i] = (c, v)
    return [best[i][0] for i in range(len(candidates))], nfe
