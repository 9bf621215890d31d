"""Evaluation metrics of the tasks (fine-tuning and export; the service never imports this
module, so the serving image needs neither scikit-learn nor seqeval)."""

from __future__ import annotations

import collections
import re
import string

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.metrics import precision_recall_fscore_support as prfs

    idx = list(range(len(labels)))
    p, r, f, s = prfs(y_true, y_pred, labels=idx, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist(),
    }


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level micro and per-type precision, recall and F1 by seqeval's (conlleval's)
    rules, from IOB2 tags per token."""
    from seqeval.metrics import classification_report

    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    return {
        "entity_f1": float(micro["f1-score"]),
        "entity_precision": float(micro["precision"]),
        "entity_recall": float(micro["recall"]),
        "per_type": {
            k: {
                "precision": float(v["precision"]),
                "recall": float(v["recall"]),
                "f1": float(v["f1-score"]),
                "support": int(v["support"]),
            }
            for k, v in report.items()
            if k not in ("micro avg", "macro avg", "weighted avg")
        },
    }


# SQuAD v1.1 / v2.0 official evaluation (evaluate-v2.0.py): normalise, then token overlap.


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:  # no-answer: right only when both are empty
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], answers: list[list[str]]) -> dict:
    """Exact match and F1, each the best over a question's gold answers (an empty list: the
    question has no answer, and only "" is right)."""
    em, f = [], []
    for p, golds in zip(predictions, answers, strict=True):
        golds = golds or [""]
        em.append(max(exact_match(p, g) for g in golds))
        f.append(max(f1(p, g) for g in golds))
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f))}
