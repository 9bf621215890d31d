"""Classical baselines on a fine-tuning run's own splits, beside the run's test figures.

    python bench/baselines.py runs/sms_spam runs/flowers12 ...

For each finished run the data is read again with the run's saved configuration (same seed,
same train / validation / test split); the baseline fits on train, picks its regularisation
on validation, and is scored once on test, as the fine-tuned model was:
- text: TF-IDF (words 1-2-grams, sublinear tf) + a linear SVM;
- images: an RBF SVM on 32x32 pixels (standardised).
Prints a Markdown table: what `--strategy auto` chose, the run's wall time and test figures,
and the baseline's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune import checkpoint, models  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.data import load_dataset  # noqa: E402

IMAGE_TASK = "image-classification"
from tasks.metrics import classification_metrics  # noqa: E402

GRID = (0.1, 1.0, 10.0)  # regularisation C tried on validation


def _pixels(images: np.ndarray) -> np.ndarray:
    from PIL import Image

    small = [np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in images]
    return np.stack(small).reshape(len(images), -1).astype(np.float32) / 255.0


def baseline(ds) -> tuple[str, dict, float]:
    """(description, test metrics, fit seconds) of the classical model on `ds`'s splits."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    t0 = time.perf_counter()
    if ds.task == IMAGE_TASK:
        x = {s: _pixels(getattr(ds, s).inputs) for s in ("train", "val", "test")}
        name = "RBF SVM on 32x32 pixels"

        def make(c):
            return make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf"))

    else:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        x = {"train": vec.fit_transform(ds.train.inputs)}
        x.update({s: vec.transform(getattr(ds, s).inputs) for s in ("val", "test")})
        name = "TF-IDF 1-2-grams + linear SVM"

        def make(c):
            return LinearSVC(C=c)

    best, best_score = None, -1.0
    for c in GRID:
        model = make(c).fit(x["train"], ds.train.labels)
        score = classification_metrics(ds.val.labels, model.predict(x["val"]), ds.labels)
        if score["macro_f1"] > best_score:
            best, best_score = model, score["macro_f1"]
    m = classification_metrics(ds.test.labels, best.predict(x["test"]), ds.labels)
    return name, m, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished run folders (runs/<name>)")
    args = p.parse_args()
    print(
        "| data | auto chose | epochs | wall time | test acc | test macro-F1 "
        "| baseline | test acc | test macro-F1 | fit time |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for run in args.runs:
        ckpt = checkpoint.load_checkpoint(run)
        cfg = TrainConfig.from_dict(ckpt.config["training"])
        prep = None
        if ckpt.task == IMAGE_TASK:
            prep, _, _ = models.image_prep(models.resolve(cfg.backbone), cfg.image_size)
        ds = load_dataset(ckpt.config["data"]["path"], cfg, prep)
        name, m, seconds = baseline(ds)
        best, auto = ckpt.metrics["best"], ckpt.metrics.get("auto", {})
        chosen = auto.get("chosen", best.get("strategy", cfg.strategy))
        gain = f" (trial gain {auto['gain']:+.3f} vs margin {auto['margin']:.3f})" if auto else ""
        print(
            f"| {Path(run).name} ({len(ds.train)}/{len(ds.val)}/{len(ds.test)}) "
            f"| {chosen}{gain} | {len(ckpt.metrics['epochs'])} "
            f"| {ckpt.metrics.get('wall_seconds', float('nan')) / 60:.1f} min "
            f"| {best['test_accuracy']:.4f} | {best['test_macro_f1']:.4f} "
            f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {seconds:.1f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
