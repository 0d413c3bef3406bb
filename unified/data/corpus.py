"""Default English text corpus, made offline from docstrings that every install already has.

Every Python install ships a megabyte of hand-written English prose in the docstrings of its
standard library and its bundled language reference; the project's pinned torch adds more of
the same register. :func:`iter_default_corpus` extracts the prose paragraphs from both (no
network, no download, deterministic for a given interpreter and torch version), and
:func:`is_heldout` splits them into train / held-out sets by a stable hash of the sample key.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Subtrees of the standard library that hold tests, tools or vendored code rather than prose.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "turtledemo",
        "ensurepip",
        "testing",
        "_vendor",
    }
)

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
# Lines that mark code, shell sessions or reST markup rather than running prose.
_CODE_LINE = re.compile(r"^(>>>|\.\.\.|\$ |% |\.\. |:[a-z]+:`?|[-=~^*+#`|]{3,})")


def _sanitize(part: str) -> str:
    return _KEY_UNSAFE.sub("-", part).strip("-") or "x"


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """Yield (qualname, docstring) for the module and every class/function, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "module", doc

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    yield qual, doc
                yield from visit(child, qual + "-")
            elif not isinstance(child, ast.Lambda):
                # Definitions nested in if/try/with blocks still count (qualname unchanged).
                yield from visit(child, prefix)

    yield from visit(tree, "")


def _pydoc_topics(base: Path) -> Iterator[tuple[str, str]]:
    """(topic, text) of the language reference that ships as ``pydoc_data/topics.py``."""
    path = base / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                    if isinstance(k.value, str) and isinstance(v.value, str):
                        yield k.value, v.value


def _is_prose(lines: list[str], text: str, min_chars: int, min_alpha: float) -> bool:
    if len(text) < min_chars:
        return False
    for line in lines:
        if line[:1].isspace() or _CODE_LINE.match(line.strip()):
            return False  # indented block (code, table, option list) or doctest / markup
    if not (text[0].isalpha() or text[0] in "\"'"):
        # Paragraphs start with a word; "(", "*", "-" or digits mark lists and code.
        return False
    alpha = sum(1 for ch in text if ch.isalpha() or ch == " ")
    if alpha < min_alpha * len(text):
        return False
    # Prose is made of words: reject symbol-heavy code fragments the ratio let through.
    return not any(tok in text for tok in ("==", "->", "{", "}", " = ", "();", "\\n"))


# Finished walks, by arguments: parsing the whole stdlib takes seconds on a small CPU.
_CACHE: dict[tuple[str, int, float], tuple[tuple[str, str], ...]] = {}


def _replay_or_walk(cache_key, walk: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Yield a walk lazily; once one has run to the end, later calls replay it from memory."""
    if cache_key in _CACHE:
        yield from _CACHE[cache_key]
        return
    done: list[tuple[str, str]] = []
    for item in walk:
        done.append(item)
        yield item
    _CACHE[cache_key] = tuple(done)


def iter_stdlib_docstrings(
    min_chars: int = 80, *, min_alpha: float = 0.75, root: str | Path | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(key, paragraph)`` prose paragraphs from the stdlib docstrings, in stable order.

    Keys look like ``email-utils__parseaddr__p0``: only ``[A-Za-z0-9_-]`` (no dots, which
    webdataset would read as an extension separator), unique, and the same on every run.
    Files that cannot be read or parsed are skipped. Exact duplicate paragraphs are dropped.
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    yield from _replay_or_walk((str(base), min_chars, min_alpha),
                               _walk(base, min_chars, min_alpha))


def _walk(base: Path, min_chars: int, min_alpha: float, *, files: list[Path] | None = None,
          with_topics: bool = True) -> Iterator[tuple[str, str]]:
    seen_texts: set[str] = set()
    seen_keys: set[str] = set()

    def sources() -> Iterator[tuple[str, Iterator[tuple[str, str]]]]:
        """(module key, its docstrings), one file parsed at a time (the walk stays lazy)."""
        for path in files if files is not None else _stdlib_files(base):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
                continue
            yield _sanitize(path.relative_to(base).with_suffix("").as_posix()), _docstrings(tree)
        # the language reference shipped for `help()`: more prose of the same register
        if with_topics:
            yield "pydoc-topics", _pydoc_topics(base)

    for mod, docs in sources():
        for qual, doc in docs:
            for n, para in enumerate(_BLANK_LINE.split(doc)):
                lines = [ln.rstrip() for ln in para.strip("\n").splitlines() if ln.strip()]
                if not lines:
                    continue
                text = " ".join(ln.strip() for ln in lines)
                if text in seen_texts or not _is_prose(lines, text, min_chars, min_alpha):
                    continue
                seen_texts.add(text)
                key = f"{mod}__{_sanitize(qual)}__p{n}"
                if key in seen_keys:  # e.g. the same function defined in two if-branches
                    i = 2
                    while f"{key}-{i}" in seen_keys:
                        i += 1
                    key = f"{key}-{i}"
                seen_keys.add(key)
                yield key, text


# Installed packages whose docstrings join the default corpus. torch is pinned by the project,
# so its prose is the same on every machine where the project is installed.
DEFAULT_PACKAGES = ("torch",)


def _package_root(name: str) -> tuple[Path, Path] | None:
    """(site-packages folder, package folder) of an installed package, without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    return pkg.parent, pkg


def iter_package_docstrings(name: str, min_chars: int = 80, *, min_alpha: float = 0.75
                            ) -> Iterator[tuple[str, str]]:
    """Prose paragraphs from the docstrings of an installed package (keys start with its name).

    Nothing is yielded when the package is not installed.
    """
    roots = _package_root(name)
    if roots is None:
        return
    site, pkg = roots
    walk = _walk(site, min_chars, min_alpha, files=_stdlib_files(pkg), with_topics=False)
    yield from _replay_or_walk((str(pkg), min_chars, min_alpha), walk)


def iter_default_corpus(min_chars: int = 80) -> Iterator[tuple[str, str]]:
    """The default corpus: the standard library's prose, then DEFAULT_PACKAGES' docstrings.

    Exact duplicate paragraphs across sources are dropped (first occurrence wins).
    """
    seen: set[str] = set()
    sources = [iter_stdlib_docstrings(min_chars)]
    sources += [iter_package_docstrings(name, min_chars) for name in DEFAULT_PACKAGES]
    for source in sources:
        for key, text in source:
            if text not in seen:
                seen.add(text)
                yield key, text


def is_heldout(key: str, fraction: float = 0.02) -> bool:
    """Deterministic train/held-out split: True for about ``fraction`` of all keys."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64
