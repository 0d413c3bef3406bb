"""Byte-level BPE tokenizer: trained with `tokenizers`, used as a `PreTrainedTokenizerFast`.

A trained tokenizer's special tokens have fixed ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2,
``<mask>`` 3. An existing tokenizer folder can be adopted instead (:func:`adopt_tokenizer`:
its special tokens found by name, missing ones added). Save with ``tok.save_pretrained(folder)``
and load with :func:`load_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
MASK = "<mask>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK)  # ids 0, 1, 2, 3

# Documents are chunked by encode_document, never truncated by the tokenizer itself.
MODEL_MAX_LENGTH = 10**12


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        mask_token=MASK,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (no prefix space, lossless round trip)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(token) == i, (token, backend.token_to_id(token))
    return _wrap(backend)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder written by ``tok.save_pretrained(path)``: one trained here
    (special ids 0-3) or one adopted by :func:`adopt_tokenizer` (its own ids)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {folder}; expected a folder saved by tok.save_pretrained()"
        )
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - the Rust parser's errors name no file
        raise ValueError(f"{folder / 'tokenizer.json'}: not a readable tokenizer "
                         f"({type(e).__name__}: {str(e).strip()[:200]})") from e
    for role in ROLES:
        if getattr(tok, f"{role}_token_id") is None:
            raise ValueError(f"{folder}: the tokenizer has no {role} token")
    return tok


ROLES = ("pad", "bos", "eos", "mask")
# names an existing tokenizer may give each role (its own declared special tokens first)
ROLE_NAMES = {"pad": (PAD, "[PAD]", "<|pad|>"),
              "bos": (BOS, "<s>", "[CLS]", "<|startoftext|>", "<|begin_of_text|>"),
              "eos": (EOS, "</s>", "[SEP]", "<|endoftext|>", "<|end_of_text|>"),
              "mask": (MASK, "[MASK]", "<|mask|>")}


def adopt_tokenizer(path: str | Path) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """An existing Hugging Face tokenizer folder (tokenizer.json) for a new model, and the
    special tokens that had to be added. Each role (pad, bos, eos, mask) takes the token the
    tokenizer declares for it, else a token of its vocabulary with a usual name for it
    (<s>, </s>, [PAD], <|endoftext|>, ...), else a new special token appended to the
    vocabulary (the Text VAE's vocabulary is len(tokenizer), so it follows)."""
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}: vae.tokenizer must be a Hugging "
                                f"Face tokenizer folder (saved with save_pretrained)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok.model_max_length = MODEL_MAX_LENGTH
    vocab = tok.get_vocab()
    added, roles = [], {}
    for role in ("eos", "bos", "pad", "mask"):  # four distinct tokens (GPT-2: eos only)
        declared = getattr(tok, f"{role}_token")
        names = ((declared,) if declared else ()) + ROLE_NAMES[role]
        taken = set(roles.values())
        found = next((n for n in names if n in vocab and n not in taken), None)
        if found is None:
            found = ROLE_NAMES[role][0]
            added.append(found)
        roles[f"{role}_token"] = found
    tok.add_special_tokens(roles)
    return tok, added


def encode_document(tok: PreTrainedTokenizerFast, text: str, max_len: int) -> list[list[int]]:
    """Ids of ``[bos] + text + [eos]`` cut into consecutive chunks of at most ``max_len``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    # split_special_tokens: a literal "<mask>" in a document is text, not a control token.
    body = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
    ids = [tok.bos_token_id, *body, tok.eos_token_id]
    return [ids[i : i + max_len] for i in range(0, len(ids), max_len)]


def encode_piece(tok: PreTrainedTokenizerFast, text: str, max_len: int, pad_to: int = 1) -> list[int]:
    """Ids of ``[bos] + text + [eos]`` as one piece (a caption, a question), followed by pad
    ids up to a multiple of ``pad_to`` (a generated text fills whole blocks: what follows
    its EOS is padding, and the model learns it). Raises ValueError when it does not fit
    ``max_len`` tokens."""
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False, split_special_tokens=True),
           tok.eos_token_id]
    ids += [tok.pad_token_id] * (-len(ids) % pad_to)
    if len(ids) > max_len:
        raise ValueError(f"text is too long: {len(ids)} tokens, at most {max_len} fit")
    return ids
