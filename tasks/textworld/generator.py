"""The text world: generated prompt/answer pairs whose answer is a deterministic function of
the prompt (the text counterpart of the shapes world, issue 14).

Four tasks, each testing one thing a language model's history must carry:

- ``recall``: a list of facts ("the ruby is 482.") and a question about one named in the first
  half of the list ("what is the ruby? answer:" -> "482"): long-range use of history;
- ``addition``: "what is 4821 + 937? answer:" -> "5758", at least one carry;
- ``sorting``: "sort 41 7 23 9 15. answer:" -> "7 9 15 23 41" (distinct numbers 0..99);
- ``latin``: complete a 4x4 Latin square with a unique solution ("fill the latin square:
  1 2 _ 4 / ... answer:" -> "1 2 3 4 / 3 4 1 2 / ..."): an answer that must be planned as a
  whole (every cell constrains its row and column).

A sample's text is ``prompt + " " + answer`` (trained as a document: [bos] text [eos]); the
prompt ends with "answer:", so a model continues it with the answer. Answers never contain
".", "?" or a newline (the scorer cuts a continuation at the first of them).

Seeds: training data uses seeds in [0, EVAL_SEED_BASE), evaluation data seeds >=
EVAL_SEED_BASE (:func:`eval_seed`), so no evaluation problem is drawn from a training stream.
Problems are addressed by (seed, index) (:func:`problem_at`); the task of index i is
``TASKS[i % 4]``, so every split is balanced.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from tasks.seeds import EVAL_SEED_BASE, eval_seed, is_eval_seed  # noqa: F401 (re-exported)

TASKS = ("recall", "addition", "sorting", "latin")

# recall: short, common nouns (one or two tokens in most BPE vocabularies), all distinct
NAMES = (
    "ruby", "lamp", "door", "fish", "moon", "tree", "ship", "bell", "coin", "rose", "wolf", "king",
    "fork", "lake", "star", "rock", "nest", "drum", "boat", "cake", "bird", "sand", "rain", "gold",
    "milk", "salt", "leaf", "wind", "snow", "fire", "frog", "hill", "road", "ring", "kite", "lion",
    "bear", "deer", "corn", "pear", "seed", "wall", "coat", "hat", "cup", "box", "pen", "key",
)
RECALL_PAIRS = 8  # facts per recall problem
ADD_DIGITS = (2, 5)  # operand lengths drawn in this range (inclusive)
SORT_LEN = (5, 8)
LATIN_BLANKS = (6, 10)  # blank cells of a Latin square (fewer when uniqueness stops earlier)
LATIN_N = 4


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The training document: the prompt, a space, the answer."""
        return f"{self.prompt} {self.answer}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Problem:
        if not isinstance(data, dict):
            raise ValueError(f"a text-world record must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("task", "prompt", "answer") if not isinstance(data.get(k), str)]
        if missing:
            raise ValueError(f"text-world record lacks string field(s) {missing}")
        if data["task"] not in TASKS:
            raise ValueError(f"unknown text-world task {data['task']!r}; known: {TASKS}")
        return cls(data["task"], data["prompt"], data["answer"])


# ----------------------------------------------------------------------------- the tasks


def make_recall(rng: random.Random, pairs: int = RECALL_PAIRS) -> Problem:
    names = rng.sample(NAMES, pairs)
    values = [str(rng.randrange(100, 1000)) for _ in names]
    facts = " ".join(f"the {n} is {v}." for n, v in zip(names, values))
    q = rng.randrange(max(1, pairs // 2))  # asked about a fact of the first half
    return Problem("recall", f"{facts} what is the {names[q]}? answer:", values[q])


def has_carry(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def make_addition(rng: random.Random, digits: tuple[int, int] = ADD_DIGITS) -> Problem:
    while True:
        a, b = (rng.randrange(10 ** (n - 1), 10 ** n)
                for n in (rng.randint(*digits), rng.randint(*digits)))
        if has_carry(a, b):
            return Problem("addition", f"what is {a} + {b}? answer:", str(a + b))


def make_sorting(rng: random.Random, length: tuple[int, int] = SORT_LEN) -> Problem:
    xs = rng.sample(range(100), rng.randint(*length))
    return Problem("sorting", f"sort {' '.join(map(str, xs))}. answer:",
                   " ".join(map(str, sorted(xs))))


@cache
def latin_squares(n: int = LATIN_N) -> tuple[tuple[int, ...], ...]:
    """Every n x n Latin square over 1..n, each a row-major tuple (576 for n = 4)."""
    out: list[tuple[int, ...]] = []
    grid = [0] * (n * n)

    def fill(i: int) -> None:
        if i == n * n:
            out.append(tuple(grid))
            return
        r, c = divmod(i, n)
        used = {grid[r * n + k] for k in range(c)} | {grid[k * n + c] for k in range(r)}
        for v in range(1, n + 1):
            if v not in used:
                grid[i] = v
                fill(i + 1)
        grid[i] = 0

    fill(0)
    return tuple(out)


@cache
def _square_table(n: int) -> np.ndarray:
    return np.array(latin_squares(n), dtype=np.int8)  # [count, n * n]


def latin_solutions(givens: tuple[int, ...], n: int = LATIN_N, limit: int = 2) -> list[tuple[int, ...]]:
    """Latin squares agreeing with `givens` (row-major, 0 = blank), at most `limit` of them."""
    g = np.asarray(givens, dtype=np.int8)
    table = _square_table(n)
    ok = ((table == g) | (g == 0)).all(1)
    return [tuple(int(v) for v in table[i]) for i in np.flatnonzero(ok)[:limit]]


def format_grid(cells: tuple[int, ...], n: int = LATIN_N) -> str:
    """Rows of space-separated cells joined by " / " (0 is written "_")."""
    return " / ".join(" ".join(str(v) if v else "_" for v in cells[r * n:(r + 1) * n])
                      for r in range(n))


def make_latin(rng: random.Random, blanks: tuple[int, int] = LATIN_BLANKS, n: int = LATIN_N) -> Problem:
    squares = latin_squares(n)
    solution = squares[rng.randrange(len(squares))]
    givens, target, removed = list(solution), rng.randint(*blanks), 0
    for i in rng.sample(range(n * n), n * n):
        if removed == target:
            break
        old, givens[i] = givens[i], 0
        if len(latin_solutions(tuple(givens), n)) == 1:
            removed += 1
        else:
            givens[i] = old  # this blank would allow a second solution
    return Problem("latin", f"fill the latin square: {format_grid(tuple(givens), n)}. answer:",
                   format_grid(solution, n))


MAKERS = {"recall": make_recall, "addition": make_addition, "sorting": make_sorting,
          "latin": make_latin}


# ----------------------------------------------------------------------------- streams and shards


def problem_at(seed: int, index: int, tasks: tuple[str, ...] = TASKS) -> Problem:
    """The `index`-th problem of stream `seed`: task ``tasks[index % len(tasks)]``, drawn by its
    own generator seeded by (seed, index), so any worker can produce any slice."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    task = tasks[index % len(tasks)]
    return MAKERS[task](random.Random(f"textworld/{seed}/{index}"))


def problem_key(seed: int, index: int) -> str:
    return f"textworld-s{seed}-{index:08d}"


def iter_problems(seed: int, n: int, start: int = 0) -> Iterator[tuple[str, Problem]]:
    for i in range(start, start + n):
        yield problem_key(seed, i), problem_at(seed, i)


def heldout_problems(n: int, seed: int = 0) -> list[Problem]:
    """The first n problems of the evaluation stream paired with training seed `seed`."""
    return [p for _, p in iter_problems(eval_seed(seed), n)]


def unseen_problems(stream: Iterator[tuple[str, Problem]], seen: set[str], n: int,
                    max_skips: int | None = None) -> tuple[list[tuple[str, Problem]], int]:
    """The first n (key, problem) of `stream` whose prompt is not in `seen`, and how many were
    passed over; raises when more than `max_skips` (default n + 1000) repeat a seen prompt."""
    out, skipped = [], 0
    max_skips = n + 1000 if max_skips is None else max_skips
    for key, p in stream:
        if len(out) == n:
            break
        if p.prompt in seen:
            skipped += 1
            if skipped > max_skips:
                raise ValueError(f"{skipped} held-out problems already occur in the training "
                                 "set: the world is too small for this many training problems")
        else:
            out.append((key, p))
    return out, skipped


def make_textworld_shards(out_dir: str | Path, n_train: int, n_heldout: int, seed: int = 0,
                          max_per_shard: int = 2000) -> dict[str, int]:
    """Write ``out_dir/train/`` (n_train problems of training stream `seed`) and
    ``out_dir/heldout/`` (n_heldout problems of :func:`eval_seed` (seed)) as webdataset text
    samples: ``KEY.txt`` the document (prompt + answer), ``KEY.json`` {task, prompt, answer,
    seed, index}. A held-out problem whose prompt also occurs in the training set is left out
    (counted in ``heldout_seen_in_train``), so every held-out prompt is new."""
    import json

    from unified.data.shards import write_shards

    if not 0 <= seed < EVAL_SEED_BASE:
        raise ValueError(f"training seed must be in [0, {EVAL_SEED_BASE}), got {seed}")
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"counts must be >= 0, got n_train={n_train}, n_heldout={n_heldout}")
    test_seed = eval_seed(seed)
    assert not is_eval_seed(seed) and is_eval_seed(test_seed)  # disjoint seed ranges

    def samples(stream: int, problems):
        for key, p in problems:
            meta = {**p.to_json(), "seed": stream, "index": int(key.rsplit("-", 1)[1])}
            yield {"__key__": key, "txt": p.text, "json": json.dumps(meta, sort_keys=True).encode()}

    train = list(iter_problems(seed, n_train))
    seen = {p.prompt for _, p in train}
    heldout, skipped = unseen_problems(iter_problems(test_seed, 1 << 62), seen, n_heldout)
    out = Path(out_dir)
    train_paths = write_shards(samples(seed, train), out / "train", "textworld", max_per_shard)
    heldout_paths = write_shards(samples(test_seed, heldout), out / "heldout", "textworld",
                                 max_per_shard)
    return {"train_samples": len(train), "heldout_samples": len(heldout),
            "heldout_seen_in_train": skipped, "train_shards": len(train_paths),
            "heldout_shards": len(heldout_paths)}
