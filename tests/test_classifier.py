"""The persona adoption classifier: error rate on separable and inseparable data, and the
adoption rate it reports."""

import numpy as np
import pytest

from personatune.errors import PersonatuneError
from personatune.evaluate.classifier import fit_classifier, fit_features


def blobs(n, shift, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-shift, 1, (n, dim)), rng.normal(shift, 1, (n, dim))])
    y = np.array([0] * n + [1] * n)
    return x, y


def test_separable_data_has_zero_cross_validated_error():
    """Guards against a cross-validation that leaks or mislabels folds: two blobs 6
    standard deviations apart are classified without error."""
    x, y = blobs(40, 3.0)
    model, err, folds = fit_features(x, y, folds=5, seed=0)
    assert err == 0.0 and folds == [0.0] * 5
    new, _ = blobs(10, 3.0, seed=1)
    assert (model.predict(new) == [0] * 10 + [1] * 10).all()


def test_inseparable_data_has_chance_error():
    """Guards against reporting training error as the error rate: with both classes drawn
    from one distribution, held-out error must be near 50%, not near 0."""
    x, y = blobs(100, 0.0)
    _, err, _ = fit_features(x, y, folds=5, seed=0)
    assert 0.35 <= err <= 0.65


def test_adoption_rate_and_score_from_text_features():
    """Guards against an inverted label (persona = 1) and a rate that is not a share."""

    def enc(texts):
        rng = np.random.default_rng(len(texts))
        return np.array([[1.0 if "arr" in t else -1.0, 0.0] for t in texts]) + 0.1 * rng.normal(
            size=(len(texts), 2)
        )

    clf = fit_classifier([f"arr {i}" for i in range(10)], [f"plain {i}" for i in range(10)], enc)
    assert clf.cv_error == 0.0 and clf.n_persona == clf.n_plain == 10
    a = clf.adoption(["arr matey", "a plain answer", "arr", "another"])
    assert a["rate"] == pytest.approx(0.5)
    assert a["proba"][0] > 0.5 > a["proba"][1]
    assert clf.summary()["method"].startswith("logistic regression")
    assert clf.adoption([]) == {"rate": 0.0, "score": 0.0, "proba": []}


def test_too_few_examples_is_a_clear_error():
    """Guards against sklearn's cryptic fold error when a persona has almost no data."""
    with pytest.raises(PersonatuneError, match="at least 5 examples"):
        fit_features(np.zeros((6, 2)), np.array([1, 1, 1, 0, 0, 0]))


@pytest.mark.integration
def test_minilm_classifier_separates_pirate_from_plain_voice():
    """Guards against an embedding that misses the voice: pirate answers and plain answers
    to the same questions are told apart with under 10% cross-validated error."""
    import csv
    from pathlib import Path

    rows = list(csv.DictReader(open(Path(__file__).parents[1] / "examples/pirate/pirate.csv")))
    plain = list(
        csv.DictReader(open(Path(__file__).parents[1] / "examples/pirate/preservation.csv"))
    )
    persona = [r["response"] for r in rows[:100] if len(r["response"].split()) > 4]
    clf = fit_classifier(persona, [r["response"] for r in plain[:100]])
    assert clf.cv_error < 0.1
