"""Object detection and semantic segmentation in the shared loop (finetune/loop.py).

Every image is letterboxed once, by the same function as export and serving
(`tasks.vision.letterbox`); training augments in that input space with torchvision
`transforms.v2`, which moves boxes and masks with the pixels (flip, scale and shift, colour);
evaluation runs the task contract around the model's export graph, so the validation mAP or
mean IoU is what the exported model and the service reproduce.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import tasks
from finetune import backbones, vision
from finetune.data import Dataset, describe, load_dataset
from finetune.loop import Dist, progress
from finetune.recipes import EVAL_BATCH, _Recipe, torch_session
from tasks.common import Prepared, normalize
from tasks.segmentation import IGNORE
from tasks.vision import letterbox, pad_fill

DETECTION = "object-detection"
GRID = 8  # validation images drawn in report/predictions.png


def setup(task: str, cfg, data, log):
    """(cfg resolved, dataset, model, backbone groups, config.json) of a dense vision run."""
    import dataclasses

    spec = vision.resolve(cfg.backbone, task)
    size = cfg.image_size or vision.DEFAULT_SIZE[task]
    strategy = cfg.strategy
    if strategy == "auto":
        # A detection or segmentation head starts untrained and needs the encoder's features
        # to adapt: full fine-tuning (backbone at a tenth of the head's rate) is the norm
        # (torchvision's references/detection fine-tune every layer but the stem).
        strategy = "full"
        log("strategy auto: full fine-tuning (dense heads start untrained)")
    cfg = dataclasses.replace(cfg, backbone=spec.name, image_size=size, strategy=strategy)
    ds = load_dataset(data, cfg)
    log(describe(ds.summary))
    post = tasks.get(task).default_postprocessing()
    model = vision.build(spec, len(ds.labels), size, cfg.weights, post)
    groups = backbones.parameter_groups(spec, model.backbone)
    mean, std = spec.mean, spec.std
    from finetune import checkpoint

    config = {
        "format_version": checkpoint.FORMAT_VERSION,
        "task": task,
        "status": "training",
        "backbone": {
            "name": spec.name,
            "family": f"torchvision-{spec.kind}",
            "source": spec.source,
            "weights": cfg.weights,
            "groups": list(spec.groups),
        },
        "head": {"type": type(model).__name__, "kind": spec.kind, "out_features": len(ds.labels)},
        "labels": ds.labels,
        "preprocessing": {
            "image_size": size,
            "resize_mode": "letterbox: longer side to image_size, padded right and bottom",
            "interpolation": "bilinear",
            "mean": list(mean),
            "std": list(std),
            "scale": 1 / 255,
            "channels": "RGB",
            "layout": "NCHW",
            **({"ignore_index": cfg.ignore_index} if task != DETECTION else {}),
        },
        "postprocessing": post,
        "training": cfg.to_dict(),
        "seed": cfg.seed,
        "amp": torch.cuda.is_available() and cfg.device != "cpu",
        "data": ds.summary,
    }
    return cfg, ds, model, groups, config


def save_holdout(out, ds: Dataset, cfg, config: dict) -> None:
    """Up to `holdout_size` test images, letterboxed, with their targets in those pixels."""
    from finetune import checkpoint

    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.holdout_for(heavy_inputs=True), len(ds.test))
    idx = np.sort(rng.choice(len(ds.test), size=n, replace=False))
    part = type(ds.test)(
        [ds.test.inputs[i] for i in idx], ds.test.labels[idx], [ds.test.targets[i] for i in idx]
    )
    pre = config["preprocessing"]
    crops, targets = letterbox_split(part, pre["image_size"], pre["mean"], ds.task)
    contract = tasks.get(ds.task)
    stored = [json.dumps(contract.stored_target(t)) for t in targets]
    checkpoint.save_holdout(out, crops, part.labels, stored)


def letterbox_split(part, size: int, mean, task: str, interpolation: str = "bilinear"):
    """(uint8 [N, size, size, 3] inputs, targets in their pixels) of a split."""
    fill = pad_fill(mean)
    crops, targets = [], []
    for px, t in zip(part.inputs, part.targets, strict=True):
        crop, scale = letterbox(Image.fromarray(px), size, fill, interpolation)
        crops.append(crop)
        if task == DETECTION:
            targets.append({"boxes": t["boxes"] * scale, "labels": t["labels"]})
        else:
            h, w = t["mask"].shape
            m = Image.fromarray(t["mask"]).resize(
                (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))),
                Image.Resampling.NEAREST,
            )
            canvas = np.full((size, size), IGNORE, np.uint8)
            canvas[: m.size[1], : m.size[0]] = np.asarray(m)
            targets.append({"mask": canvas})
    return np.stack(crops), targets


class DenseSet(torch.utils.data.Dataset):
    """Letterboxed images and targets, augmented on the fly when asked."""

    def __init__(self, crops, targets, task: str, mean, std, augment: bool):
        self.crops, self.targets, self.task = crops, targets, task
        self.mean, self.std = mean, std
        self.transform = self._augmentation(pad_fill(mean), task) if augment else None

    @staticmethod
    def _augmentation(fill, task: str):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(
                    degrees=0,
                    translate=(0.1, 0.1),
                    scale=(0.75, 1.25),
                    fill={tv_tensors.Image: list(fill), tv_tensors.Mask: IGNORE},
                ),
                v2.RandomPhotometricDistort(p=0.5),
            ]
            + (  # boxes pushed partly out are clipped, those left without area dropped
                [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2)]
                if task == DETECTION
                else []
            )
        )

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i):
        from torchvision import tv_tensors

        crop, t = self.crops[i], self.targets[i]
        if self.task == DETECTION:
            target = {
                "boxes": torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(t["labels"], dtype=torch.int64),
            }
        else:
            target = {"mask": torch.as_tensor(t["mask"], dtype=torch.int64)}
        if self.transform is not None:
            size = crop.shape[:2]
            image = tv_tensors.Image(torch.from_numpy(crop).permute(2, 0, 1))
            if self.task == DETECTION:
                target["boxes"] = tv_tensors.BoundingBoxes(
                    target["boxes"], format="XYXY", canvas_size=size
                )
            else:
                target["mask"] = tv_tensors.Mask(target["mask"])
            image, target = self.transform(image, target)
            crop = image.permute(1, 2, 0).numpy()
            target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        x = torch.from_numpy(normalize(crop[None], self.mean, self.std)[0])
        return x, target


def collate(batch):
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


class DenseRecipe(_Recipe):
    @property
    def loss_name(self) -> str:
        """What report/curves.png calls the loss."""
        if self.ds.task == DETECTION:
            return "detection loss (classification + boxes, torchvision's)"
        return "pixel cross-entropy (void excluded)"

    def __init__(self, model, groups, ds: Dataset, cfg, device, config: dict):
        super().__init__(model, groups, ds, cfg, device)
        self.contract = tasks.create(config)
        self.mean, self.std = config["preprocessing"]["mean"], config["preprocessing"]["std"]
        self.size = self.contract.size
        self.splits: dict[str, tuple] = {}
        self._golds: dict[str, list] = {}
        self.outputs: dict[str, list] = {}
        self.loader: DataLoader | None = None

    def split(self, name: str):
        """The letterboxed split, made once."""
        if name not in self.splits:
            self.splits[name] = letterbox_split(
                getattr(self.ds, name), self.size, self.mean, self.ds.task
            )
        return self.splits[name]

    def golds(self, name: str) -> list:
        """What the contract scores a split against, read as export reads the holdout (its
        stored JSON), once per split rather than once per epoch."""
        if name not in self._golds:
            c = self.contract
            self._golds[name] = [c.gold(c.stored_target(t)) for t in self.split(name)[1]]
        return self._golds[name]

    def augment(self, strategy: str) -> bool:
        return True if self.cfg.augment is None else self.cfg.augment

    def train_loader(self, strategy: str, dist: Dist) -> DataLoader:
        if self.loader is None:
            crops, targets = self.split("train")
            data = DenseSet(
                crops, targets, self.ds.task, self.mean, self.std, self.augment(strategy)
            )
            self.loader = self._loader(
                data, dist, collate_fn=collate, num_workers=self.cfg.num_workers
            )
        return self.loader

    def _targets(self, targets: list[dict]) -> list[dict]:
        return [{k: v.to(self.device) for k, v in t.items()} for t in targets]

    def _loss(self, module: nn.Module, x, targets) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.ds.task == DETECTION:
            return sum(module(x, self._targets(targets)).values())
        y = torch.stack([t["mask"] for t in targets]).to(self.device)
        return nn.functional.cross_entropy(module(x).float(), y, ignore_index=IGNORE)

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, targets = batch
        return self._loss(module, x, targets), len(x)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        """The training loss on the split, then the task's metrics through its contract."""
        self.model.eval()
        crops, targets = self.split(split)
        data = DenseSet(crops, targets, self.ds.task, self.mean, self.std, augment=False)
        total = 0.0
        for x, t in DataLoader(data, batch_size=EVAL_BATCH // 4, collate_fn=collate):
            total += self._loss(self.model, x, t).item() * len(x)
        run = torch_session(self.model, self.device)
        items = [Prepared(c, size=(self.size, self.size)) for c in crops]
        outputs = []
        for s in progress(range(0, len(items), EVAL_BATCH // 4), f"scoring {split}"):
            outputs.extend(self.contract.run(run, items[s : s + EVAL_BATCH // 4])[0])
        golds = self.golds(split)
        metrics = self.contract.score(outputs, golds)
        self.outputs[split] = outputs  # the grid of report/ draws the validation ones
        return {"loss": total / max(1, len(items)), **metrics}

    def draw_grid(self, path) -> None:
        """The first validation images with the truth (left) and the prediction (right)."""
        from PIL import ImageDraw

        from tasks.vision import PALETTE

        crops, targets = self.split("val")
        if "val" not in self.outputs:
            self.evaluate("val", self.cfg.strategy)
        outputs = self.outputs["val"]
        n = min(GRID, len(crops))
        s = self.size
        sheet = Image.new("RGB", (2 * s, n * s), "white")
        for i in range(n):
            for col, source in enumerate(("truth", "prediction")):
                im = Image.fromarray(crops[i])
                if self.ds.task == DETECTION:
                    draw = ImageDraw.Draw(im)
                    if source == "truth":
                        boxes, labels = targets[i]["boxes"], targets[i]["labels"]
                    else:
                        keep = outputs[i]["scores"] >= self.contract.post["min_score"]
                        boxes, labels = outputs[i]["boxes"][keep], outputs[i]["labels"][keep]
                    for b, c in zip(boxes, labels, strict=True):
                        colour = tuple(int(v) for v in PALETTE[int(c) % len(PALETTE)])
                        draw.rectangle([float(v) for v in b], outline=colour, width=2)
                else:
                    mask = (targets[i]["mask"] if source == "truth" else outputs[i]["mask"]).astype(
                        np.int64
                    )
                    colours = PALETTE[mask % len(PALETTE)].astype(np.float32)
                    blend = 0.5 * np.asarray(im, np.float32) + 0.5 * colours
                    blend[mask == IGNORE] = np.asarray(im, np.float32)[mask == IGNORE]
                    im = Image.fromarray(blend.astype(np.uint8))
                sheet.paste(im, (col * s, i * s))
        sheet.save(path)
