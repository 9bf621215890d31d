"""The checkpoint contract, `runs/<name>/` (DESIGN.md §1); export reads it through this module.

model.safetensors   weights only (never a pickled model object)
config.json         task, backbone, head, labels, preprocessing, training config, data summary
holdout.npz         `inputs` (uint8 NHWC images or strings) and `labels` from validation, and
                    `targets` (JSON strings) for tasks whose gold is not one class
metrics.json        per-epoch history and the best epoch
report/             curves.png, confusion.png
tokenizer/          text models only
resume/             last-epoch state for --resume; removed when training completes
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import CheckpointError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HOLDOUT = "holdout.npz"
METRICS = "metrics.json"
TOKENIZER = "tokenizer"
RESUME = "resume"
REQUIRED = (WEIGHTS, CONFIG, HOLDOUT, METRICS)
TREES = "model.skops"  # tabular runs: the scikit-learn model (skops format, no pickle)


@dataclass
class Checkpoint:
    path: Path
    config: dict
    holdout_inputs: np.ndarray
    holdout_labels: np.ndarray
    metrics: dict
    holdout_targets: np.ndarray | None = None  # JSON per input (structured tasks' gold)

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # a crash never leaves a half-written file under the real name


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing", str(path))
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file '{path}' is not valid JSON: {e}", str(path)) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint file '{path}' must hold a JSON object", str(path))
    return obj


def save_holdout(run: Path, inputs, labels: np.ndarray, targets: list[str] | None = None) -> None:
    """`inputs`: uint8 images or strings; `labels`: class indices; `targets`: the gold of
    structured tasks as JSON strings (entities' tags, answers)."""
    arr = np.asarray(inputs) if not isinstance(inputs, list) else np.array(inputs, dtype=np.str_)
    extra = {} if targets is None else {"targets": np.array(targets, dtype=np.str_)}
    np.savez_compressed(
        run / HOLDOUT, inputs=arr, labels=np.asarray(labels, dtype=np.int64), **extra
    )


def save_weights(run: Path, model) -> None:
    from safetensors.torch import save_model

    tmp = run / (WEIGHTS + ".tmp")
    save_model(model, str(tmp))
    tmp.replace(run / WEIGHTS)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate every checkpoint file; errors name the file and the field."""
    run = Path(path)
    if not run.is_dir():
        raise CheckpointError(f"checkpoint folder '{run}' does not exist", str(run))
    required = REQUIRED
    if (run / CONFIG).is_file() and (run / TREES).is_file():
        required = (TREES, CONFIG, HOLDOUT, METRICS)
    missing = [f for f in required if not (run / f).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint '{run}' is incomplete: missing {', '.join(missing)}", str(run / missing[0])
        )
    config = read_json(run / CONFIG)
    for key in ("format_version", "task", "labels", "backbone", "head", "preprocessing"):
        if key not in config:
            raise CheckpointError(f"'{run / CONFIG}' has no field '{key}'", str(run / CONFIG))
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"'{run / CONFIG}' has format_version {config['format_version']!r}; "
            f"this tuneserve reads {FORMAT_VERSION}",
            str(run / CONFIG),
        )
    try:
        with np.load(run / HOLDOUT, allow_pickle=False) as z:
            inputs, labels = z["inputs"], z["labels"]
            targets = z["targets"] if "targets" in z.files else None
    except Exception as e:  # zipfile, KeyError, ValueError: all mean a corrupt file
        raise CheckpointError(
            f"checkpoint file '{run / HOLDOUT}' is corrupt: {e}", str(run / HOLDOUT)
        ) from e
    if len(inputs) != len(labels):
        raise CheckpointError(
            f"'{run / HOLDOUT}': {len(inputs)} inputs but {len(labels)} labels", str(run / HOLDOUT)
        )
    return Checkpoint(run, config, inputs, labels, read_json(run / METRICS), targets)


def build_model(ckpt: Checkpoint):
    """Rebuild the model from config.json alone and load its weights (eval mode); a tabular
    run's trees are read from their skops file."""
    if is_trees(ckpt.config):
        return load_trees(ckpt.path)
    from finetune.models import rebuild

    model = rebuild(ckpt.config)
    _load_weights(model, ckpt)
    return model.eval()


def is_trees(config: dict) -> bool:
    """A scikit-learn model (skl2onnx at export), not a torch one."""
    return config["backbone"].get("family") == "sklearn"


def weights_file(config: dict) -> str:
    return TREES if is_trees(config) else WEIGHTS


# The one type a tree file of ours holds beyond those skops trusts by default (scikit-learn's
# estimators, numpy arrays): the trees' predictors. A file naming anything else, even another
# scikit-learn function, did not come from `python -m finetune`.
TREE_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


def load_trees(run: Path):
    """The scikit-learn model of a tabular run, loaded with the narrowest trust: the types
    our tree files hold (TREE_TYPES), and it must be a HistGradientBoostingClassifier."""
    import skops.io as sio
    from sklearn.ensemble import HistGradientBoostingClassifier

    path = run / TREES
    unknown = [t for t in sio.get_untrusted_types(file=path) if t not in TREE_TYPES]
    if unknown:
        raise CheckpointError(
            f"'{path}' holds types a tuneserve tree file never holds: {unknown}; "
            "refusing to load it",
            str(path),
        )
    model = sio.load(path, trusted=list(TREE_TYPES))
    if not isinstance(model, HistGradientBoostingClassifier):
        raise CheckpointError(
            f"'{path}' holds a {type(model).__name__}, not gradient-boosted trees", str(path)
        )
    return model


def _load_weights(model, ckpt: Checkpoint) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(ckpt.path / WEIGHTS), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        msg = str(e).splitlines()[0][:300]
        raise CheckpointError(
            f"checkpoint file '{ckpt.path / WEIGHTS}' cannot be loaded: {msg}",
            str(ckpt.path / WEIGHTS),
        ) from e


def load_tokenizer(ckpt: Checkpoint):
    from finetune.models import load_tokenizer as _load

    folder = ckpt.path / TOKENIZER
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder '{folder}' is missing", str(folder))
    return _load(folder)
