"""The text world (issue 14): generated prompt/answer pairs with exact scoring.

generator.py writes the problems and shards (`cola make-shards textworld`), scorer.py solves
each prompt independently and scores continuations, evaluate.py runs a model on held-out
prompts (`cola eval textworld`).
"""

from tasks.textworld.generator import (
    EVAL_SEED_BASE,
    TASKS,
    Problem,
    eval_seed,
    heldout_problems,
    is_eval_seed,
    make_textworld_shards,
    problem_at,
)
from tasks.textworld.scorer import extract_answer, score, solve

__all__ = ["EVAL_SEED_BASE", "TASKS", "Problem", "eval_seed", "extract_answer", "heldout_problems",
           "is_eval_seed", "make_textworld_shards", "problem_at", "score", "solve"]
