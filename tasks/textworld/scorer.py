"""Exact scoring of the text world: each answer is recomputed from the prompt alone (an
independent solver per task, not the stored answer), and a model's continuation is right when
its first clause is exactly that answer.

The clause is the continuation up to the first ".", "?" or newline (answers contain none of
them: a model may go on to a new document after the answer), with leading and trailing
whitespace removed; nothing else is normalized, so any one-character change scores 0.
"""

from __future__ import annotations

import re

from tasks.textworld.generator import LATIN_N, TASKS, format_grid, latin_solutions

_CUT = re.compile(r"[.?\n]")
_RECALL_FACT = re.compile(r"the (\w+) is (\d+)\.")
_RECALL_Q = re.compile(r"what is the (\w+)\? answer:$")
_ADD = re.compile(r"^what is (\d+) \+ (\d+)\? answer:$")
_SORT = re.compile(r"^sort ((?:\d+ )*\d+)\. answer:$")
_LATIN = re.compile(r"^fill the latin square: ([0-9_ /]+)\. answer:$")


class UnsolvablePrompt(ValueError):
    """A prompt the solver cannot parse or solve (not a text-world prompt of its task)."""


def extract_answer(continuation: str) -> str:
    """The answer part of a model's continuation: up to the first ".", "?" or newline, stripped."""
    return _CUT.split(continuation, maxsplit=1)[0].strip()


def solve_recall(prompt: str) -> str:
    facts = dict(_RECALL_FACT.findall(prompt))
    q = _RECALL_Q.search(prompt)
    if not q or q.group(1) not in facts:
        raise UnsolvablePrompt(f"not a recall prompt: {prompt[:60]!r}")
    return facts[q.group(1)]


def solve_addition(prompt: str) -> str:
    m = _ADD.match(prompt)
    if not m:
        raise UnsolvablePrompt(f"not an addition prompt: {prompt[:60]!r}")
    return str(int(m.group(1)) + int(m.group(2)))


def solve_sorting(prompt: str) -> str:
    m = _SORT.match(prompt)
    if not m:
        raise UnsolvablePrompt(f"not a sorting prompt: {prompt[:60]!r}")
    return " ".join(map(str, sorted(int(x) for x in m.group(1).split())))


def solve_latin(prompt: str, n: int = LATIN_N) -> str:
    m = _LATIN.match(prompt)
    cells = m.group(1).replace("/", " ").split() if m else []
    if len(cells) != n * n:
        raise UnsolvablePrompt(f"not a {n}x{n} latin-square prompt: {prompt[:60]!r}")
    givens = tuple(0 if c == "_" else int(c) for c in cells)
    found = latin_solutions(givens, n)
    if len(found) != 1:
        raise UnsolvablePrompt(f"the latin square has {len(found)} solutions (need exactly 1)")
    return format_grid(found[0], n)


SOLVERS = {"recall": solve_recall, "addition": solve_addition, "sorting": solve_sorting,
           "latin": solve_latin}
assert set(SOLVERS) == set(TASKS)


def solve(task: str, prompt: str) -> str:
    """The one right answer to `prompt`, computed from the prompt alone."""
    if task not in SOLVERS:
        raise ValueError(f"unknown text-world task {task!r}; known: {TASKS}")
    return SOLVERS[task](prompt)


def score(task: str, prompt: str, continuation: str) -> float:
    """1.0 when the continuation's answer part is exactly the right answer, else 0.0."""
    return float(extract_answer(continuation) == solve(task, prompt))


def items(answer: str) -> list[str]:
    """An answer's items: its whitespace-separated words when it has several (sorting, latin:
    numbers, cells and "/"), else its characters (recall, addition: digits)."""
    words = answer.split()
    return words if len(words) > 1 else list(answer.strip())


def partial(task: str, prompt: str, continuation: str) -> float:
    """Partial credit, beside the exact score: the share of the right answer's items
    (`items`) that the continuation's answer part has at the same place, over the longer of
    the two (a missing or an extra item counts against). 1.0 exactly when `score` is 1."""
    want, got = items(solve(task, prompt)), items(extract_answer(continuation))
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1)
