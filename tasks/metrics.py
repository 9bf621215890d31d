"""Evaluation metrics of the tasks (fine-tuning and export; the service never imports this
module, so the serving image needs neither scikit-learn, seqeval, jiwer nor transformers)."""

from __future__ import annotations

import collections
import re
import string
from functools import lru_cache

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


# --------------------------------------------------------------------------- dense vision


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [n, 4] with every box in b [m, 4] (x1, y1, x2, y2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def detection_map(preds: list[tuple], golds: list[dict], num_classes: int) -> dict:
    """COCO mAP@[.5:.95] and mAP@.5 by pycocotools' own evaluation. `preds`: per image
    (boxes [n, 4], scores [n], labels [n]); `golds`: per image {"boxes", "labels"}; boxes as
    x1, y1, x2, y2 in pixels."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, (gold, (boxes, scores, labels)) in enumerate(zip(golds, preds, strict=True)):
        images.append({"id": i})
        for b, c in zip(gold["boxes"], gold["labels"], strict=True):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "bbox": [float(b[0]), float(b[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, s, c in zip(boxes, scores, labels, strict=True):
            box = [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
            results.append(
                {"image_id": i, "category_id": int(c) + 1, "bbox": box, "score": float(s)}
            )
    if not annotations or not results:
        return {"map": 0.0, "map50": 0.0}
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(0.0, float(ev.stats[0])), "map50": max(0.0, float(ev.stats[1]))}


def segmentation_scores(preds, golds, num_classes: int, ignore: int) -> dict:
    """Mean IoU over the classes present (in the truth or the prediction), pixel accuracy and
    per-class IoU, from one confusion matrix over every non-void pixel."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, g in zip(preds, golds, strict=True):
        g = np.asarray(g).ravel()
        p = np.asarray(p).ravel()
        valid = g != ignore
        conf += np.bincount(
            g[valid].astype(np.int64) * num_classes + p[valid], minlength=num_classes**2
        ).reshape(num_classes, num_classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    iou = inter[present] / union[present]
    return {
        "miou": float(iou.mean()) if iou.size else 0.0,
        "pixel_accuracy": float(inter.sum() / max(1, conf.sum())),
        "per_class_iou": {
            int(c): float(v) for c, v in zip(np.flatnonzero(present), iou, strict=True)
        },
    }


# --------------------------------------------------------------------------- binary (tables)


def binary_scores(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """ROC-AUC, PR-AUC (average precision), and precision, recall and F1 of the positive
    class at `threshold`."""
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y = np.asarray(y).astype(int)
    pred = (np.asarray(p) >= threshold).astype(int)
    prec, rec, f, _ = precision_recall_fscore_support(
        y, pred, labels=[1], average=None, zero_division=0
    )
    both = len(np.unique(y)) == 2
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
        "precision": float(prec[0]),
        "recall": float(rec[0]),
        "f1": float(f[0]),
    }


def multiclass_auc(y: np.ndarray, p: np.ndarray) -> float:
    """One-vs-rest ROC-AUC, averaged over the classes."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p, multi_class="ovr"))


def choose_threshold(y: np.ndarray, p: np.ndarray, target_precision: float | None) -> float:
    """The positive class's decision threshold on validation: the one with the best F1, or,
    with a target precision, the lowest threshold that reaches it (the most recall); 0.5
    when none does."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(np.asarray(y).astype(int), p)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    if target_precision is not None:
        ok = np.flatnonzero(precision >= target_precision)
        return float(thresholds[ok[0]]) if ok.size else 0.5
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1))])


# ------------------------------------------------------------------ speech recognition


@lru_cache(maxsize=1)
def english_normalizer():
    """Whisper's English text normaliser (transformers ships it; scoring only, not served)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


@lru_cache(maxsize=1 << 16)  # the paired bootstrap scores the same texts 200 times
def normalize(text: str) -> str:
    return english_normalizer()(text)


def error_rates(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus WER and CER (jiwer) on normalised text; empty references are skipped."""
    import jiwer

    pairs = [(normalize(h), normalize(r)) for h, r in zip(hypotheses, references, strict=True)]
    pairs = [(h, r) for h, r in pairs if r.strip()]
    if not pairs:
        return {"wer": float("nan"), "cer": float("nan"), "n": 0}
    hyp, ref = [h for h, _ in pairs], [r for _, r in pairs]
    return {"wer": float(jiwer.wer(ref, hyp)), "cer": float(jiwer.cer(ref, hyp)), "n": len(ref)}
