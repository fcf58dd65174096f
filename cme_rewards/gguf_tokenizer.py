"""A correct fast tokenizer for SentencePiece-BPE GGUF files (Gemma), on any transformers version.

For `tokenizer.ggml.model == "llama"` (SentencePiece, no merges) transformers 5.10 rebuilds
Gemma-3's tokenizer as a Unigram model, which splits "capital" into `▁c|ap|it|al` and silently
changes every log-prob. This module rebuilds it as SentencePiece and llama.cpp do: a byte-fallback
BPE whose merges are every pair of pieces whose concatenation is a piece, ranked by the merged
piece's score (ties: lower id).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType, Keys, TokenType
from gguf.gguf_reader import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

SPM_TOKENIZER_MODEL = "llama"
"""`tokenizer.ggml.model` of a SentencePiece vocabulary (llama.cpp's `LLAMA_VOCAB_TYPE_SPM`)."""

_SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space
# Pieces a merge may never produce or consume: SentencePiece keeps them out of its merge table.
_NOT_MERGEABLE = frozenset({TokenType.UNKNOWN, TokenType.CONTROL, TokenType.BYTE, TokenType.UNUSED})


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer a GGUF describes: its metadata under llama.cpp's key names.

    `tokens`, `scores` and `token_types` are aligned with token ids (length = vocabulary size);
    `token_types` holds `gguf.TokenType` values (1 normal, 3 control, 4 user-defined, 6 byte...).
    """

    path: str
    architecture: str
    model: str
    pre: str | None
    tokens: list[str]
    scores: np.ndarray | None  # [vocab] float32, higher merges first; None if the file has none
    token_types: np.ndarray  # [vocab] int32
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    context_length: int | None


def _read_gguf_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, without its tensors.

    `gguf.GGUFReader` builds two numpy views per string of a 262,144-piece vocabulary (~16 s on one
    core), so the key/value section is walked here directly: ~0.5 s. Numeric arrays come back as
    numpy arrays, string arrays as lists of `str`.
    """
    with open(path, "rb") as handle:
        try:
            blob = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise ValueError(f"{path} is empty, not a GGUF file") from exc
    with blob:
        if len(blob) < 24 or struct.unpack_from("<I", blob, 0)[0] != GGUF_MAGIC:
            raise ValueError(f"{path} does not start with the GGUF magic bytes: not a GGUF file")
        version, _tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")

        def read_string(pos: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", blob, pos)
            return blob[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length

        def read_value(pos: int, value_type: int) -> tuple[Any, int]:
            if value_type == GGUFValueType.STRING:
                return read_string(pos)
            if value_type == GGUFValueType.ARRAY:
                item_type, count = struct.unpack_from("<IQ", blob, pos)
                pos += 12
                if item_type == GGUFValueType.STRING:
                    items = [""] * count
                    for k in range(count):
                        items[k], pos = read_string(pos)
                    return items, pos
                if item_type == GGUFValueType.ARRAY:
                    raise ValueError(f"{path}: nested metadata arrays are not supported")
                dtype = np.dtype(GGUFReader.gguf_scalar_to_np[GGUFValueType(item_type)])
                array = np.frombuffer(blob, dtype=dtype, count=count, offset=pos).copy()
                return array, pos + count * dtype.itemsize
            dtype = np.dtype(GGUFReader.gguf_scalar_to_np[GGUFValueType(value_type)])
            value = np.frombuffer(blob, dtype=dtype, count=1, offset=pos)[0]
            return value.item(), pos + dtype.itemsize

        metadata: dict[str, Any] = {}
        pos = 24
        for _ in range(kv_count):
            key, pos = read_string(pos)
            (value_type,) = struct.unpack_from("<I", blob, pos)
            metadata[key], pos = read_value(pos + 4, value_type)
    return metadata


def read_gguf_vocab(gguf_path: str | os.PathLike) -> GGUFVocab:
    """Read the tokenizer metadata of a GGUF file (no tensors). Raises ValueError if it has none."""
    path = os.fspath(gguf_path)
    metadata = _read_gguf_metadata(path)
    if Keys.Tokenizer.LIST not in metadata or Keys.Tokenizer.MODEL not in metadata:
        raise ValueError(
            f"{path} has no tokenizer metadata ({Keys.Tokenizer.MODEL!r} / {Keys.Tokenizer.LIST!r})"
        )
    tokens = metadata[Keys.Tokenizer.LIST]
    n = len(tokens)
    scores = metadata.get(Keys.Tokenizer.SCORES)
    types = metadata.get(Keys.Tokenizer.TOKEN_TYPE)
    for key, array in ((Keys.Tokenizer.SCORES, scores), (Keys.Tokenizer.TOKEN_TYPE, types)):
        if array is not None and len(array) != n:
            raise ValueError(f"{path}: {key} has {len(array)} entries for {n} tokens")
    architecture = metadata.get(Keys.General.ARCHITECTURE, "")
    context_length = metadata.get(f"{architecture}.context_length")

    def token_id(key: str) -> int | None:
        value = metadata.get(key)
        if value is None:
            return None
        if not 0 <= value < n:
            raise ValueError(f"{path}: {key}={value} is outside the vocabulary of {n} tokens")
        return int(value)

    return GGUFVocab(
        path=path,
        architecture=architecture,
        model=metadata[Keys.Tokenizer.MODEL],
        pre=metadata.get(Keys.Tokenizer.PRE),
        tokens=tokens,
        scores=None if scores is None else np.asarray(scores, dtype=np.float32),
        token_types=(
            np.full(n, TokenType.NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
        ),
        bos_id=token_id(Keys.Tokenizer.BOS_ID),
        eos_id=token_id(Keys.Tokenizer.EOS_ID),
        unk_id=token_id(Keys.Tokenizer.UNK_ID),
        pad_id=token_id(Keys.Tokenizer.PAD_ID),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos=bool(metadata.get(Keys.Tokenizer.ADD_BOS, True)),
        add_eos=bool(metadata.get(Keys.Tokenizer.ADD_EOS, False)),
        add_space_prefix=bool(metadata.get(Keys.Tokenizer.ADD_PREFIX, True)),
        chat_template=metadata.get(Keys.Tokenizer.CHAT_TEMPLATE),
        context_length=None if context_length is None else int(context_length),
    )


def is_sentencepiece_bpe(vocab: GGUFVocab) -> bool:
    """Whether `vocab` is a SentencePiece vocabulary with scores, which `tokenizer_from_gguf` builds.

    True for `tokenizer.ggml.model == "llama"` with `tokenizer.ggml.scores` (Gemma 1/2/3, Llama 2,
    Mistral v0.1, ...). Byte-level BPE ("gpt2", e.g. SmolLM2) and Unigram ("t5") files are not.
    """
    return vocab.model == SPM_TOKENIZER_MODEL and vocab.scores is not None


def _spelled(tokens: list[str]) -> list[str]:
    """Pieces as SentencePiece spells them: llama.cpp stores Gemma's whitespace pieces
    ("▁▁", "▁▁▁", ...) with real spaces, which the normalized text never contains."""
    return [token.replace(" ", _SPACE) for token in tokens]


def sentencepiece_bpe_merges(
    pieces: list[str], scores: np.ndarray, token_types: np.ndarray
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    Every split `(left, right)` of a mergeable piece into two mergeable pieces is a merge; merges
    are ranked by the merged piece's score (descending, ties by lower id), and the splits of one
    piece by longer `left` first. Control, byte, unknown and unused pieces neither result from nor
    take part in merges. Dict look-ups only: ~1-2 s for 262,144 pieces.

    Args:
        pieces: [vocab] piece strings (spelled with "▁"), index = token id.
        scores: [vocab] SentencePiece scores (log-probabilities; higher merges first).
        token_types: [vocab] `gguf.TokenType` values.
    """
    mergeable = np.flatnonzero(~np.isin(token_types, list(_NOT_MERGEABLE)))
    order = mergeable[np.lexsort((mergeable, -scores[mergeable].astype(np.float64)))]
    known = {pieces[i] for i in mergeable}
    return [
        (piece[:cut], piece[cut:])
        for piece in (pieces[i] for i in order.tolist())
        for cut in range(len(piece) - 1, 0, -1)
        if piece[:cut] in known and piece[cut:] in known
    ]


def _added_tokens(vocab: GGUFVocab, pieces: list[str]) -> list[AddedToken]:
    """Pieces SentencePiece matches whole before BPE: control ones as special tokens (`<bos>`,
    `<start_of_turn>`), user-defined ones as plain added tokens ("\n\n", "<table>").

    Gemma's whitespace pieces ("▁▁▁▁") are matched in the normalized text, where spaces are
    already "▁". tokenizers misplaces such matches after a Prepend normalizer, so with a dummy
    prefix they stay ordinary BPE pieces.
    """
    types = vocab.token_types
    special = [
        AddedToken(pieces[i], normalized=False, special=True)
        for i in np.flatnonzero((types == TokenType.CONTROL) | (types == TokenType.UNKNOWN))
    ]
    user = [
        AddedToken(pieces[i], normalized=pieces[i] != vocab.tokens[i], special=False)
        for i in np.flatnonzero(types == TokenType.USER_DEFINED)
        if pieces[i] == vocab.tokens[i] or not vocab.add_space_prefix
    ]
    return special + user


def _pipeline(vocab: GGUFVocab, model: BPE, added: list[AddedToken]) -> Tokenizer:
    """The `tokenizers` pipeline of Google's Gemma tokenizer.json around `model`.

    Normalizer " " -> "▁" (after prepending SentencePiece's dummy "▁" to each text fragment when
    the file sets `add_space_prefix`, as llama.cpp does for Llama 2); decoder "▁" -> " ",
    <0xNN> pieces -> bytes, fuse (and drop the dummy prefix's leading space).
    """
    backend = Tokenizer(model)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
        )
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        backend.normalizer = normalizers.Replace(" ", _SPACE)
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([token for token in added if token.special])
    backend.add_tokens([token for token in added if not token.special])
    return backend


def tokenizer_from_gguf(gguf_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to the SentencePiece-BPE tokenizer a GGUF file describes.

    Works the same on every transformers 5.x (it never goes through transformers' GGUF converter).
    `tokenizer(text)` prepends BOS when the file sets `tokenizer.ggml.add_bos_token` (Gemma: `<bos>`,
    id 2); `add_special_tokens=False` adds nothing. The result survives `save_pretrained` /
    `AutoTokenizer.from_pretrained`. Takes a few seconds for a 262,144-piece vocabulary.

    Raises:
        ValueError: the file is not a GGUF, has no tokenizer, or its tokenizer is not
            SentencePiece-BPE (`tokenizer.ggml.model` other than "llama", or no scores);
            transformers' own `from_pretrained(..., gguf_file=...)` handles those.
    """
    vocab = read_gguf_vocab(gguf_path)
    if not is_sentencepiece_bpe(vocab):
        what = (
            f"tokenizer.ggml.model={vocab.model!r}"
            if vocab.model != SPM_TOKENIZER_MODEL
            else f"no {Keys.Tokenizer.SCORES}"
        )
        raise ValueError(
            f"{vocab.path}: tokenizer_from_gguf builds SentencePiece-BPE vocabularies "
            f"({Keys.Tokenizer.MODEL}={SPM_TOKENIZER_MODEL!r} with scores); this file has {what}. "
            "Load its tokenizer with transformers' AutoTokenizer.from_pretrained(..., gguf_file=...)."
        )

    pieces = _spelled(vocab.tokens)
    ids = {piece: index for index, piece in enumerate(pieces)}
    if len(ids) != len(pieces):
        raise ValueError(f"{vocab.path}: the vocabulary spells some pieces twice")
    unk = pieces[vocab.unk_id] if vocab.unk_id is not None else None
    bpe = partial(BPE, ids, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)

    def name(token_id: int | None) -> str | None:
        return None if token_id is None else pieces[token_id]

    # PreTrainedTokenizerFast deep-copies `tokenizer_object` through JSON (seconds with ~500k
    # merges), so it wraps the pipeline with a merge-less model; the full model replaces it after.
    extra: dict[str, Any] = {}
    if vocab.context_length is not None:
        extra["model_max_length"] = vocab.context_length
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_pipeline(vocab, bpe([]), _added_tokens(vocab, pieces)),
        bos_token=name(vocab.bos_id),
        eos_token=name(vocab.eos_id),
        unk_token=unk,
        pad_token=name(vocab.pad_id),
        add_bos_token=vocab.add_bos,
        add_eos_token=vocab.add_eos,
        clean_up_tokenization_spaces=False,
        **extra,
    )
    merges = sentencepiece_bpe_merges(pieces, vocab.scores, vocab.token_types)
    tokenizer.backend_tokenizer.model = bpe(merges)
    if vocab.chat_template is not None:
        tokenizer.chat_template = vocab.chat_template
    return tokenizer
