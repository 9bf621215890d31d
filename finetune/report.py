"""Training curves and the confusion matrix as PNG files in `runs/<name>/report/`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    history: list[dict],
    path: Path,
    best_epoch: int | None = None,
    *scores: str,
    loss: str = "cross-entropy",
) -> None:
    """Loss and validation scores per epoch; `scores`: the keys to draw (default: accuracy
    and macro-F1); `loss`: what the loss is."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel=loss)
    for key in scores or ("val_accuracy", "val_macro_f1"):
        label = key.replace("_", " ").replace("val ", "val ").replace("macro f1", "macro-F1")
        ax_score.plot(epochs, [h[key] for h in history], "o-", label=label)
    ax_score.set(title="Validation", xlabel="epoch", ylim=(0, 1.02))
    starts = [
        h["epoch"] - 0.5
        for prev, h in zip(history, history[1:], strict=False)
        if h.get("phase") != prev.get("phase")
    ]
    for ax in (ax_loss, ax_score):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label="best")
        for x in starts:  # `auto`: the probe's epochs, then the fine-tune's
            ax.axvline(x, color="tab:red", ls=":", lw=1, label="fine-tune starts")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    plt = _plt()
    cm = np.asarray(matrix)
    n = len(labels)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > threshold else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
