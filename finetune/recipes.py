"""What a task brings to the shared loop (finetune/loop.py): its batches, its loss and its
evaluation on a split.

- `ClassifierRecipe` (image and text classification): batches from memory; with a frozen
  backbone and no augmentation the backbone runs once per split and the head trains on the
  cached features; evaluation is accuracy, macro-F1 and the confusion matrix.
- `SpanRecipe` (token classification, question answering): windows of each example labelled
  by the task contract (`tasks/`), batched by similar length; evaluation through the
  contract's own post-processing and metrics around the PyTorch model, so the figures are
  those export and the service reproduce.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from finetune import loop
from finetune.data import AUDIO_TASK, IMAGE_TASK, Dataset
from finetune.heads import collate_windows
from finetune.inputs import AudioSet, ImageSet, Inputs, TextSet
from finetune.loop import Dist, progress
from finetune.metrics import classification_metrics
from tasks.common import INPUT_ORDER

EVAL_BATCH = 64  # samples per evaluation batch


class _Recipe:
    """The parts both recipes share: model, backbone groups, device, random state."""

    cache_seconds: float | None = None

    def __init__(self, model: nn.Module, groups, ds: Dataset, cfg, device: torch.device):
        self.model, self.groups, self.ds, self.cfg, self.device = model, groups, ds, cfg, device
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.samplers: list = []

    def cached(self, strategy: str) -> bool:
        return False

    def module(self, strategy: str) -> nn.Module:
        return self.model

    def set_trainable(self, strategy: str, epoch: int) -> int:
        return loop.set_trainable(self.model, self.groups, strategy, epoch)

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.gen.set_state(state["gen"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"])

    def _loader(self, data, dist: Dist, **kw) -> DataLoader:
        """Shuffled each epoch; under torchrun each process takes its shard."""
        if dist.world > 1:
            sampler = DistributedSampler(
                data, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=self.cfg.seed
            )
            self.samplers.append(sampler)
            return DataLoader(data, batch_size=self.cfg.batch_size, sampler=sampler, **kw)
        return DataLoader(
            data, batch_size=self.cfg.batch_size, shuffle=True, generator=self.gen, **kw
        )


# --------------------------------------------------------------------------- classification


class ClassifierRecipe(_Recipe):
    def __init__(self, model, groups, ds: Dataset, cfg, device, inputs: Inputs):
        super().__init__(model, groups, ds, cfg, device)
        self.inputs = inputs
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.head_only = nn.Sequential(model.dropout, model.head)
        self.feature_inputs = Inputs("features", device)  # cached features: already pooled
        self.loaders: dict[str, DataLoader] = {}
        self.audio: dict[str, AudioSet] = {}
        weight = None
        if cfg.class_weighting == "balanced":
            counts = np.bincount(ds.train.labels, minlength=len(ds.labels)).astype(np.float64)
            weight = torch.tensor(
                len(ds.train) / (len(ds.labels) * counts), dtype=torch.float32, device=device
            )
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

    def cached(self, strategy: str) -> bool:
        return (
            strategy == "feature-extraction"
            and self.cfg.cache_features
            and not self.augment(strategy)
        )

    def augment(self, strategy: str) -> bool:
        """Augment images: as asked, or by default whenever the backbone trains (a frozen
        backbone's features are cached instead: timm's and torchvision's fine-tuning recipes
        augment; a linear probe on cached features does not)."""
        if self.cfg.augment is not None:
            return self.cfg.augment
        return self.ds.task == IMAGE_TASK and strategy != "feature-extraction"

    def module(self, strategy: str) -> nn.Module:
        """The module that trains under `strategy`; `self.feed` turns its batches into inputs."""
        cached = self.cached(strategy)
        self.feed = self.feature_inputs if cached else self.inputs
        return self.head_only if cached else self.model

    def _set(self, split: str, augment: bool):
        part = getattr(self.ds, split)
        if self.ds.task == IMAGE_TASK:
            return ImageSet(part.inputs, part.labels, augment)
        if self.ds.task == AUDIO_TASK:  # features once per split (no audio augmentation)
            if split not in self.audio:
                self.audio[split] = AudioSet(part.inputs, part.labels, self.inputs.contract)
            return self.audio[split]
        return TextSet(part.inputs, part.labels)

    def _plain_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._set(split, False),
            batch_size=EVAL_BATCH,
            collate_fn=self.inputs.collate,
            num_workers=self.cfg.num_workers,
        )

    def _cache(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen backbone's features of `split`, computed once (test only if asked)."""
        if split not in self.features:
            t0 = time.perf_counter()
            encoder = self.model.backbone.eval()
            feats, labels = [], []
            with torch.no_grad():
                for x, y in progress(self._plain_loader(split), f"caching {split} features"):
                    with torch.autocast(
                        self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"
                    ):
                        feats.append(self.inputs(encoder, x).float().cpu())
                    labels.append(y)
            self.features[split] = (torch.cat(feats), torch.cat(labels))
            self.cache_seconds = (self.cache_seconds or 0.0) + time.perf_counter() - t0
        return self.features[split]

    def train_loader(self, strategy: str, dist: Dist) -> DataLoader:
        key = "cached" if self.cached(strategy) else f"raw-{self.augment(strategy)}"
        if key not in self.loaders:
            if key == "cached":
                self.loaders[key] = self._loader(TensorDataset(*self._cache("train")), dist)
            else:
                self.loaders[key] = self._loader(
                    self._set("train", self.augment(strategy)),
                    dist,
                    collate_fn=self.inputs.collate,
                    num_workers=self.cfg.num_workers,
                    pin_memory=self.device.type == "cuda",
                )
        return self.loaders[key]

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        y = y.to(self.device, non_blocking=True)
        return self.criterion(self.feed(module, x).float(), y), len(y)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        module = self.module(strategy)
        module.eval()
        if self.cached(strategy):
            feats, labels = self._cache(split)
            batches = [
                (feats[s : s + 256], labels[s : s + 256]) for s in range(0, len(labels), 256)
            ]
        else:
            batches = self._plain_loader(split)
        losses, preds, truth = 0.0, [], []
        for x, y in batches:
            with torch.autocast(
                self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"
            ):
                logits = self.feed(module, x).float()
            y = y.to(logits.device)
            losses += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
            truth.append(y.cpu())
        y_true, y_pred = torch.cat(truth).numpy(), torch.cat(preds).numpy()
        m = classification_metrics(y_true, y_pred, self.ds.labels)
        return {
            "loss": losses / len(y_true),
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "per_class": m["per_class"],
            "confusion_matrix": m["confusion_matrix"],
            "correct": (y_true == y_pred).tolist(),  # auto's paired comparison; not saved
        }


# --------------------------------------------------------------------------- spans


def torch_session(model, device):
    """`session_run` for the task contract: numpy feeds → the model's export outputs."""

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(feeds[n]).to(device) for n in INPUT_ORDER if n in feeds]
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            outs = model.export_outputs(*args)
        return [(o.float() if o.is_floating_point() else o).cpu().numpy() for o in outs]

    return run


class LengthGroupedBatches:
    """Shuffled batches of windows of similar length (less padding, about 2x faster on
    CoNLL sentences): random pools of 50 batches, each sorted by length and cut. Under
    torchrun each process takes every `world`-th batch (equal counts: DDP steps together)."""

    def __init__(self, lengths: list[int], batch_size: int, gen, dist: Dist, pool: int = 50):
        self.lengths, self.batch_size, self.gen, self.pool = lengths, batch_size, gen, pool
        self.dist = dist

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size // self.dist.world

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.gen).tolist()
        size = self.batch_size * self.pool
        batches = []
        for s in range(0, len(order), size):
            chunk = sorted(order[s : s + size], key=lambda i: self.lengths[i])
            batches += [
                chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)
            ]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=self.gen).tolist()]
        yield from shuffled[self.dist.rank :: self.dist.world][: len(self)]


class SpanRecipe(_Recipe):
    def __init__(self, model, groups, ds: Dataset, cfg, device, contract, log):
        super().__init__(model, groups, ds, cfg, device)
        self.contract = contract
        self.rows = {"train": self._rows("train")}
        log(
            f"windows: {len(self.rows['train'])} train (max_length "
            f"{contract.pre['max_length']}, stride {contract.pre.get('stride', 0)})"
        )
        self.loader: DataLoader | None = None

    def _rows(self, split: str) -> list[tuple[dict, object]]:
        part = getattr(self.ds, split)
        rows = []
        for raw, target in zip(part.inputs, part.targets, strict=True):
            for enc, y in self.contract.training_windows(raw, target):
                feeds = {
                    "input_ids": enc.ids,
                    "attention_mask": enc.attention_mask,
                    "token_type_ids": enc.type_ids,
                }
                rows.append((feeds, y))
        return rows

    def _collate(self, rows):
        return collate_windows(rows, self.contract.names(), self.contract.pad_id, self.model)

    def train_loader(self, strategy: str, dist: Dist) -> DataLoader:
        if self.loader is None:
            lengths = [len(r[0]["input_ids"]) for r in self.rows["train"]]
            batches = LengthGroupedBatches(lengths, self.cfg.batch_size, self.gen, dist)
            self.loader = DataLoader(
                self.rows["train"], batch_sampler=batches, collate_fn=self._collate
            )
        return self.loader

    def _args(self, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """A collated batch as the model's positional inputs, on the device."""
        return [x[n].to(self.device) for n in INPUT_ORDER if n in x]

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        logits = module(*self._args(x))
        return self.model.loss(logits, y.to(self.device), self.cfg.label_smoothing), len(y)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        """The loss over the labelled windows, then the task's metrics from its own reading
        of the model's outputs (entities, answers)."""
        self.model.eval()
        if split not in self.rows:
            self.rows[split] = self._rows(split)
        total, count = 0.0, 0
        for x, y in DataLoader(self.rows[split], batch_size=EVAL_BATCH, collate_fn=self._collate):
            loss = self.model.loss(self.model(*self._args(x)), y.to(self.device))
            total, count = total + loss.item() * len(y), count + len(y)
        run = torch_session(self.model, self.device)
        part = getattr(self.ds, split)
        items = [self.contract.from_holdout(v) for v in part.inputs]
        outputs = []
        for s in range(0, len(items), EVAL_BATCH):
            outputs.extend(self.contract.run(run, items[s : s + EVAL_BATCH])[0])
        metrics = self.contract.score(outputs, [self.contract.gold(t) for t in part.targets])
        return {"loss": total / max(1, count), **metrics}
