"""The scrapinghub article-extraction-benchmark metric, replicated faithfully.

Source: github.com/scrapinghub/article-extraction-benchmark, ``evaluate.py``.
Per document: tokenize with ``\\w+`` (case-sensitive), build word 4-gram
shingles (a text shorter than 4 tokens gives one shorter shingle, an empty one
gives none), count TP/FP/FN over the shingle multisets and normalise the three
counts by their sum so that every document weighs the same.  Precision is
averaged over the documents where ``tp + fp > 0`` (an empty prediction is left
out of the precision mean but scores recall 0), recall over those where
``tp + fn > 0``; F1 is the harmonic mean of the two means.  The bootstrap
confidence intervals of the original are not reproduced (they are random).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping

TpFpFn = tuple[float, float, float]

# Same flags as the original; only UNICODE matters for \w.
_TOKEN_RE = re.compile(r"\w+", re.UNICODE | re.MULTILINE | re.IGNORECASE | re.DOTALL)


def tokenize(text: str | None) -> list[str]:
    return _TOKEN_RE.findall(text or "")


def shingles(text: str | None, n: int = 4) -> Counter:
    tokens = tokenize(text)
    grams = (tuple(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1)))
    return Counter(g for g in grams if g)


def shingle_matching(true: str | None, pred: str | None, n: int = 4) -> TpFpFn:
    """Normalised (tp, fp, fn) of one document, as ``string_shingle_matching``."""
    true_sh, pred_sh = shingles(true, n), shingles(pred, n)
    tp = fp = fn = 0.0
    for key in true_sh.keys() | pred_sh.keys():
        t, p = true_sh.get(key, 0), pred_sh.get(key, 0)
        tp += min(t, p)
        fp += max(0, p - t)
        fn += max(0, t - p)
    total = tp + fp + fn
    if total > 0:
        return tp / total, fp / total, fn / total
    return tp, fp, fn


def precision_score(tp: float, fp: float, fn: float) -> float:
    if fp == fn == 0:
        return 1.0
    if tp == fp == 0:
        return 0.0
    return tp / (tp + fp)


def recall_score(tp: float, fp: float, fn: float) -> float:
    if fp == fn == 0:
        return 1.0
    if tp == fn == 0:
        return 0.0
    return tp / (tp + fn)


def metrics_from_tp_fp_fns(tp_fp_fns: Iterable[TpFpFn]) -> dict[str, float]:
    rows = list(tp_fp_fns)
    precision = statistics.mean(precision_score(*r) for r in rows if r[0] + r[1] > 0)
    recall = statistics.mean(recall_score(*r) for r in rows if r[0] + r[2] > 0)
    f1 = 2 * precision * recall / (precision + recall)
    return {"f1": f1, "precision": precision, "recall": recall}


def evaluate(ground_truth: Mapping[str, Mapping], predictions: Mapping[str, str | None]) -> dict[str, float]:
    """Score ``{id: text}`` predictions against ``{id: {"articleBody": ...}}``."""
    if ground_truth.keys() != predictions.keys():
        raise ValueError("prediction keys do not match ground truth")
    rows = [shingle_matching(ground_truth[k].get("articleBody", ""), predictions[k]) for k in ground_truth]
    return metrics_from_tp_fp_fns(rows)
