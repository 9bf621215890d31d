"""`runs/<name>/report/`: training curves, the confusion matrix and a threshold's PR curve as
PNG files, and summary.md (the splits, what `auto` chose, the figures)."""

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
    top = max([1.0] + [h[k] for h in history for k in scores if np.isfinite(h.get(k, 0.0))])
    ax_score.set(title="Validation", xlabel="epoch", ylim=(0, top * 1.02))  # WER may pass 1
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


def plot_threshold(truth: np.ndarray, p: np.ndarray, positive: str, post: dict, folder: Path):
    """pr_curve.png (with the chosen threshold) and calibration.png of a two-class model on
    validation: `truth` whether each row is `positive`, `p` its probability."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve

    plt = _plt()
    precision, recall, thresholds = precision_recall_curve(truth, p)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(recall, precision)
    if "threshold" in post:
        i = int(np.searchsorted(thresholds, post["threshold"]))
        ax.plot(recall[i], precision[i], "o", label=f"threshold {post['threshold']:.3f}")
        ax.legend()
    ax.set(title=f"validation: '{positive}' (positive)", xlabel="recall", ylabel="precision")
    fig.tight_layout()
    fig.savefig(folder / "pr_curve.png")
    plt.close(fig)
    true, pred = calibration_curve(truth, p, n_bins=10, strategy="quantile")
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


def write_report(out: Path, history: list[dict], final: dict, ds, recipe, extra: dict) -> None:
    """curves.png (the validation split, per epoch), for classification the test split's
    confusion matrix (a split no selection saw), and summary.md: the splits, what `auto`
    tried and chose, and the figures, each named by its split."""
    report = out / "report"
    report.mkdir(exist_ok=True)
    auto = extra.get("auto", {})
    drawn = history
    if zero := extra.get("zero_shot"):  # the pretrained model, before training: epoch 0
        first = {"epoch": 0, "phase": history[0].get("phase") if history else None}
        vals = {k: v for k, v in zero.items() if k.startswith("val_")}
        drawn = [{**first, "train_loss": float("nan"), **vals}, *history]
    plot_curves(
        drawn, report / "curves.png", final["epoch"], *recipe.curve_scores, loss=recipe.loss_name
    )
    recipe.draw(report)
    if "test_confusion_matrix" in final:
        plot_confusion(
            final["test_confusion_matrix"],
            ds.labels,
            report / "confusion.png",
            f"test split, best epoch {final['epoch']} (acc {final['test_accuracy']:.3f})",
        )
    splits = ds.summary.get("splits", {})
    lines = [
        f"# {out.name}: {ds.task}",
        "",
        "| split | examples | source | used for |",
        "|---|---:|---|---|",
        f"| train | {len(ds.train)} | {splits.get('train', 'given')} | the weights |",
        f"| validation | {len(ds.val)} | {splits.get('val', '?')} "
        "| best epoch, early stopping, the `auto` decision |",
        f"| test | {len(ds.test)} | {splits.get('test', '?')} "
        "| scored once at the end; export's holdout (gates, parity, drift) |",
        "",
    ]
    if auto:
        probe, trial = auto.get("probe", {}), auto.get("trial", {})
        metric = next((k for k in probe if k.startswith("val_")), "")
        lines += [
            f"Strategy `auto` chose **{auto.get('chosen')}**: linear probe {metric} "
            f"{probe.get(metric, float('nan')):.4f} ({probe.get('epochs')} epochs, "
            f"{probe.get('seconds')} s); full fine-tune after {trial.get('epochs')} trial "
            f"epoch(s) {trial.get(metric, float('nan')):.4f} ({trial.get('seconds_per_epoch')} s "
            f"per epoch); gain {auto.get('gain', 0):+.4f} against a noise margin of "
            f"{auto.get('margin', 0):.4f} on {auto.get('validation_size')} validation examples.",
            "",
        ]
    lines += recipe.summary_lines(final, extra)
    lines += ["| figure | validation | test |", "|---|---:|---:|"]
    for key, value in final.items():
        if key.startswith("val_") and isinstance(value, float):
            name = key[4:]
            lines.append(
                f"| {name} | {value:.4f} | {final.get('test_' + name, float('nan')):.4f} |"
            )
    (report / "summary.md").write_text("\n".join(lines) + "\n")
