"""The torch half of each task (DESIGN.md §0): the head on the encoder, its loss, and how a
batch of the task's windows becomes tensors. Looked up by task name in `HEADS`.

Classification's head is `backbones.Classifier`; the span tasks' are here:
- token classification: a linear layer on every token's hidden state, cross-entropy on each
  word's first sub-token (the others are `IGNORE`).
- question answering: a linear layer to a start and an end logit per token, cross-entropy
  on the answer's first and last token (the first token, [CLS], when the window has none).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.text_windows import pad_rows
from tasks.token_classification import IGNORE


class TokenTagger(nn.Module):
    """encoder → every token's hidden state → dropout → linear to the tags."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_tags: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_tags)

    def export_outputs(self, input_ids, attention_mask, token_type_ids=None):
        hidden, pooled = self.backbone.encode(input_ids, attention_mask, token_type_ids)
        return self.head(self.dropout(hidden)), pooled

    def forward(self, *inputs):
        return self.export_outputs(*inputs)[0]

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(),
            y.flatten(),
            ignore_index=IGNORE,
            label_smoothing=label_smoothing,
        )

    @staticmethod
    def targets(labels: list[np.ndarray], width: int) -> torch.Tensor:
        return torch.from_numpy(pad_rows(labels, IGNORE, width))


class SpanExtractor(nn.Module):
    """encoder → every token's hidden state → linear to (start, end) logits."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_tags: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 2)

    def export_outputs(self, input_ids, attention_mask, token_type_ids=None):
        """Raw start and end logits: the task contract masks them to the context."""
        hidden, pooled = self.backbone.encode(input_ids, attention_mask, token_type_ids)
        start, end = self.head(self.dropout(hidden)).unbind(-1)
        return start, end, pooled

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """Training: [B, T, 2] logits with padding out of the softmax. Not in the exported
        graph: -1e4 plus a logit is exact only to 1e-3 in float32, which failed parity."""
        start, end, _ = self.export_outputs(input_ids, attention_mask, token_type_ids)
        pad = (1 - attention_mask.to(start.dtype)) * -1e4
        return torch.stack([start + pad, end + pad], dim=-1)

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        start, end = logits.float().unbind(-1)
        ce = nn.functional.cross_entropy
        return (ce(start, y[:, 0]) + ce(end, y[:, 1])) / 2

    @staticmethod
    def targets(spans: list[tuple[int, int]], width: int) -> torch.Tensor:
        return torch.tensor(spans, dtype=torch.long)


HEADS: dict[str, type[nn.Module]] = {
    "token-classification": TokenTagger,
    "question-answering": SpanExtractor,
}


def collate_windows(rows: list[tuple[dict, object]], names: list[str], pad_id: int, head):
    """[(one window's input lists, its target)] → padded int64 tensors and the targets."""
    width = max(len(r[0]["input_ids"]) for r in rows)
    pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    x = {n: torch.from_numpy(pad_rows([r[0][n] for r in rows], pads[n], width)) for n in names}
    return x, head.targets([r[1] for r in rows], width)
