"""What the verifier sees: prompt format, response re-tokenization, cleaning and truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cme_rewards import cached_model_dir
from cme_rewards.formatting import (
    PLAIN_PROMPT_TEMPLATE,
    build_verifier_input,
    clean_response,
    render_prompt,
)

EDGE_RESPONSES = [
    " leading space",
    "two\nlines\n\nand a blank one\n",
    "Ünïcödé façade, naïve — 東京 ✓",
    "Emoji 🎉🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "```python\ndef f(x):\n    return x  # tab\tend\n```",
    "Ok",
    "   ",
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(cached_model_dir("smollm2-135m-instruct"))


@pytest.mark.parametrize("response", EDGE_RESPONSES)
def test_scored_tokens_decode_to_response(tok, response):
    x = build_verifier_input(tok, "Say something.", response)
    assert x.error is None and x.n_scored > 0
    assert tok.decode(x.input_ids[x.n_prompt :]) == response


def test_prompt_uses_verifier_chat_template(tok, cme_vectors):
    row = next(r for r in cme_vectors if r["verifier"] == "smollm2-135m-instruct")
    assert render_prompt(tok, row["prompt"]) == row["verifier_prompt_ids"]
    messages = [{"role": "user", "content": row["prompt"]}]
    assert render_prompt(tok, messages) == row["verifier_prompt_ids"]


def test_plain_template_when_forced_or_missing(tok):
    ids = render_prompt(tok, "Name a colour.", prompt_template=PLAIN_PROMPT_TEMPLATE)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == PLAIN_PROMPT_TEMPLATE.format(prompt="Name a colour.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = render_prompt(tok, messages, prompt_template="Q: {prompt}\nA:")
    assert tok.decode(ids[1:]) == "Q: Be brief.\n\nHi\nA:"


def test_chat_template_override(tok):
    ids = render_prompt(
        tok, "Hi", chat_template="{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    )
    assert tok.decode(ids) == "<<Hi>>"


def test_eos_scored_only_on_request(tok):
    plain = build_verifier_input(tok, "Hi", "Hello there.")
    with_eos = build_verifier_input(tok, "Hi", "Hello there.", score_eos=True)
    assert with_eos.input_ids == [*plain.input_ids, tok.eos_token_id]
    assert with_eos.n_scored == plain.n_scored + 1


def test_clean_response_rules():
    assert clean_response("Paris.<|im_end|><|endoftext|><|endoftext|>") == "Paris."
    assert clean_response("Use <s>strike</s> here</s>") == "Use <s>strike</s> here"
    assert clean_response("a<|x|>b<|x|>", ["<|x|>"]) == "ab"
    assert clean_response("no markers ") == "no markers "


def test_generator_special_tokens_removed_before_tokenizing(tok):
    clean = build_verifier_input(tok, "Hi", "Hello.")
    dirty = build_verifier_input(tok, "Hi", "Hello.<|im_end|>")
    assert dirty.input_ids == clean.input_ids


def test_empty_and_undecodable_responses_are_flagged(tok):
    assert build_verifier_input(tok, "Hi", "").error == "empty response"
    assert build_verifier_input(tok, "Hi", "<|im_end|>").error == "empty response"
    assert (
        build_verifier_input(tok, "Hi", "bad \udc80 text").error == "undecodable text in response"
    )


def test_over_long_prompt_is_cut_from_the_left(tok):
    full = build_verifier_input(tok, "word " * 300, "The answer is four.")
    cut = build_verifier_input(tok, "word " * 300, "The answer is four.", max_length=64)
    assert not full.truncated and cut.truncated
    assert len(cut.input_ids) == 64
    assert cut.input_ids[cut.n_prompt :] == full.input_ids[full.n_prompt :]
    assert (
        cut.input_ids[: cut.n_prompt]
        == full.input_ids[full.n_prompt - cut.n_prompt : full.n_prompt]
    )


def test_over_long_response_keeps_its_first_tokens(tok):
    response = " ".join(f"token{i}" for i in range(200))
    full = build_verifier_input(tok, "Count.", response)
    cut = build_verifier_input(tok, "Count.", response, max_length=50)
    assert cut.truncated and len(cut.input_ids) == 50 and cut.n_prompt == 1
    assert cut.input_ids[1:] == full.input_ids[full.n_prompt : full.n_prompt + 49]
    assert cut.input_ids[0] == full.input_ids[full.n_prompt - 1]


def test_max_length_must_leave_room(tok):
    with pytest.raises(ValueError, match="max_length"):
        build_verifier_input(tok, "Hi", "Hello", max_length=1)
