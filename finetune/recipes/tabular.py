"""Tabular classification: gradient-boosted trees (scikit-learn's HistGradientBoosting), the
default, or an MLP with embeddings for categories (`--backbone mlp`, models/tabular.py) trained
in the shared loop (`MLPRecipe`); train/tables.py runs either.

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

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tasks
from finetune import checkpoint
from finetune.data import ROLES, table_schema
from finetune.errors import CheckpointError, DataError
from finetune.models import HIDDEN, MLP_FAMILY, TabularMLP, predict_proba
from finetune.recipes.base import Recipe, Setup
from finetune.report import plot_curves, plot_threshold

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


def contract(features: list[dict], labels: list[str], post: dict | None = None):
    spec = {"task": tasks.TABLE_TASKS[0], "labels": labels, "preprocessing": {"features": features}}
    return tasks.create(spec | {"postprocessing": post or {}})


def encode(contract, rows: list[dict]) -> np.ndarray:
    return np.stack([contract.decode(r).value for r in rows]) if rows else np.zeros((0, 0))


TREES, MLP = "gradient-boosting", "mlp"  # --backbone values for tables (auto: trees)


def kind(cfg, init) -> str:
    """trees or mlp: as --backbone asks, or as the --init-from run was trained."""
    if init is not None:
        kind = MLP if init[1]["backbone"]["family"] == MLP_FAMILY else TREES
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


def earlier(run: Path, features: list[str]):
    """The model and schema of `--init-from RUN`; the feature columns must be the same."""
    try:
        config = checkpoint.read_json(run / checkpoint.CONFIG)
    except CheckpointError:
        config = {}
    finished = (run / checkpoint.weights_file(config)).is_file() if config else False
    if not tasks.uses_tables(config.get("task", "")) or not finished:
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


@dataclass
class Table:
    """A table run's encoded data and choices, what fitting and writing share."""

    cfg: object  # TrainConfig
    ds: object  # the Dataset of raw rows
    features: list[dict]  # the schema (tasks/tabular.py)
    labels: list[str]
    x: dict[str, np.ndarray]  # encoded rows per split
    y: dict[str, np.ndarray]  # class indices per split
    balanced: bool  # inverse-frequency class weights
    init: tuple | None = None  # (model, config) of --init-from
    log: Callable = print


@dataclass
class Fitted:
    """A trained table model, whichever kind: its probabilities and what to save."""

    model: object
    proba: Callable[[np.ndarray], np.ndarray]
    epochs: int  # boosting rounds, or the MLP's best epoch
    config: dict  # config.json's backbone and head
    history: list = field(default_factory=list)  # the MLP's epochs (curves.png)
    metric: str = ""  # the MLP's early-stopping score in `history`


def fit_trees(t: Table) -> Fitted:
    x, y, cfg, init, log = t.x, t.y, t.cfg, t.init, t.log
    if init is not None:
        model = init[0]
        model.set_params(
            warm_start=True, early_stopping=False, max_iter=model.n_iter_ + MORE_ROUNDS
        )
        log(f"continuing '{cfg.init_from}' ({model.n_iter_} rounds) on {len(y['train'])} rows")
    else:
        model = _select(x["train"], y["train"], t.balanced, cfg.seed, log)
    model.fit(x["train"], y["train"])
    described = {
        "backbone": {"name": TREES, "family": "sklearn", "source": "scikit-learn"},
        "head": {
            "type": "HistGradientBoostingClassifier",
            "rounds": int(model.n_iter_),
            "class_weight": "balanced" if t.balanced else None,
        },
    }
    return Fitted(model, model.predict_proba, int(model.n_iter_), described)


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


def write(out: Path, t: Table, post: dict, fitted: Fitted, result: dict, seconds: float) -> None:
    """config.json, the model file, holdout.npz (encoded test rows), metrics.json, report/."""
    cfg, ds, x, y, labels = t.cfg, t.ds, t.x, t.y, t.labels
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": checkpoint.FORMAT_VERSION,
        "task": ds.task,
        "status": "complete",
        **fitted.config,
        "labels": labels,
        "preprocessing": {"features": t.features, "input_names": ["features"]},
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
    best = {**result, "wall_seconds": round(seconds, 1)}
    checkpoint.write_json(out / checkpoint.METRICS, {"best": best, "epochs": fitted.history})
    folder = out / "report"
    folder.mkdir(exist_ok=True)
    if fitted.history:
        plot_curves(fitted.history, folder / "curves.png", fitted.epochs, fitted.metric)
    if len(labels) == 2:
        positive = labels.index(post.get("positive", labels[1]))
        p = fitted.proba(x["val"])[:, positive]
        plot_threshold(np.asarray(y["val"]) == positive, p, labels[positive], post, folder)
        (folder / "summary.json").write_text(json.dumps({"threshold": post}, indent=2))


def prepare(ds, cfg, log) -> Table:
    """The schema (made from training, or --init-from's), the encoded splits and the
    class weighting of a table run."""
    init = None
    if cfg.init_from:
        init = earlier(Path(cfg.init_from), ds.features)
        features, labels = init[1]["preprocessing"]["features"], init[1]["labels"]
        if labels != ds.labels:
            raise DataError(
                f"--init-from '{cfg.init_from}' has classes {labels}; "
                f"'{ds.summary['path']}' has {ds.labels}"
            )
    else:
        import pandas as pd

        train = pd.DataFrame(ds.train.inputs, columns=ds.features)
        features, labels = table_schema(train, ds.features, ds.categorical), ds.labels
    encoder = contract(features, labels)
    x = {role: encode(encoder, getattr(ds, role).inputs) for role in ROLES}
    y = {role: getattr(ds, role).labels for role in ROLES}
    shares = np.bincount(y["train"], minlength=len(labels)) / len(y["train"])
    balanced = cfg.class_weighting == "balanced" or shares.min() < RARE
    return Table(cfg, ds, features, labels, x, y, balanced, init, log)


def threshold(t: Table, fitted: Fitted) -> dict:
    """Two classes: the decision threshold on validation (best F1, or --target-precision)
    for the rarer class (fraud, default), whose precision and recall a threshold trades."""
    if len(t.labels) != 2:
        return {}
    from tasks.metrics import choose_threshold

    positive = int(np.argmin(np.bincount(t.y["train"], minlength=2)))
    p_val = fitted.proba(t.x["val"])[:, positive]
    target = t.cfg.target_precision
    return {
        "positive": t.labels[positive],
        "threshold": choose_threshold(t.y["val"] == positive, p_val, target),
        "threshold_for": f"precision >= {target}" if target else "best F1",
    }


def figures(t: Table, fitted: Fitted, post: dict) -> dict:
    """The task's metrics on validation and test, at the chosen threshold."""
    scorer = contract(t.features, t.labels, post)
    out = {}
    for role in ("val", "test"):
        scores = scorer.score(fitted.proba(t.x[role]), t.y[role])
        out |= {f"{role}_{k}": v for k, v in scores.items()}
    return out


# --------------------------------------------------------------------------- the MLP


MLP_EPOCHS = 200  # at most; early stopping on validation ROC-AUC (log-loss) usually ends sooner
MLP_PATIENCE = 25  # epochs without improvement before stopping
MLP_BATCH = 64  # rows per step
MLP_WEIGHT_DECAY = 1e-4


def _score(y: np.ndarray, p: np.ndarray) -> tuple[str, float]:
    """ROC-AUC for two classes, else negative log-loss: higher is better."""
    from sklearn.metrics import log_loss, roc_auc_score

    if p.shape[1] == 2 and len(np.unique(y)) == 2:
        return "roc_auc", float(roc_auc_score(y, p[:, 1]))
    return "neg_log_loss", -float(log_loss(y, p, labels=list(range(p.shape[1]))))


def mlp_setup(t: Table) -> Setup:
    """The MLP (or --init-from's, at a tenth of the learning rate) and the loop's settings:
    AdamW at one rate for the whole network, no schedule, clipping or accumulation, early
    stopping on validation ROC-AUC (two classes) or log-loss."""
    cfg, lr = t.cfg, t.cfg.lr
    if t.init is not None:
        model, lr = t.init[0], cfg.lr / 10
        t.log(f"continuing the MLP of '{cfg.init_from}' at learning rate {lr:g}")
    else:
        model = TabularMLP(t.features, len(t.labels), HIDDEN, cfg.dropout)
    two = len(t.labels) == 2 and len(np.unique(t.y["val"])) == 2
    metric = "roc_auc" if two else "neg_log_loss"  # what _score measures
    loop_cfg = dataclasses.replace(
        cfg,
        lr=lr,
        backbone_lr=lr,
        layer_decay=1.0,
        weight_decay=MLP_WEIGHT_DECAY,
        schedule="constant",
        warmup=0.0,
        max_grad_norm=0.0,
        grad_accum=1,
        batch_size=MLP_BATCH,
        monitor=f"val_{metric}",
        min_delta=1e-6,
    )
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    return Setup(loop_cfg, t.ds, model, [body], {}, extra={"table": t})


def mlp_fitted(run: Setup, outcome, history: list[dict]) -> Fitted:
    model, t = run.model, run.extra["table"]
    described = {
        "backbone": {"name": MLP, "family": MLP_FAMILY, "source": "random init"},
        "head": {
            "type": "TabularMLP",
            "hidden": model.head.in_features,
            "dropout": model.body[2].p,
            "epochs": len(history),
            "class_weight": "balanced" if t.balanced else None,
        },
    }
    proba = lambda a: predict_proba(model, a)  # noqa: E731
    return Fitted(model, proba, outcome.best_epoch, described, history, run.cfg.monitor)


class MLPRecipe(Recipe):
    """The table MLP in the shared loop: encoded rows in memory, the whole network trains."""

    def __init__(self, run: Setup, device: torch.device, log=print):
        super().__init__(run, device, log)
        t = run.extra["table"]
        self.x, self.y = t.x, t.y
        weight = None
        if t.balanced:
            classes = len(t.labels)
            counts = np.bincount(t.y["train"], minlength=classes).astype(np.float64)
            share = len(t.y["train"]) / (classes * np.maximum(counts, 1))
            weight = torch.tensor(share, dtype=torch.float32, device=device)
        self.criterion = nn.CrossEntropyLoss(weight=weight)
        self.loader = None

    @property
    def curve_scores(self) -> tuple[str, ...]:
        return (self.cfg.monitor,)

    def set_trainable(self, strategy: str, epoch: int) -> int:
        self.model.train()
        return len(self.groups)

    def train_loader(self, strategy: str, dist):
        if self.loader is None:
            xt = torch.from_numpy(self.x["train"].astype(np.float32))
            yt = torch.from_numpy(self.y["train"].astype(np.int64))
            self.loader = self._loader(TensorDataset(xt, yt), dist)
        return self.loader

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        return self.criterion(module(x.to(self.device)), y.to(self.device)), len(y)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        p, y = predict_proba(self.model, self.x[split]), self.y[split]
        loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())
        name, score = _score(y, p)
        return {"loss": loss, name: score}


class TabularClassification:
    """Tables: trees, or the MLP in the shared loop; train/tables.py runs either."""

    flow = "tables"
    resumable = False  # --resume: tabular runs take seconds
