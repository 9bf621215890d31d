"""Tabular classification with an MLP (torch): `--backbone mlp`.

    python -m finetune ../shared/data/german_credit/german.data --label-column -1 --backbone mlp

The network takes the task contract's encoded rows as they are (`features` FP32 [batch,
columns]: numbers, category indices with len(categories) for an unseen one, NaN missing), so
its ONNX graph has the trees' input and output and the service treats both alike. Inside:
numeric columns standardised with the training mean and spread, a missing value replaced by
0 plus a missing flag; each categorical column an embedding (min(16, (categories + 3) // 2)
dimensions, one row for "unseen" and one for "missing"); two hidden layers with dropout;
softmax probabilities. `--init-from` an earlier MLP run continues its weights at a tenth of
the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from finetune.loop import progress

HIDDEN = 128  # units per hidden layer (two layers)
EPOCHS = 200  # at most; early stopping on validation ROC-AUC (log-loss) usually ends sooner
PATIENCE = 25  # epochs without improvement before stopping
BATCH = 64  # rows per step


@dataclass(frozen=True)
class MLPConfig:
    """How the MLP trains (the network's shape is TabularMLP's arguments)."""

    lr: float = 1e-3  # AdamW; --init-from continues at a tenth
    weight_decay: float = 1e-4
    epochs: int = EPOCHS
    patience: int = PATIENCE
    batch_size: int = BATCH
    seed: int = 0


def embedding_dim(categories: int) -> int:
    return min(16, (categories + 3) // 2)


class TabularMLP(nn.Module):
    """Encoded rows [B, F] → class probabilities [B, C] (and logits for training)."""

    def __init__(self, features: list[dict], classes: int, hidden: int = HIDDEN, dropout=0.2):
        super().__init__()
        self.numeric = [j for j, f in enumerate(features) if f["kind"] != "categorical"]
        self.categorical = [j for j, f in enumerate(features) if f["kind"] == "categorical"]
        n_num = len(self.numeric)
        self.register_buffer(
            "mean", torch.tensor([features[j].get("mean", 0.0) for j in self.numeric])
        )
        self.register_buffer(
            "std", torch.tensor([features[j].get("std", 1.0) or 1.0 for j in self.numeric])
        )
        self.sizes = [len(features[j]["categories"]) for j in self.categorical]
        self.embeddings = nn.ModuleList(
            nn.Embedding(n + 2, embedding_dim(n)) for n in self.sizes
        )  # index n: unseen ("other"), n + 1: missing
        width = 2 * n_num + sum(embedding_dim(n) for n in self.sizes)
        self.body = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.numeric:
            v = x[:, self.numeric]
            missing = torch.isnan(v)
            scaled = (torch.where(missing, self.mean, v) - self.mean) / self.std
            parts += [scaled, missing.to(x.dtype)]
        for k, (j, n) in enumerate(zip(self.categorical, self.sizes, strict=True)):
            c = x[:, j]
            idx = torch.where(torch.isnan(c), torch.full_like(c, n + 1), c.clamp(0, n))
            parts.append(self.embeddings[k](idx.long()))
        return self.head(self.body(torch.cat(parts, dim=1)))

    def export_outputs(self, features: torch.Tensor):
        return (torch.softmax(self.forward(features), dim=1),)


def _score(y: np.ndarray, p: np.ndarray) -> tuple[str, float]:
    """ROC-AUC for two classes, else negative log-loss: higher is better."""
    from sklearn.metrics import log_loss, roc_auc_score

    if p.shape[1] == 2 and len(np.unique(y)) == 2:
        return "val_roc_auc", float(roc_auc_score(y, p[:, 1]))
    return "val_neg_log_loss", -float(log_loss(y, p, labels=list(range(p.shape[1]))))


def predict_proba(model: TabularMLP, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.export_outputs(torch.from_numpy(x.astype(np.float32)))[0].double().numpy()


def train(model: TabularMLP, x: dict, y: dict, cfg: MLPConfig, balanced: bool, log):
    """AdamW with early stopping on validation; the best epoch's weights are kept.
    Returns the per-epoch history (train and validation loss, validation score), the
    score's name and the epoch whose weights were kept."""
    torch.manual_seed(cfg.seed)
    xt = torch.from_numpy(x["train"].astype(np.float32))
    yt = torch.from_numpy(y["train"].astype(np.int64))
    classes = model.head.out_features
    weight = None
    if balanced:
        counts = np.bincount(y["train"], minlength=classes).astype(np.float64)
        weight = torch.tensor(len(yt) / (classes * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, best_epoch, since, history, metric = -np.inf, None, 0, 0, [], ""
    xv, yv = x["val"].astype(np.float32), y["val"]
    for epoch in progress(range(cfg.epochs), "MLP epochs"):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(yt), generator=gen).split(cfg.batch_size):
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        p = predict_proba(model, xv)
        val_loss = float(-np.log(np.clip(p[np.arange(len(yv)), yv], 1e-12, 1)).mean())
        metric, score = _score(yv, p)
        history.append(
            {"epoch": epoch + 1, "train_loss": total / len(yt), "val_loss": val_loss, metric: score}
        )
        if score > best + 1e-6:
            best, best_epoch, since = score, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= cfg.patience:
                log(f"MLP: early stopping after epoch {epoch + 1} (best {best:.4f})")
                break
    model.load_state_dict(best_state)
    return history, metric, best_epoch
