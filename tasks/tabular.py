"""Tabular classification (DESIGN.md §0): one row of named features in, a class out.

The card's preprocessing lists the features in the model's column order, each `numeric` or
`categorical` (with its categories, most frequent first). A row is encoded here, identically
in training, export and serving: numbers as float, categories as their index, a category
training never saw as the "other" index (`len(categories)`), a missing value as NaN (the
gradient-boosted trees route NaN to the side training learned for it).

ONNX: input `features` FP32 [batch, features]; output `probabilities` [batch, classes]. The
API takes {"inputs": [{"feature": value, ...}]} and answers {"label", "score", "top_k"}; for
two classes the label is the positive class when its probability reaches the decision
threshold chosen on validation (card `postprocessing.threshold`). OIP: one BYTES tensor per
feature, named as the feature (numbers as text; an empty element is a missing value).
"""

from __future__ import annotations

import math

import numpy as np

from tasks.base import Output, Task, top_k_param
from tasks.common import Prepared
from tasks.drift import FEATURE, MAX_FEATURES, Samples
from tasks.errors import InputError

FEATURES = "features"  # the ONNX input


class TabularClassification(Task):
    name = "tabular-classification"
    metric = "roc_auc"
    checks = ("prediction", "confidence", "embedding", "input")
    onnx_outputs = {"probabilities": {0: "batch"}}
    params = {"top_k": int}

    def __init__(self, spec, tokenizer=None, limits=None):
        super().__init__(spec, tokenizer, limits)
        self.features = list(self.pre["features"])
        self.columns = [f["name"] for f in self.features]
        self.index = {
            f["name"]: {c: i for i, c in enumerate(f["categories"])}
            for f in self.features
            if f["kind"] == "categorical"
        }
        self.oip_input_names = tuple(self.columns)
        self.oip_numeric_inputs = {FEATURES: len(self.columns)}
        # One drift check per column (the first MAX_FEATURES), beside the four of every task.
        self.checks = type(self).checks + tuple(FEATURE + c for c in self.columns[:MAX_FEATURES])

    @property
    def example_input(self) -> dict:
        return {
            f["name"]: f["categories"][0] if f["kind"] == "categorical" else f.get("median", 0.0)
            for f in self.features
        }

    # ------------------------------------------------------------------ inputs

    def encode_value(self, feature: dict, value, where: str = "") -> float:
        """One value as the model's float (InputError naming the column when it cannot be)."""
        name = feature["name"]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.nan
        if feature["kind"] == "categorical":
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise InputError(
                    "wrong_type",
                    f"{where}column '{name}' is categorical: send a string, "
                    f"got {type(value).__name__}",
                )
            key = str(value).strip()
            if isinstance(value, float) and value.is_integer():
                key = str(int(value))
            return float(self.index[name].get(key, len(feature["categories"])))
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise InputError("wrong_type", f"{where}column '{name}' is numeric: got {value!r}")
        if isinstance(value, str) and not value.strip():
            return math.nan
        try:
            number = float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer of 309+ digits
            number = None
        if number is None or math.isinf(number):  # JSON's 1e400 and Infinity read as inf
            text = str(value)
            shown = repr(value) if len(text) <= 40 else f"a number of {len(text)} digits"
            raise InputError(
                "wrong_type", f"{where}column '{name}' is numeric: {shown} is not a finite number"
            )
        return number

    def decode(self, value) -> Prepared:
        if isinstance(value, Prepared):  # an OIP FP32 row, checked by encoded_rows
            return value
        if not isinstance(value, dict):
            raise InputError(
                "wrong_type",
                f"tabular inputs are objects of feature: value, got {type(value).__name__}",
            )
        missing = [c for c in self.columns if c not in value]
        unknown = sorted(set(value) - set(self.columns))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing column(s) {', '.join(missing)} (send null for unknown)")
            if unknown:
                parts.append(f"unknown column(s) {', '.join(unknown)}")
            raise InputError("bad_columns", "; ".join(parts))
        row = np.array([self.encode_value(f, value[f["name"]]) for f in self.features])
        return Prepared(row)

    def from_holdout(self, value) -> Prepared:
        return Prepared(np.asarray(value, dtype=np.float64))

    def holdout_request(self, value) -> dict:
        """An encoded row back as the request a client sends."""
        row = {}
        for f, v in zip(self.features, np.asarray(value, dtype=np.float64), strict=True):
            if math.isnan(v):
                row[f["name"]] = None
            elif f["kind"] == "categorical":
                cats = f["categories"]
                row[f["name"]] = cats[int(v)] if int(v) < len(cats) else "<unseen>"
            else:
                row[f["name"]] = float(v)
        return row

    def feeds(self, items, stats: dict | None = None) -> dict:
        x = np.stack([i.value for i in items]).astype(np.float32)
        if stats is not None:
            stats["missing"] = np.isnan(x).sum(1).tolist()
            stats["rows"] = list(x)  # the per-column drift checks
        return {FEATURES: x}

    def parity_feeds(self, items, length=None) -> dict:
        return self.feeds(items)

    def run(self, session_run, items, stats=None):
        feeds = self.feeds(items, stats)
        probs = np.asarray(session_run(feeds)[0], dtype=np.float64)
        return probs, self.embedding(feeds[FEATURES])

    def embedding(self, x: np.ndarray) -> np.ndarray:
        """The rows standardised by the training statistics, missing as the mean: the
        multivariate view of the inputs the embedding drift check compares."""
        mean = np.array([f.get("mean", 0.0) for f in self.features])
        std = np.array([f.get("std", 1.0) or 1.0 for f in self.features])
        return np.nan_to_num((x - mean) / std)

    def input_summary(self, rows: list) -> dict:
        """Reference statistics of encoded rows (export): missing values per row and, per
        feature, the quantiles (numeric) or the category shares (categorical)."""
        from tasks.common import quantile_hist

        x = np.stack(rows).astype(np.float64)
        out = {"missing_per_row": quantile_hist(np.isnan(x).sum(1))}
        for j, f in enumerate(self.features):
            col = x[:, j][~np.isnan(x[:, j])]
            if f["kind"] == "numeric":
                out[f["name"]] = quantile_hist(col) if col.size else {}
            else:
                k = len(f["categories"])
                shares = np.bincount(col.astype(int), minlength=k + 1) / max(1, col.size)
                out[f["name"]] = {
                    "shares": dict(zip([*f["categories"], "<other>"], shares.tolist(), strict=True))
                }
        return out

    def warm_items(self):
        item = Prepared(np.zeros(len(self.features)))
        return item, item

    # ------------------------------------------------------------------ answers

    def check_params(self, params: dict) -> dict:
        return top_k_param(super().check_params(params))

    @property
    def positive(self) -> int:
        """Two classes: the index of the positive (rarer) class the threshold is for."""
        return self.labels.index(self.post.get("positive", self.labels[-1]))

    def predicted(self, p: np.ndarray) -> int:
        """The class: the positive one at or above the threshold (two classes), else argmax."""
        if len(self.labels) == 2 and "threshold" in self.post:
            pos = self.positive
            return pos if p[pos] >= self.post["threshold"] else 1 - pos
        return int(np.argmax(p))

    def postprocess(self, output: np.ndarray, params: dict) -> dict:
        p = np.asarray(output, dtype=np.float64)
        label = self.predicted(p)
        order = np.argsort(-p)[: max(1, min(params.get("top_k", 1), len(self.labels)))]
        return {
            "label": self.labels[label],
            "score": float(p[label]),
            "top_k": [{"label": self.labels[i], "score": float(p[i])} for i in order],
        }

    def example_answer(self) -> dict:
        return {
            "label": self.labels[-1],
            "score": 0.8,
            "top_k": [{"label": self.labels[-1], "score": 0.8}],
        }

    def answer_key(self, output) -> int:
        return self.predicted(np.asarray(output))

    def drift_samples(self, outputs, embedding, stats) -> Samples:
        p = np.asarray(outputs, dtype=np.float64)
        pred = np.array([self.predicted(row) for row in p])
        return Samples(
            pred,
            p.max(1),
            embedding,
            np.asarray(stats["missing"], dtype=np.float64),
            features=np.stack(stats["rows"]).astype(np.float64),
            kinds=tuple(f["kind"] for f in self.features),
        )

    def drift_prior(self, train_per_class: dict[str, int]) -> list[float] | None:
        return None  # the thresholded predictions' shares, measured on the holdout

    def score(self, outputs, targets) -> dict:
        from tasks.metrics import binary_scores, classification_metrics, multiclass_auc

        p = np.asarray(outputs, dtype=np.float64)
        y = np.asarray(targets)
        pred = np.array([self.predicted(row) for row in p])
        m = classification_metrics(y, pred, self.labels)
        out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        if len(self.labels) == 2:
            pos = self.positive
            out |= binary_scores(y == pos, p[:, pos], self.post.get("threshold", 0.5))
        else:
            out["roc_auc"] = multiclass_auc(y, p)
        return out

    # ------------------------------------------------------------------ OIP

    def oip_items(self, tensors: dict[str, list]) -> list:
        """One BYTES tensor per feature, named as the feature (numbers as their text), or
        one FP32 [n, features] tensor `features` in the card's column order, categories as
        their index (the card's `categories` order; len(categories) = unseen), NaN missing."""
        if FEATURES in tensors and FEATURES not in self.columns:
            if len(tensors) != 1:
                raise InputError(
                    "bad_request", f"send '{FEATURES}' alone, not with {list(tensors)}"
                )
            return list(self.encoded_rows(tensors[FEATURES]))
        numeric = [k for k, v in tensors.items() if isinstance(v, np.ndarray)]
        if numeric:
            raise InputError("wrong_type", f"{', '.join(numeric)}: per-feature tensors are BYTES")
        unknown = sorted(set(tensors) - set(self.columns))
        if unknown:
            raise InputError("bad_request", f"unknown input tensor(s) {', '.join(unknown)}")
        counts = {len(v) for v in tensors.values()}
        if len(counts) != 1:
            raise InputError("bad_request", "the feature tensors hold different numbers of rows")
        return [{k: _plain(v[i]) for k, v in tensors.items()} for i in range(counts.pop())]

    def encoded_rows(self, x) -> list[Prepared]:
        """Rows already encoded as the model's floats, each value checked (400 naming the
        row and the column)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise InputError(
                "bad_tensor",
                f"'{FEATURES}' must be [n, {len(self.features)}] (columns "
                f"{', '.join(self.columns)}), got {list(x.shape)}",
            )
        for j, f in enumerate(self.features):
            col = x[:, j]
            if f["kind"] == "categorical":
                n = len(f["categories"])
                bad = ~np.isnan(col) & ((col != np.round(col)) | (col < 0) | (col > n))
            else:
                bad = np.isinf(col)
            if bad.any():
                i = int(np.argmax(bad))
                allowed = f"a category index 0..{n}" if f["kind"] == "categorical" else "finite"
                raise InputError(
                    "wrong_type",
                    f"row {i}, column '{f['name']}': {col[i]!r} is not {allowed}",
                )
        return [Prepared(row) for row in x]

    def oip_outputs(self) -> list[Output]:
        n = len(self.labels)
        return [Output("probabilities", "FP32", (n,)), Output("label", "BYTES")]

    def oip_tensors(self, outputs, responses) -> dict:
        return {
            "probabilities": np.asarray(outputs, dtype=np.float32),
            "label": [r["label"] for r in responses],
        }


def _plain(v):
    """A BYTES element as text; an empty one is a missing value."""
    if isinstance(v, bytes | bytearray):
        v = bytes(v).decode("utf-8", errors="replace")
    return v if v != "" else None
