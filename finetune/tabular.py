"""Tabular classification: gradient-boosted trees (scikit-learn's HistGradientBoosting), the
default, or an MLP with embeddings for categories (`--backbone mlp`, finetune/tabular_mlp.py).

    python -m finetune ../shared/data/german_credit/german.data --label-column -1

Rows are encoded by the task contract (`tasks/tabular.py`), as export and the service encode
them; trees need no scaling and route missing values themselves. Rare positives: class
weights inversely proportional to the class counts when the rarest class is under 20% of
the rows (or with --class-weighting balanced), and for two classes a decision threshold
chosen on validation, for the best F1 or --target-precision, stored with the model.
`--init-from RUN` continues an earlier run's trees on new rows of the same schema (more
boosting rounds from where it stopped; an MLP's weights at a tenth of the learning rate),
the way a fraud model is refreshed each month.

Trees are saved with skops (a safe, inspectable format: no pickle is executed on load), the
MLP with safetensors.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import tasks
from finetune import checkpoint
from finetune.data import describe
from finetune.data_tabular import TASK, load_tabular_dataset, schema
from finetune.errors import CheckpointError, DataError

ROUNDS = 300  # boosting rounds at most (early stopping on an inner 10% usually stops first)
MORE_ROUNDS = (
    50  # --init-from: rounds added on the new data (no early stopping: it would stop at once)
)
# Candidate settings, chosen by 5-fold cross-validation on the training split (small tables
# overfit the defaults: German credit CV ROC-AUC 0.754 with them, 0.780 with the slowest).
CANDIDATES = (
    {"learning_rate": 0.1, "max_iter": ROUNDS, "early_stopping": True, "n_iter_no_change": 20},
    {
        "learning_rate": 0.05,
        "max_leaf_nodes": 8,
        "min_samples_leaf": 20,
        "l2_regularization": 1.0,
        "max_iter": 300,
        "early_stopping": False,
    },
    {
        "learning_rate": 0.03,
        "max_leaf_nodes": 6,
        "min_samples_leaf": 30,
        "l2_regularization": 2.0,
        "max_iter": 400,
        "early_stopping": False,
    },
)
RARE = 0.2  # below this share of rows, the rarest class gets inverse-frequency weights


def _contract(features: list[dict], labels: list[str], post: dict | None = None):
    spec = {"task": TASK, "labels": labels, "preprocessing": {"features": features}}
    return tasks.create(spec | {"postprocessing": post or {}})


def encode(contract, rows: list[dict]) -> np.ndarray:
    return np.stack([contract.decode(r).value for r in rows]) if rows else np.zeros((0, 0))


TREES, MLP = "gradient-boosting", "mlp"  # --backbone values for tables (auto: trees)


def _kind(cfg, init) -> str:
    """trees or mlp: as --backbone asks, or as the --init-from run was trained."""
    if init is not None:
        kind = MLP if init[1]["backbone"]["family"] == checkpoint.MLP_FAMILY else TREES
        if cfg.backbone not in ("auto", kind):
            raise DataError(f"--init-from '{cfg.init_from}' is a {kind} run, not {cfg.backbone}")
        return kind
    if cfg.backbone in ("auto", TREES):
        return TREES
    if cfg.backbone == MLP:
        return MLP
    raise DataError(
        f"backbone '{cfg.backbone}' does not apply to tables; use {TREES} (default) or {MLP}"
    )


def _earlier(run: Path, features: list[str]):
    """The model and schema of `--init-from RUN`; the feature columns must be the same."""
    try:
        config = checkpoint.read_json(run / checkpoint.CONFIG)
    except CheckpointError:
        config = {}
    if config.get("task") != TASK or not (run / checkpoint.weights_file(config)).is_file():
        raise CheckpointError(f"--init-from '{run}' is not a finished tabular run", str(run))
    old = [f["name"] for f in config["preprocessing"]["features"]]
    if old != features:
        missing, extra = sorted(set(old) - set(features)), sorted(set(features) - set(old))
        raise DataError(
            f"--init-from '{run}' was trained on other columns: missing here "
            f"{', '.join(missing) or '-'}; new here {', '.join(extra) or '-'}"
            + ("" if missing or extra else "; same columns in another order")
        )
    return checkpoint.build_model(checkpoint.load_checkpoint(run)), config


def fine_tune_table(data: Path, out: Path, cfg, log=print) -> dict:
    t0 = time.perf_counter()
    ds = load_tabular_dataset(Path(data), cfg)
    log(describe(ds.summary))
    init = None
    if cfg.init_from:
        init = _earlier(Path(cfg.init_from), ds.features)
        features, labels = init[1]["preprocessing"]["features"], init[1]["labels"]
        if labels != ds.labels:
            raise DataError(
                f"--init-from '{cfg.init_from}' has classes {labels}; '{data}' has {ds.labels}"
            )
    else:
        import pandas as pd

        train = pd.DataFrame(ds.train.inputs, columns=ds.features)
        features, labels = schema(train, ds.features, ds.categorical), ds.labels
    contract = _contract(features, labels)
    x = {role: encode(contract, getattr(ds, role).inputs) for role in ("train", "val", "test")}
    y = {role: getattr(ds, role).labels for role in ("train", "val", "test")}
    shares = np.bincount(y["train"], minlength=len(labels)) / len(y["train"])
    balanced = cfg.class_weighting == "balanced" or shares.min() < RARE
    if _kind(cfg, init) == MLP:
        fitted = _fit_mlp(features, labels, x, y, cfg, balanced, init, log)
    else:
        fitted = _fit_trees(x, y, cfg, balanced, init, log)
    proba = fitted.proba
    post = {}
    if len(labels) == 2:
        from tasks.metrics import choose_threshold

        # The positive class is the rarer one (fraud, default): its precision and recall
        # are what a threshold trades.
        positive = int(np.argmin(np.bincount(y["train"], minlength=2)))
        p_val = proba(x["val"])[:, positive]
        post = {
            "positive": labels[positive],
            "threshold": choose_threshold(y["val"] == positive, p_val, cfg.target_precision),
            "threshold_for": (
                f"precision >= {cfg.target_precision}" if cfg.target_precision else "best F1"
            ),
        }
    contract = _contract(features, labels, post)
    figures = {}
    for role in ("val", "test"):
        scores = contract.score(proba(x[role]), y[role])
        figures |= {f"{role}_{k}": v for k, v in scores.items()}
    kind = fitted.config["backbone"]["name"]
    result = {"epoch": fitted.epochs, "strategy": kind, **figures}
    _write(out, cfg, ds, features, labels, post, fitted, x, y, result, t0)
    log(
        f"{fitted.epochs} {'boosting rounds' if kind == TREES else 'epochs (best)'}; "
        + "  ".join(f"{k} {v:.4f}" for k, v in figures.items() if k.startswith(("val", "test")))
    )
    log(f"checkpoint: {out}/  (report: {out}/report/)")
    return result


@dataclass
class Fitted:
    """A trained table model, whichever kind: its probabilities and what to save."""

    model: object
    proba: Callable[[np.ndarray], np.ndarray]
    epochs: int  # boosting rounds, or the MLP's best epoch
    config: dict  # config.json's backbone and head
    history: list = field(default_factory=list)  # the MLP's epochs (curves.png)
    metric: str = ""  # the MLP's early-stopping score in `history`


def _fit_trees(x, y, cfg, balanced, init, log) -> Fitted:
    if init is not None:
        model = init[0]
        model.set_params(
            warm_start=True, early_stopping=False, max_iter=model.n_iter_ + MORE_ROUNDS
        )
        log(f"continuing '{cfg.init_from}' ({model.n_iter_} rounds) on {len(y['train'])} rows")
    else:
        model = _select(x["train"], y["train"], balanced, cfg.seed, log)
    model.fit(x["train"], y["train"])
    described = {
        "backbone": {"name": TREES, "family": "sklearn", "source": "scikit-learn"},
        "head": {
            "type": "HistGradientBoostingClassifier",
            "rounds": int(model.n_iter_),
            "class_weight": "balanced" if balanced else None,
        },
    }
    return Fitted(model, model.predict_proba, int(model.n_iter_), described)


def _fit_mlp(features, labels, x, y, cfg, balanced, init, log) -> Fitted:
    from finetune import tabular_mlp as mlp

    lr = cfg.lr
    if init is not None:
        model, lr = init[0], cfg.lr / 10
        log(f"continuing the MLP of '{cfg.init_from}' at learning rate {lr:g}")
    else:
        model = mlp.TabularMLP(features, len(labels), mlp.HIDDEN, cfg.dropout)
    settings = mlp.MLPConfig(lr=lr, seed=cfg.seed)
    history, metric, best = mlp.train(model, x, y, settings, balanced, log)
    described = {
        "backbone": {"name": MLP, "family": checkpoint.MLP_FAMILY, "source": "random init"},
        "head": {
            "type": "TabularMLP",
            "hidden": model.head.in_features,
            "dropout": model.body[2].p,
            "epochs": len(history),
            "class_weight": "balanced" if balanced else None,
        },
    }
    proba = lambda a: mlp.predict_proba(model, a)  # noqa: E731
    return Fitted(model, proba, best, described, history, metric)


def _select(x, y, balanced: bool, seed: int, log):
    """The candidate with the best 5-fold cross-validated score on the training rows
    (ROC-AUC for two classes, log-loss otherwise), unfitted."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(min(5, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    scoring = "roc_auc" if len(np.unique(y)) == 2 else "neg_log_loss"
    best, best_score = None, -np.inf
    for params in CANDIDATES:
        model = HistGradientBoostingClassifier(
            class_weight="balanced" if balanced else None, random_state=seed, **params
        )
        score = float(cross_val_score(model, x, y, cv=folds, scoring=scoring).mean())
        log(f"  trees {params}: cross-validated {scoring} {score:.4f}")
        if score > best_score:
            best, best_score = model, score
    return best


def _write(out, cfg, ds, features, labels, post, fitted: Fitted, x, y, result, t0) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = {
        "format_version": checkpoint.FORMAT_VERSION,
        "task": TASK,
        "status": "complete",
        **fitted.config,
        "labels": labels,
        "preprocessing": {"features": features, "input_names": ["features"]},
        "postprocessing": post,
        "training": cfg.to_dict(),
        "seed": cfg.seed,
        "data": ds.summary,
        "result": result,
    }
    checkpoint.write_json(out / checkpoint.CONFIG, config)
    if checkpoint.is_trees(config):
        import skops.io as sio

        sio.dump(fitted.model, out / checkpoint.TREES)
    else:
        checkpoint.save_weights(out, fitted.model)
    n = min(cfg.holdout_for(heavy_inputs=False), len(y["test"]))
    idx = np.sort(np.random.default_rng(cfg.seed).choice(len(y["test"]), n, replace=False))
    checkpoint.save_holdout(out, x["test"][idx].astype(np.float64), y["test"][idx])
    best = {**result, "wall_seconds": round(time.perf_counter() - t0, 1)}
    checkpoint.write_json(out / checkpoint.METRICS, {"best": best, "epochs": fitted.history})
    _report(out / "report", fitted, x["val"], y["val"], labels, post)


def _report(folder: Path, fitted: Fitted, x, y, labels, post) -> None:
    """pr_curve.png and calibration.png on validation (two classes); the MLP's curves."""
    folder.mkdir(exist_ok=True)
    if fitted.history:
        from finetune.report import plot_curves

        plot_curves(fitted.history, folder / "curves.png", fitted.epochs, fitted.metric)
    if len(labels) != 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve

    pos = labels.index(post.get("positive", labels[1]))
    p = fitted.proba(x)[:, pos]
    y = np.asarray(y) == pos
    precision, recall, thresholds = precision_recall_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(recall, precision)
    if "threshold" in post:
        i = int(np.searchsorted(thresholds, post["threshold"]))
        ax.plot(recall[i], precision[i], "o", label=f"threshold {post['threshold']:.3f}")
        ax.legend()
    ax.set(title=f"validation: '{labels[pos]}' (positive)", xlabel="recall", ylabel="precision")
    fig.tight_layout()
    fig.savefig(folder / "pr_curve.png")
    plt.close(fig)
    true, pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.plot(pred, true, "o-")
    ax.set(
        title="calibration (validation)",
        xlabel="predicted probability",
        ylabel="observed frequency",
    )
    fig.tight_layout()
    fig.savefig(folder / "calibration.png")
    plt.close(fig)
    (folder / "summary.json").write_text(json.dumps({"threshold": post}, indent=2))
