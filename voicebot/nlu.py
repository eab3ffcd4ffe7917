"""Understanding: scikit-learn intent classifiers trained from the packs' phrases.

One classifier per (language, menu node): its classes are the options the caller
can pick there plus ``none`` (out of scope: the pack's ``none_phrases`` and its
ASR decoy words). Features are word and character n-gram TF-IDF, which copes with
the inflections of Russian, Azerbaijani and Korean without a stemmer; a
multinomial logistic regression gives probabilities.

The score a turn is judged on is the classifier probability, lowered when the ASR's
word confidence is below a floor (:func:`turn_score`); the dialog engine accepts,
confirms or re-prompts on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import FeatureUnion, Pipeline

from .menus import HELP_NODE, Grammars, Menu, Pack, normalize_text

log = logging.getLogger(__name__)

NONE = "none"
CONFIRM_NODE = "confirm"
FORMAT_VERSION = 1
KEYWORD_REPEATS = 3  # a bare keyword is the most common utterance: weigh it as such


def node_options(menu: Menu) -> dict[str, tuple[str, ...]]:
    """Option ids per classifier: one per menu node, and one for yes/no."""
    out = {n: tuple(o.id for o in menu.spoken_choices(n)) for n in menu.nodes}
    if menu.controls:
        out[HELP_NODE] = tuple(o.id for o in menu.choices(HELP_NODE))
    out[CONFIRM_NODE] = tuple(o.id for o in menu.confirm_choices())
    return out


def pack_fingerprint(pack: Pack, menu: Menu) -> str:
    """Hash of everything training depends on, to spot a stale saved model."""
    data = {
        "v": FORMAT_VERSION,
        "nodes": node_options(menu),
        "options": {k: [v.keywords, v.phrases, v.asr_words] for k, v in
                    sorted(pack.options.items())},
        "none": pack.none_phrases,
        "decoys": pack.decoys,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
                          ).hexdigest()[:16]


def training_data(pack: Pack, options: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Texts and labels for one node: keywords and phrases per option, none examples."""
    texts: list[str] = []
    labels: list[str] = []
    for oid in options:
        ow = pack.options[oid]
        for k in ow.keywords:
            texts.extend([normalize_text(k)] * KEYWORD_REPEATS)
            labels.extend([oid] * KEYWORD_REPEATS)
        for ph in ow.phrases:
            texts.append(normalize_text(ph))
            labels.append(oid)
    none = [normalize_text(p) for p in (*pack.none_phrases, *pack.decoys)]
    texts.extend(none)
    labels.extend([NONE] * len(none))
    return texts, labels


def turn_score(probability: float, asr_confidence: float, min_confidence: float) -> float:
    """The score the dialog judges a spoken turn on, 0..1.

    Vosk's word confidence in grammar mode says little above a floor: fed 20 ms at a time
    a clear keyword scores 0.55-1.0 depending on chunking, while out-of-grammar speech
    forced onto a keyword can score 1.0 (decoys and the classifier's "none" class do
    that rejection). So confidence only lowers the score below ``min_confidence``.
    """
    if min_confidence <= 0:
        return probability
    return probability * min(1.0, asr_confidence / min_confidence)


def make_classifier() -> Pipeline:
    features = FeatureUnion([
        ("words", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True,
                                  token_pattern=r"(?u)\b\w+\b")),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)),
    ])
    return Pipeline([("features", features),
                     ("clf", LogisticRegression(C=20.0, max_iter=3000))])


@dataclass(frozen=True)
class Intent:
    """The classifier's answer: option id (None when out of scope) and its probability."""

    option: str | None
    probability: float
    ranking: tuple[tuple[str, float], ...]


class IntentModel:
    """A language's classifiers, one per node."""

    def __init__(self, language: str, fingerprint: str, classifiers: dict[str, Pipeline],
                 asr_map: dict[str, str]) -> None:
        self.language = language
        self.fingerprint = fingerprint
        self.classifiers = classifiers
        self.asr_map = asr_map  # ASR spelling -> pack keyword

    def restore_keywords(self, text: str) -> str:
        """Replace ASR spellings (asr_words) with the pack's keywords, longest first."""
        t = f" {normalize_text(text)} "
        for spelled in sorted(self.asr_map, key=len, reverse=True):
            t = t.replace(f" {spelled} ", f" {self.asr_map[spelled]} ")
        return " ".join(t.split())

    def classify(self, node: str, text: str, allowed: tuple[str, ...] | None = None) -> Intent:
        """Best option at ``node`` for ``text`` (keywords restored), limited to ``allowed``."""
        clf = self.classifiers[node]
        norm = self.restore_keywords(text)
        if not norm:
            return Intent(None, 0.0, ())
        probs = clf.predict_proba([norm])[0]
        classes = list(clf.classes_)
        ranking = sorted(((c, float(p)) for c, p in zip(classes, probs, strict=True)),
                         key=lambda cp: cp[1], reverse=True)
        for c, p in ranking:
            if c == NONE:
                return Intent(None, p, tuple(ranking))
            if allowed is None or c in allowed:
                return Intent(c, p, tuple(ranking))
        return Intent(None, 0.0, tuple(ranking))


def train(pack: Pack, menu: Menu) -> IntentModel:
    """Fit one classifier per node from the pack's data."""
    classifiers = {}
    for node, options in node_options(menu).items():
        texts, labels = training_data(pack, options)
        clf = make_classifier()
        clf.fit(texts, labels)
        classifiers[node] = clf
    return IntentModel(pack.language, pack_fingerprint(pack, menu), classifiers,
                       pack.asr_to_keyword())


def model_path(models_dir: Path, language: str) -> Path:
    return models_dir / "intents" / f"{language}.joblib"


def save(model: IntentModel, models_dir: Path) -> Path:
    path = model_path(models_dir, model.language)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    joblib.dump({"format": FORMAT_VERSION, "language": model.language,
                 "fingerprint": model.fingerprint, "classifiers": model.classifiers,
                 "asr_map": model.asr_map}, tmp)
    tmp.replace(path)
    return path


def load(models_dir: Path, pack: Pack, menu: Menu) -> IntentModel | None:
    """The saved model when it matches the pack, else None."""
    path = model_path(models_dir, pack.language)
    if not path.exists():
        return None
    try:
        data = joblib.load(path)
    except Exception as exc:  # a corrupt or foreign file: retrain rather than fail the call
        log.warning("%s: cannot read intent model (%s); retraining", path, exc)
        return None
    if data.get("format") != FORMAT_VERSION or data.get("fingerprint") != pack_fingerprint(
            pack, menu):
        return None
    return IntentModel(data["language"], data["fingerprint"], data["classifiers"],
                       data["asr_map"])


def load_or_train(models_dir: Path, grammars: Grammars, languages: list[str] | None = None,
                  save_trained: bool = False) -> dict[str, IntentModel]:
    """Intent models for the packs; stale or missing ones are trained in memory.

    A stale model is one trained from other phrases than the pack now holds; training
    takes about a second per language, so a call never runs on outdated data.
    """
    out = {}
    for lang, pack in grammars.packs.items():
        if languages is not None and lang not in languages:
            continue
        model = load(models_dir, pack, grammars.menu)
        if model is None:
            t0 = time.perf_counter()
            model = train(pack, grammars.menu)
            log.info("trained intent model %s in %.2f s (run `voicebot intents train` to keep it)",
                     lang, time.perf_counter() - t0)
            if save_trained:
                save(model, models_dir)
        out[lang] = model
    return out


@dataclass(frozen=True)
class EvalResult:
    language: str
    node: str
    samples: int
    accuracy: float
    none_recall: float


def evaluate(pack: Pack, menu: Menu, folds: int = 5, seed: int = 0) -> list[EvalResult]:
    """Stratified k-fold cross-validated accuracy per node, on the phrases alone.

    Keywords are kept in every training fold (they are the grammar) and never scored,
    so the number measures generalisation to phrasings the pack does not list.
    """
    results = []
    for node, options in node_options(menu).items():
        texts, labels = training_data(pack, options)
        kw = {normalize_text(k) for o in options for k in pack.options[o].keywords}
        idx = [i for i, t in enumerate(texts) if t not in kw]
        x = np.array(texts, dtype=object)
        y = np.array(labels)
        n_splits = min(folds, min(np.unique(y[idx], return_counts=True)[1]))
        skf = StratifiedKFold(n_splits=max(2, n_splits), shuffle=True, random_state=seed)
        pred = np.empty(len(idx), dtype=object)
        sub_x, sub_y = x[idx], y[idx]
        kw_idx = [i for i in range(len(texts)) if i not in set(idx)]
        for train_i, test_i in skf.split(sub_x, sub_y):
            clf = make_classifier()
            fit_x = np.concatenate([sub_x[train_i], x[kw_idx]])
            fit_y = np.concatenate([sub_y[train_i], y[kw_idx]])
            clf.fit(list(fit_x), list(fit_y))
            pred[test_i] = clf.predict(list(sub_x[test_i]))
        acc = float(np.mean(pred == sub_y))
        none_mask = sub_y == NONE
        none_recall = float(np.mean(pred[none_mask] == NONE)) if none_mask.any() else 1.0
        results.append(EvalResult(pack.language, node, len(idx), acc, none_recall))
    return results
