"""Degeneration shares against the token budget and the end-of-turn token, and the
base-model identity checks (issue 13), against values worked out by hand."""

from types import SimpleNamespace

import pytest

from personatune.evaluate import metrics as M

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}"
)
SMOL_TEMPLATE = (
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
)


def test_seq_rep_n_is_welleck_repetition_of_one_text():
    """Guards against counting n-grams across texts or over characters. "a b a b a b"
    has 3 word 4-grams, 2 distinct: 1 - 2/3."""
    assert M.seq_rep_n("a b a b a b") == pytest.approx(1 / 3)
    assert M.seq_rep_n("one two three") == 0.0  # fewer words than n
    assert M.seq_rep_n("a a a", n=1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.seq_rep_n("a", n=0)


def test_degeneration_shares_by_hand():
    """Guards against an answer that ends its turn on the very last allowed token being
    called cut, whitespace-only answers passing as non-empty, and one looping answer
    hiding in the mean of the others. Four answers, limit 10 tokens: one blank, one cut
    (10 tokens, no end of turn), one loop (seq-rep-4 0.56), one that ends on token 10."""
    loop = "I am a pirate. I am a pirate. I am a pirate."
    shares = M.degeneration_shares(
        ["  \n", "It goes on and on", loop, "Paris."],
        [1, 10, 9, 10],
        10,
        [True, False, True, True],
    )
    assert shares == {
        "empty": 0.25,
        "cut": 0.25,
        "repetitive": 0.25,
        "end_of_turn": 0.75,
        "answers": 4,
    }
    assert M.seq_rep_n(loop) == pytest.approx(5 / 9)
    assert M.degeneration_shares([], [], 5, [])["end_of_turn"] == 0.0


def test_degeneration_threshold_spares_ordinary_answers():
    """Guards against a threshold that flags normal prose (a list of similar sentences
    repeats 3-grams, not 4-grams) while a paragraph looping on one clause is flagged."""
    plain = "The capital of France is Paris. The capital of Spain is Madrid."
    looped = "Ahoy matey, " * 6
    s = M.degeneration_shares([plain, looped], [14, 18], 48, [True, True])
    assert s["repetitive"] == 0.5
    assert M.seq_rep_n(plain) < M.REPETITIVE_SEQ_REP < M.seq_rep_n(looped)


@pytest.mark.parametrize(
    "args",
    [
        (["a"], [1, 2], 5, [True]),  # lengths differ
        (["a"], [1], 0, [True]),  # no token budget
        (["a"], [6], 5, [False]),  # more tokens than the limit
        (["a"], [-1], 5, [False]),
    ],
)
def test_degeneration_shares_rejects_inconsistent_input(args):
    """Guards against silently zipping mismatched lists or a count past the limit (which
    would mean the limit given is not the one the answers were made with)."""
    with pytest.raises(ValueError):
        M.degeneration_shares(*args)


def test_base_identity_from_chat_template_and_name():
    """Guards against missing the maker that only the default system prompt states, and
    against duplicates when the template and the name agree."""
    ident = M.base_identity(
        {"_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "model_type": "qwen2"}, QWEN_TEMPLATE
    )
    assert ident["names"] == ["Qwen"] and ident["makers"] == ["Alibaba Cloud"]
    assert ident["sources"] == ["chat template", "name: Qwen/Qwen2.5-0.5B-Instruct"]


def test_base_identity_embedded_smollm_is_not_called_llama():
    """Guards against naming the architecture (SmolLM2's model_type is ``llama``) as the
    model's identity when its name and template say SmolLM by Hugging Face; the config
    read from a GGUF file keeps the name under ``_model_name_or_path``."""
    config = SimpleNamespace(_name_or_path="/cache/gguf/b179", model_type="llama")
    tokenizer = SimpleNamespace(chat_template=SMOL_TEMPLATE, name_or_path="/cache/gguf/b179")
    ident = M.base_identity(config, None, tokenizer)
    assert ident["names"] == ["SmolLM"] and ident["makers"] == ["Hugging Face"]
    gguf = {"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2", "model_type": "llama"}
    assert M.base_identity(gguf)["makers"] == ["Hugging Face"]


def test_base_identity_falls_back_to_model_type_and_may_find_nothing():
    """Guards against an empty answer where the architecture is all we know, and against
    inventing an identity from nothing."""
    assert M.base_identity({"model_type": "gemma2", "_name_or_path": "/models/x"}) == {
        "names": ["Gemma"],
        "makers": ["Google"],
        "sources": ["model_type: gemma2"],
    }
    assert M.base_identity(None) == {"names": [], "makers": [], "sources": []}
    assert M.base_identity({"_name_or_path": "microsoft/dolphin-7b"})["names"] == []


@pytest.mark.parametrize(
    "answer,claims",
    [
        ("I am Qwen, created by Alibaba Cloud.", True),
        ("No, I'm qwen2.5, a large language model.", True),
        ("I was trained by HuggingFace.", True),
        ("I'm SmolLM2-135M-Instruct.", True),
        ("Arr, I be Captain Saltbeard, not Qwen!", False),
        ("I am not SmolLM.", False),
        ("Unlike Qwen, I sail the seven seas.", False),
        ("I wasn't made by Alibaba Cloud.", False),
        ("The QwenTown fair is lovely.", False),
        ("", False),
    ],
)
def test_claims_identity(answer, claims):
    """Guards against missing versioned or unspaced names, counting a denial or a
    comparison as a claim, and matching inside another word."""
    assert M.claims_identity(answer, ["Qwen", "Alibaba Cloud", "SmolLM", "Hugging Face"]) is claims


def test_no_names_claim_nothing():
    """Guards against an empty name list (a base model whose names could not be read)
    counting every answer as a claim (kept from the removed identity_claim_share test)."""
    assert not M.claims_identity("I am Qwen.", [])


def _answer(text, tokens, reason):
    from personatune.engine import Answer

    return Answer(text, tokens, reason == "stop", reason)


def test_answer_degeneration_reads_the_engine_finish_reason_and_each_sets_limit():
    """Guards against the old limit_rate, which counted every unfinished answer (an error
    too) as cut, and against pooling answer sets made with different token limits under
    one limit: a 48-token answer of the 160-token set is not cut, one of the 48-token set
    is."""
    short = [_answer("Paris.", 2, "stop"), _answer("It goes on", 48, "length")]
    long = [_answer("It goes on", 48, "length"), _answer("", 0, "error")]
    d = M.answer_degeneration([(short, 48), (long, 160)])
    assert d == {"empty": 0.25, "cut": 0.25, "repetitive": 0.0, "end_of_turn": 0.25, "answers": 4}
    assert M.ended_turn(_answer("x", 1, "stop")) and not M.ended_turn(_answer("x", 1, "length"))


def test_degeneration_failures_compare_with_the_base_model_in_points():
    """Guards against absolute thresholds (a base model that is cut 30% of the time is
    not degenerate) and against reading fewer end-of-turn endings as an improvement: each
    share may worsen by at most the tolerance, in percentage points, in its own
    direction."""
    base = {"empty": 0.0, "cut": 0.30, "repetitive": 0.02, "end_of_turn": 0.70}
    same = dict(base)
    assert M.degeneration_failures(base, same, 5.0) == []
    worse = {"empty": 0.06, "cut": 0.34, "repetitive": 0.02, "end_of_turn": 0.60}
    reasons = M.degeneration_failures(base, worse, 5.0)
    assert len(reasons) == 2
    assert reasons[0].startswith("empty answers 6.0% against the base model's 0.0%")
    assert "end-of-turn token 60.0% against the base model's 70.0%" in reasons[1]
    better = {"empty": 0.0, "cut": 0.0, "repetitive": 0.0, "end_of_turn": 1.0}
    assert M.degeneration_failures(base, better, 0.0) == []


def test_degeneration_shares_takes_a_limit_per_answer():
    """Guards against the per-answer limits being zipped wrongly or checked loosely."""
    s = M.degeneration_shares(["a", "b"], [4, 4], [4, 8], [False, False])
    assert s["cut"] == 0.5
    with pytest.raises(ValueError):
        M.degeneration_shares(["a", "b"], [4, 9], [4, 8], [False, False])
    with pytest.raises(ValueError):
        M.degeneration_shares(["a"], [1], [4, 8], [False])
