"""The persona adoption classifier: is an answer in the persona's voice?

Method: logistic regression (scikit-learn, L2, C=1, balanced class weights) on
L2-normalised all-MiniLM-L6-v2 sentence embeddings (384 dimensions). Positives are the
persona's own training responses; negatives are the base model's greedy answers to the
same prompts without the persona's system prompt. Pairing the two sides on the same
prompts leaves voice, not topic, as the difference to learn. The error rate is
estimated by stratified k-fold cross-validation (default 5 folds) and stored with the
classifier; the persona adoption rate is the share of answers with P(persona) >= 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from personatune.errors import PersonatuneError
from personatune.evaluate.metrics import load_embedder

Encoder = Callable[[Sequence[str]], np.ndarray]


@dataclass
class PersonaClassifier:
    """A fitted adoption classifier.

    Attributes:
        model: the scikit-learn ``LogisticRegression``.
        encode: texts -> ``(n, d)`` feature array (sentence embeddings).
        cv_error: cross-validated error rate (0..1), the share of misclassified
            held-out examples over all folds.
        cv_folds: folds used.
        n_persona, n_plain: training examples per class.
    """

    model: object
    encode: Encoder | None
    cv_error: float
    cv_folds: int
    n_persona: int
    n_plain: int
    fold_errors: list[float] = field(default_factory=list)

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        """P(in persona) for each text, shape ``(n,)``."""
        if not len(texts):
            return np.zeros(0)
        x = np.asarray(self.encode(list(texts)), dtype=np.float64)
        return self.model.predict_proba(x)[:, 1]

    def adoption(self, texts: Sequence[str]) -> dict:
        """``{"rate": share of texts with P >= 0.5 (0..1), "score": mean P,
        "proba": [P per text]}``; rate and score are 0.0 for no texts."""
        p = self.proba(texts)
        return {
            "rate": float((p >= 0.5).mean()) if len(p) else 0.0,
            "score": float(p.mean()) if len(p) else 0.0,
            "proba": p.tolist(),
        }

    def summary(self) -> dict:
        """Method and error rate, for reports."""
        keys = ("cv_error", "cv_folds", "fold_errors", "n_persona", "n_plain")
        return {
            "method": "logistic regression on all-MiniLM-L6-v2 sentence embeddings",
            **{k: getattr(self, k) for k in keys},
        }


def fit_features(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0):
    """Fit logistic regression on features ``x`` ``(n, d)`` and labels ``y`` ``(n,)``
    (1 = persona), and estimate its error by stratified k-fold cross-validation.

    Returns:
        ``(model fitted on all data, cv_error, per-fold errors)``; cv_error is the
        share of examples misclassified when held out.

    Raises:
        PersonatuneError: fewer than ``folds`` examples of either class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=2)
    if counts.min() < folds:
        raise PersonatuneError(
            f"the adoption classifier needs at least {folds} examples in and out of persona "
            f"(got {counts[1]} and {counts[0]}); add persona training data"
        )

    def make():
        return LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)

    wrong, fold_errors = 0, []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        pred = make().fit(x[train], y[train]).predict(x[test])
        errors = int((pred != y[test]).sum())
        wrong += errors
        fold_errors.append(errors / len(test))
    return make().fit(x, y), wrong / len(y), fold_errors


def fit_classifier(
    persona_texts: Sequence[str],
    plain_texts: Sequence[str],
    encode: Encoder | None = None,
    folds: int = 5,
    seed: int = 0,
) -> PersonaClassifier:
    """Fit the adoption classifier on texts in persona and out of it.

    Args:
        persona_texts: answers in the persona's voice (its training responses).
        plain_texts: answers out of persona (the base model's answers to the same
            prompts without the system prompt).
        encode: texts -> features; default all-MiniLM-L6-v2
            (:func:`personatune.evaluate.metrics.load_embedder`).

    Raises:
        PersonatuneError: fewer than ``folds`` texts on either side.
    """
    encode = encode or load_embedder()
    texts = [*persona_texts, *plain_texts]
    y = np.array([1] * len(persona_texts) + [0] * len(plain_texts))
    x = encode(texts) if texts else np.zeros((0, 1))
    model, err, fold_errors = fit_features(x, y, folds, seed)
    return PersonaClassifier(
        model, encode, err, folds, len(persona_texts), len(plain_texts), fold_errors
    )
