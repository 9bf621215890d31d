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

import numpy as np
import torch
from torch import nn

HIDDEN = 128  # units per hidden layer (two layers)
MLP_FAMILY = "tabular-mlp"  # config.json backbone family of an MLP run


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


def predict_proba(model: TabularMLP, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.export_outputs(torch.from_numpy(x.astype(np.float32)))[0].double().numpy()
