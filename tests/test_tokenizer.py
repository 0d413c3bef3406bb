"""Byte-level BPE tokenizer (vaes/tokenizer.py)."""

from __future__ import annotations

import itertools

import pytest

from unified.data.corpus import iter_stdlib_docstrings
from vaes.tokenizer import (
    BOS,
    EOS,
    MASK,
    PAD,
    encode_document,
    load_tokenizer,
    train_tokenizer,
)

EXTRA = [
    "Hello,  world!\n\tTabs, double  spaces and a trailing space ",
    " leading space and punctuation: (a, b) -> [c]; {d}",
    "Unicode: naïve café, 日本語, emoji 🎉, math ∑ x²",
    "A literal <mask> and <bos> in text stay text.",
    "",
]


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return [text for _, text in itertools.islice(iter_stdlib_docstrings(), 300)]


@pytest.fixture(scope="session")
def tok(corpus_texts):
    return train_tokenizer(corpus_texts, vocab_size=1024)


def test_special_token_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tok.convert_tokens_to_ids([PAD, BOS, EOS, MASK]) == [0, 1, 2, 3]
    assert len(tok) == 1024


def test_round_trip(tok, corpus_texts):
    for text in corpus_texts[:100] + EXTRA:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Merges were learned: real prose compresses well below one token per byte.
    sample = " ".join(corpus_texts[:50])
    assert len(tok.encode(sample, add_special_tokens=False)) < 0.5 * len(sample.encode())


def test_save_load_round_trip(tok, corpus_texts, tmp_path):
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file()
    loaded = load_tokenizer(folder)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.mask_token_id == 3
    assert loaded.model_max_length >= 10**9
    for text in corpus_texts[100:150] + EXTRA:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(
            text, add_special_tokens=False
        )
        assert encode_document(loaded, text, 16) == encode_document(tok, text, 16)
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text


def test_load_missing_raises(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(empty)


def test_encode_document_chunks(tok, corpus_texts):
    text = corpus_texts[0] + " " + corpus_texts[1]
    body = tok.encode(text, add_special_tokens=False)
    full = [tok.bos_token_id, *body, tok.eos_token_id]
    for max_len in (1, 7, 16, len(full) - 1, len(full), len(full) + 5):
        chunks = encode_document(tok, text, max_len)
        assert [i for c in chunks for i in c] == full
        assert all(1 <= len(c) <= max_len for c in chunks)
        assert all(len(c) == max_len for c in chunks[:-1])
        assert len(chunks) == -(-len(full) // max_len)
        # Only the first chunk starts with bos, only the last ends with eos.
        assert [c[0] == tok.bos_token_id for c in chunks] == [True] + [False] * (len(chunks) - 1)
        assert [c[-1] == tok.eos_token_id for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert encode_document(tok, "", 8) == [[tok.bos_token_id, tok.eos_token_id]]
    with pytest.raises(ValueError):
        encode_document(tok, text, 0)


def test_encode_document_never_emits_special_ids_from_text(tok):
    (chunk,) = encode_document(tok, "see <mask> and <pad> or <eos>", 1000)
    body = chunk[1:-1]
    assert not set(body) & {0, 1, 2, 3}
    assert tok.decode(body) == "see <mask> and <pad> or <eos>"
