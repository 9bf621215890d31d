"""Fine-tuning loop: strategies, validation each epoch, early stopping, resume.

    fine_tune("data/flowers", "runs/flowers", TrainConfig(backbone="efficientnet_lite0"))

Strategies: `feature-extraction` (frozen backbone; features computed once and cached when
there is no augmentation), `full` (everything trains, the backbone at a lower rate),
`gradual` (epoch 0 trains the head, epoch k also the top k backbone groups, ULMFiT style).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import tasks
from finetune import backbones, checkpoint
from finetune.config import AUTO_BACKBONES, TrainConfig
from finetune.data import IMAGE_TASK, Dataset, describe, detect_task, load_dataset
from finetune.errors import CheckpointError, DataError, FinetuneError, OutputExists
from finetune.heads import HEADS
from finetune.inputs import ImageSet, Inputs, TextSet
from finetune.metrics import classification_metrics
from finetune.report import plot_confusion, plot_curves
from finetune.train_spans import train_spans
from tasks.common import text_tokenizer

STATE = "state.pt"
LAST = "last.safetensors"


# --------------------------------------------------------------------------- helpers


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device 'cuda' asked for, but no usable CUDA GPU; use --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse early, before any work, when `out` cannot be used as asked."""
    if resume:
        if (out / checkpoint.RESUME / STATE).is_file():
            return
        if (out / checkpoint.CONFIG).is_file() and (out / checkpoint.WEIGHTS).is_file():
            raise OutputExists(f"'{out}' holds a completed run; nothing to resume")
        raise CheckpointError(f"cannot resume: '{out / checkpoint.RESUME / STATE}' not found")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputExists(
                f"output folder '{out}' already exists; pass --overwrite to replace it "
                f"or --resume to continue it"
            )
        if not (out / checkpoint.CONFIG).is_file():
            raise OutputExists(
                f"'{out}' is not a tuneserve run (no config.json); refusing to delete it even "
                f"with --overwrite: choose another --out"
            )


def _claim_out(out: Path) -> None:
    """Replace an old run (already allowed by _check_out) once the new one is ready to train."""
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def set_trainable(
    model: backbones.Classifier, groups: list[list[nn.Parameter]], strategy: str, epoch: int
) -> int:
    """Freeze/unfreeze for this epoch; returns how many backbone groups (from the top) train."""
    n = {"full": len(groups), "feature-extraction": 0}.get(strategy, min(epoch, len(groups)))
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= len(groups) - n)
    model.head.requires_grad_(True)
    model.train()
    if n == 0:
        model.backbone.eval()  # frozen: BatchNorm statistics and dropout fixed, as in the cache
    else:
        for module in model.backbone.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return n


def _criterion(cfg: TrainConfig, ds: Dataset, device) -> nn.Module:
    weight = None
    if cfg.class_weighting == "balanced":
        counts = np.bincount(ds.train.labels, minlength=len(ds.labels)).astype(np.float64)
        weight = torch.tensor(
            len(ds.train) / (len(ds.labels) * counts), dtype=torch.float32, device=device
        )
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def _better(value: float, best: float | None, cfg: TrainConfig) -> bool:
    if best is None:
        return True
    if cfg.monitor == "val_loss":
        return value < best - cfg.min_delta
    return value > best + cfg.min_delta


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, inputs: Inputs, desc: str):
    """Run the frozen backbone once over a loader: (features [N, D] on CPU, labels [N])."""
    encoder.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        with torch.autocast(
            inputs.device.type, dtype=torch.float16, enabled=inputs.device.type == "cuda"
        ):
            feats.append(inputs(encoder, x).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, inputs: Inputs, labels: list[str]) -> dict:
    model.eval()
    losses, preds, truth = [], [], []
    for x, y in loader:
        with torch.autocast(
            inputs.device.type, dtype=torch.float16, enabled=inputs.device.type == "cuda"
        ):
            logits = inputs(model, x).float()
        y = y.to(logits.device)
        losses.append(nn.functional.cross_entropy(logits, y, reduction="sum").item())
        preds.append(logits.argmax(1).cpu())
        truth.append(y.cpu())
    y_true, y_pred = torch.cat(truth).numpy(), torch.cat(preds).numpy()
    m = classification_metrics(y_true, y_pred, labels)
    return {
        "val_loss": sum(losses) / len(y_true),
        "val_accuracy": m["accuracy"],
        "val_macro_f1": m["macro_f1"],
        "per_class": m["per_class"],
        "confusion_matrix": m["confusion_matrix"],
    }


def _versions() -> dict:
    import torchvision
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def span_preprocessing(cfg: TrainConfig, tokenizer, task: str) -> dict:
    """Windows of the span tasks: the overlap, and the padding token (decoders have none:
    their end-of-text token pads)."""
    out = {}
    if tokenizer.pad_token_id is not None:
        out["pad_id"] = int(tokenizer.pad_token_id)
        out["pad_token"] = str(tokenizer.pad_token)
    if task in HEADS:
        out["stride"] = cfg.stride if cfg.stride else cfg.max_length // 4
    return out


def postprocessing(cfg: TrainConfig, ds: Dataset) -> dict:
    """The answer's parameters, stored with the weights (question answering)."""
    if ds.task != "question-answering":
        return {}
    unanswerable = ds.summary["train_per_class"].get("unanswerable", 0)
    return {"max_answer_length": cfg.max_answer_length, "allow_no_answer": unanswerable > 0}


# --------------------------------------------------------------------------- main entry


def fine_tune(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune `cfg.backbone` on `data` and write the checkpoint to `out`; returns the best
    epoch's metrics. On resume the configuration saved in `out` is used, not `cfg`."""
    out = Path(out)
    _check_out(out, overwrite, resume)
    if resume:
        saved = checkpoint.read_json(out / checkpoint.CONFIG)
        cfg = TrainConfig.from_dict(saved["training"])
        log(f"resuming '{out}' with its saved configuration")
    problems = cfg.problems()
    if problems:
        raise FinetuneError("invalid configuration: " + "; ".join(problems))
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    task = detect_task(data)
    if cfg.backbone == "auto":
        cfg = dataclasses.replace(cfg, backbone=AUTO_BACKBONES.get(task, "minilm"))
    if cfg.monitor == "auto":  # the task's own metric (tasks registry)
        metric = tasks.get(task).metric
        cfg = dataclasses.replace(
            cfg, monitor="val_macro_f1" if metric == "accuracy" else f"val_{metric}"
        )
    spec = backbones.resolve(cfg.backbone)
    if tasks.uses_tokenizer(task) != tasks.uses_tokenizer(spec.task):
        raise DataError(f"'{data}' holds {task} data but backbone '{spec.name}' is for {spec.task}")
    head_cls = HEADS.get(task, backbones.Classifier)
    prep = mean = std = None
    if task == IMAGE_TASK:
        prep, mean, std = backbones.image_prep(spec, cfg.image_size)
    ds = load_dataset(data, cfg, prep)
    log(describe(ds.summary))
    if resume and ds.labels != saved["labels"]:
        raise CheckpointError(
            f"labels of '{data}' differ from those saved in '{out}'; "
            f"the data changed since the run started"
        )

    encoder, dim = backbones.build_encoder(spec, cfg.weights, prep)
    model = head_cls(encoder, dim, len(ds.labels), cfg.dropout)
    groups = backbones.parameter_groups(spec, encoder)
    tokenizer = None
    if task != IMAGE_TASK:
        location = (
            backbones.hf_location(spec) if cfg.weights in ("pretrained", "random") else cfg.weights
        )
        tokenizer = backbones.load_tokenizer(location)
    model.to(device)

    if not resume:
        _claim_out(out)
    config = {
        "format_version": checkpoint.FORMAT_VERSION,
        "task": task,
        "status": "training",
        "backbone": {
            "name": spec.name,
            "family": spec.family,
            "source": spec.source,
            "weights": cfg.weights,
            "feature_dim": dim,
            "groups": list(spec.groups),
            "num_groups": len(groups),
            **({"hf_config": encoder.model.config.to_dict()} if spec.family == "hf" else {}),
        },
        "head": {
            "type": head_cls.__name__,
            "in_features": dim,
            "out_features": len(ds.labels),
            "dropout": cfg.dropout,
        },
        "labels": ds.labels,
        "preprocessing": (
            {
                "resize": prep.resize,
                "crop_size": prep.crop,
                "interpolation": prep.interpolation,
                "mean": list(mean),
                "std": list(std),
                "scale": 1 / 255,
                "channels": "RGB",
                "layout": "NCHW",
                "resize_mode": "shorter-side, then centre crop",
            }
            if task == IMAGE_TASK
            else {
                "max_length": cfg.max_length,
                "truncation": True,
                "padding": "longest",
                "tokenizer": checkpoint.TOKENIZER,
                "pooling": encoder.pooling,
                "input_names": list(tokenizer.model_input_names),
                **span_preprocessing(cfg, tokenizer, task),
            }
        ),
        "postprocessing": postprocessing(cfg, ds),
        "training": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(device),
        "amp": device.type == "cuda",
        "versions": _versions(),
        "data": ds.summary,
    }
    checkpoint.write_json(out / checkpoint.CONFIG, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / checkpoint.TOKENIZER)
    if not resume:
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.holdout_size, len(ds.val))
        idx = np.sort(rng.choice(len(ds.val), size=n, replace=False))
        held = ds.val.inputs[idx] if task == IMAGE_TASK else [ds.val.inputs[i] for i in idx]
        targets = None if ds.val.targets is None else [json.dumps(ds.val.targets[i]) for i in idx]
        checkpoint.save_holdout(out, held, ds.val.labels[idx], targets)

    if head_cls is backbones.Classifier:
        # Texts are tokenized as export and the service will: from the stored preprocessing.
        inputs = Inputs(task, device, mean, std, tokenizer, cfg.max_length, config["preprocessing"])
        result = _train(model, groups, ds, inputs, cfg, out, device, resume, on_epoch_end, log)
    else:
        if resume:
            raise CheckpointError(f"--resume is not available for {task} runs yet; start again")
        windows = text_tokenizer(tokenizer.backend_tokenizer.to_str(), config["preprocessing"])
        contract = tasks.create(config, windows)
        helpers = (_better, set_trainable, plot_curves)
        result = train_spans(
            model, groups, ds, contract, cfg, out, device, on_epoch_end, log, helpers
        )
    config.update(
        status="complete",
        result={
            k: v
            for k, v in result.items()
            if k == "epoch" or (k.startswith("val_") and isinstance(v, float))
        },
    )
    checkpoint.write_json(out / checkpoint.CONFIG, config)
    shutil.rmtree(out / checkpoint.RESUME, ignore_errors=True)
    return result


def _train(
    model,
    groups,
    ds: Dataset,
    inputs: Inputs,
    cfg: TrainConfig,
    out: Path,
    device,
    resume: bool,
    on_epoch_end,
    log,
) -> dict:
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed)
    if ds.task == IMAGE_TASK:
        train_set = ImageSet(ds.train.inputs, ds.train.labels, cfg.augment)
        val_set = ImageSet(ds.val.inputs, ds.val.labels, False)
    else:
        train_set, val_set = (
            TextSet(ds.train.inputs, ds.train.labels),
            TextSet(ds.val.inputs, ds.val.labels),
        )
    loader_kw = {
        "batch_size": cfg.batch_size,
        "collate_fn": inputs.collate,
        "num_workers": cfg.num_workers,
        "pin_memory": cuda,
    }
    train_loader = DataLoader(train_set, shuffle=True, generator=gen, **loader_kw)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw)

    cached = cfg.strategy == "feature-extraction" and cfg.cache_features and not cfg.augment
    trained, step_inputs, cache_seconds = model, inputs, None
    if cached:
        t0 = time.perf_counter()
        plain = DataLoader(
            ImageSet(ds.train.inputs, ds.train.labels, False)
            if ds.task == IMAGE_TASK
            else train_set,
            shuffle=False,
            **loader_kw,
        )
        train_feats = extract_features(model.backbone, plain, inputs, "caching train features")
        val_feats = extract_features(model.backbone, val_loader, inputs, "caching val features")
        cache_seconds = time.perf_counter() - t0
        log(
            f"feature cache: {len(train_feats[0]) + len(val_feats[0])} samples in "
            f"{cache_seconds:.1f} s"
        )
        trained = nn.Sequential(model.dropout, model.head)
        step_inputs = Inputs("features", device)
        train_loader = DataLoader(
            TensorDataset(*train_feats), batch_size=cfg.batch_size, shuffle=True, generator=gen
        )
        val_loader = DataLoader(TensorDataset(*val_feats), batch_size=256)

    head_params = list(model.head.parameters())
    param_groups = [{"params": head_params, "lr": cfg.lr}]
    if cfg.strategy != "feature-extraction":
        backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10
        param_groups.append({"params": [p for g in groups for p in g], "lr": backbone_lr})
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and not cached)
    criterion = _criterion(cfg, ds, device)

    history, best, best_epoch, bad, start = [], None, None, 0, 0
    if resume:
        st = torch.load(out / checkpoint.RESUME / STATE, map_location="cpu", weights_only=True)
        from safetensors.torch import load_model

        load_model(model, str(out / checkpoint.RESUME / LAST))
        optimizer.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        history, best, best_epoch, bad = st["history"], st["best"], st["best_epoch"], st["bad"]
        start = st["epoch"] + 1
        torch.set_rng_state(st["torch_rng"])
        gen.set_state(st["gen_rng"])
        if cuda and "cuda_rng" in st:
            torch.cuda.set_rng_state(st["cuda_rng"])
        log(
            f"resumed after epoch {start} "
            f"(best so far: epoch {best_epoch}, {cfg.monitor} {best:.4f})"
        )

    for epoch in range(start, cfg.epochs):
        if bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        n_groups = set_trainable(model, groups, cfg.strategy, epoch)
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for x, y in bar:
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda and not cached):
                loss = criterion(step_inputs(trained, x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        val = evaluate(trained, val_loader, step_inputs, ds.labels)
        record = {
            "epoch": epoch + 1,  # 1-based in files, logs and plots
            "train_loss": total / count,
            **{k: val[k] for k in ("val_loss", "val_accuracy", "val_macro_f1")},
            "trainable_groups": n_groups,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        improved = _better(val[cfg.monitor], best, cfg)
        if improved:
            best, best_epoch, bad = val[cfg.monitor], epoch + 1, 0
            best_val = val
            checkpoint.save_weights(out, model)
        else:
            bad += 1
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  "
            f"val_loss {val['val_loss']:.4f}  val_acc {val['val_accuracy']:.4f}  "
            f"val_f1 {val['val_macro_f1']:.4f}  groups {n_groups}/{len(groups)}  "
            f"{record['seconds']:.1f}s{'  *best*' if improved else ''}"
        )
        _write_metrics(out, cfg, history, best_epoch, best_val if improved else None, cache_seconds)
        _save_resume(
            out, model, optimizer, scaler, history, best, best_epoch, bad, epoch, gen, cuda
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    if bad >= cfg.patience:
        log(f"early stopping: no {cfg.monitor} improvement for {cfg.patience} epochs")

    # The best epoch's full evaluation, from the saved best weights.
    from safetensors.torch import load_model

    load_model(model, str(out / checkpoint.WEIGHTS))
    final = evaluate(trained, val_loader, step_inputs, ds.labels)
    final["epoch"] = best_epoch
    _write_metrics(out, cfg, history, best_epoch, final, cache_seconds)
    report = out / "report"
    report.mkdir(exist_ok=True)
    plot_curves(history, report / "curves.png", best_epoch)
    plot_confusion(
        final["confusion_matrix"],
        ds.labels,
        report / "confusion.png",
        f"validation, epoch {best_epoch} (acc {final['val_accuracy']:.3f})",
    )
    return final


def _write_metrics(out: Path, cfg, history, best_epoch, best_val, cache_seconds) -> None:
    path = out / checkpoint.METRICS
    previous = checkpoint.read_json(path).get("best") if path.is_file() else None
    checkpoint.write_json(
        path,
        {
            "monitor": cfg.monitor,
            "epochs": history,
            "best": {"epoch": best_epoch, **best_val} if best_val is not None else previous,
            "feature_cache_seconds": cache_seconds,
        },
    )


def _save_resume(out, model, optimizer, scaler, history, best, best_epoch, bad, epoch, gen, cuda):
    from safetensors.torch import save_model

    folder = out / checkpoint.RESUME
    folder.mkdir(exist_ok=True)
    save_model(model, str(folder / (LAST + ".tmp")))
    state = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "history": history,
        "best": best,
        "best_epoch": best_epoch,
        "bad": bad,
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
        "gen_rng": gen.get_state(),
    }
    if cuda:
        state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(state, folder / (STATE + ".tmp"))
    (folder / (LAST + ".tmp")).replace(folder / LAST)
    (folder / (STATE + ".tmp")).replace(folder / STATE)
