"""The seed convention of every synthetic world (shapes, text world): training data is drawn
from seeds in [0, EVAL_SEED_BASE), evaluation data from seeds >= EVAL_SEED_BASE (`eval_seed`),
so no evaluation sample is ever drawn from a training random stream (DESIGN §4)."""

from __future__ import annotations

EVAL_SEED_BASE = 10**9
TRAIN_SEED_LIMIT = EVAL_SEED_BASE


def eval_seed(seed: int = 0) -> int:
    """The evaluation seed paired with training seed ``seed`` (``EVAL_SEED_BASE + seed``)."""
    if not 0 <= seed < EVAL_SEED_BASE:
        raise ValueError(f"seed must be in [0, {EVAL_SEED_BASE}), got {seed}")
    return EVAL_SEED_BASE + seed


def is_eval_seed(seed: int) -> bool:
    """True for seeds reserved for evaluation data (``>= EVAL_SEED_BASE``)."""
    return seed >= EVAL_SEED_BASE
