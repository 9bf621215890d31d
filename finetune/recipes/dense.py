"""Object detection and semantic segmentation in the shared loop (train/loop.py).

Every image is letterboxed once, by the same function as export and serving
(`tasks.vision.letterbox`); training augments in that input space with torchvision
`transforms.v2`, which moves boxes and masks with the pixels (flip, scale and shift, colour);
evaluation runs the task contract around the model's export graph, so the validation mAP or
mean IoU is what the exported model and the service reproduce.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import tasks
from finetune import models
from finetune.data import Dataset, describe, load_dataset
from finetune.errors import UnsupportedBackbone
from finetune.progress import progress
from finetune.recipes.base import EVAL_BATCH, Recipe, Setup, run_config, torch_session
from tasks.common import Prepared, normalize
from tasks.segmentation import IGNORE
from tasks.vision import letterbox, pad_fill

GRID = 8  # validation images drawn in report/predictions.png


class DenseSet(torch.utils.data.Dataset):
    """Letterboxed images and targets, augmented on the fly when asked; `kind` (the recipe
    class) says how a target becomes tensors that move with the pixels."""

    def __init__(self, crops, targets, kind, mean, std, augment: bool):
        self.crops, self.targets, self.kind = crops, targets, kind
        self.mean, self.std = mean, std
        self.transform = self._augmentation(pad_fill(mean), kind) if augment else None

    @staticmethod
    def _augmentation(fill, kind):
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
                *kind.after_augmentation(),
            ]
        )

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i):
        from torchvision import tv_tensors

        crop, target = self.crops[i], self.kind.tensors(self.targets[i])
        if self.transform is not None:
            image = tv_tensors.Image(torch.from_numpy(crop).permute(2, 0, 1))
            image, target = self.transform(image, self.kind.wrapped(target, crop.shape[:2]))
            crop = image.permute(1, 2, 0).numpy()
            target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        x = torch.from_numpy(normalize(crop[None], self.mean, self.std)[0])
        return x, target


def collate(batch):
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


class DenseRecipe(Recipe):
    """Detection and segmentation: a dense head on an ImageNet encoder, trained in full."""

    images = True
    dense = True  # epochs sized from the model's optimizer steps once the data is read

    @classmethod
    def setup(cls, task: str, cfg, data, log) -> Setup:
        """(cfg resolved, dataset, model, backbone groups, config.json) of a dense run."""
        import dataclasses

        spec = models.resolve(cfg.backbone, task)
        if task not in spec.tasks:
            raise UnsupportedBackbone(
                f"unknown {task} model '{spec.name}'. Known: {models.known(task)}"
            )
        size = cfg.image_size or spec.input_size
        strategy = cfg.strategy
        if strategy == "auto":
            # A detection or segmentation head starts untrained and needs the encoder's
            # features to adapt: full fine-tuning (backbone at a tenth of the head's rate) is
            # the norm (torchvision's references/detection fine-tune every layer but the stem).
            strategy = "full"
            log("strategy auto: full fine-tuning (dense heads start untrained)")
        cfg = dataclasses.replace(cfg, backbone=spec.name, image_size=size, strategy=strategy)
        ds = load_dataset(data, cfg)
        log(describe(ds.summary))
        cfg, why = cfg.for_steps(spec.train_steps or 0, len(ds.train))
        if why:
            log(f"training length: {why}")
        post = tasks.get(task).default_postprocessing()
        model = models.build_dense(spec, len(ds.labels), size, cfg.weights, post)
        groups = models.parameter_groups(spec, model.backbone)
        parts = {
            "backbone": {
                "name": spec.name,
                "family": f"torchvision-{spec.kind}",
                "source": spec.source,
                "weights": cfg.weights,
                "groups": list(spec.groups),
            },
            "head": {
                "type": type(model).__name__,
                "kind": spec.kind,
                "out_features": len(ds.labels),
            },
            "preprocessing": {
                "image_size": size,
                "resize_mode": "letterbox: longer side to image_size, padded right and bottom",
                "interpolation": "bilinear",
                "mean": list(spec.mean),
                "std": list(spec.std),
                "scale": 1 / 255,
                "channels": "RGB",
                "layout": "NCHW",
                **cls.preprocessing_extra(cfg),
            },
            "postprocessing": post,
        }
        return Setup(cfg, ds, model, groups, run_config(task, cfg, ds, parts))

    @classmethod
    def preprocessing_extra(cls, cfg) -> dict:
        return {}

    @classmethod
    def save_holdout(cls, out, ds: Dataset, cfg, config: dict) -> None:
        """Up to `holdout_size` test images, letterboxed, with their targets in those pixels."""
        from finetune import checkpoint

        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.holdout_for(heavy_inputs=True), len(ds.test))
        idx = np.sort(rng.choice(len(ds.test), size=n, replace=False))
        part = type(ds.test)(
            [ds.test.inputs[i] for i in idx], ds.test.labels[idx], [ds.test.targets[i] for i in idx]
        )
        pre = config["preprocessing"]
        crops, targets = cls.letterbox_split(part, pre["image_size"], pre["mean"])
        contract = tasks.get(ds.task)
        stored = [json.dumps(contract.stored_target(t)) for t in targets]
        checkpoint.save_holdout(out, crops, part.labels, stored)

    @classmethod
    def letterbox_split(cls, part, size: int, mean, interpolation: str = "bilinear"):
        """(uint8 [N, size, size, 3] inputs, targets in their pixels) of a split."""
        fill = pad_fill(mean)
        crops, targets = [], []
        for px, t in zip(part.inputs, part.targets, strict=True):
            crop, scale = letterbox(Image.fromarray(px), size, fill, interpolation)
            crops.append(crop)
            targets.append(cls.scaled(t, scale, size))
        return np.stack(crops), targets

    def __init__(self, run: Setup, device: torch.device, log=print):
        super().__init__(run, device, log)
        self.contract = tasks.create(run.config)
        pre = run.config["preprocessing"]
        self.mean, self.std = pre["mean"], pre["std"]
        self.size = self.contract.size
        self.splits: dict[str, tuple] = {}
        self._golds: dict[str, list] = {}
        self.outputs: dict[str, list] = {}
        self.loader: DataLoader | None = None

    def split(self, name: str):
        """The letterboxed split, made once."""
        if name not in self.splits:
            self.splits[name] = self.letterbox_split(getattr(self.ds, name), self.size, self.mean)
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

    def _set(self, name: str, augment: bool) -> DenseSet:
        crops, targets = self.split(name)
        return DenseSet(crops, targets, type(self), self.mean, self.std, augment)

    def train_loader(self, strategy: str, dist) -> DataLoader:
        if self.loader is None:
            data = self._set("train", self.augment(strategy))
            self.loader = self._loader(
                data, dist, collate_fn=collate, num_workers=self.cfg.num_workers
            )
        return self.loader

    def loss(self, module: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, targets = batch
        return self._loss(module, x.to(self.device, non_blocking=True), targets), len(x)

    @torch.no_grad()
    def evaluate(self, split: str, strategy: str) -> dict:
        """The training loss on the split, then the task's metrics through its contract."""
        self.model.eval()
        crops, _ = self.split(split)
        total = 0.0
        batches = DataLoader(
            self._set(split, False), batch_size=EVAL_BATCH // 4, collate_fn=collate
        )
        for x, t in batches:
            total += self._loss(self.model, x.to(self.device), t).item() * len(x)
        run = torch_session(self.model, self.device)
        items = [Prepared(c, size=(self.size, self.size)) for c in crops]
        outputs = []
        for s in progress(range(0, len(items), EVAL_BATCH // 4), f"scoring {split}"):
            outputs.extend(self.contract.run(run, items[s : s + EVAL_BATCH // 4])[0])
        metrics = self.contract.score(outputs, self.golds(split))
        self.outputs[split] = outputs  # the grid of report/ draws the validation ones
        return {"loss": total / max(1, len(items)), **metrics}

    def draw(self, report) -> None:
        """report/predictions.png: the first validation images, the truth (left) beside the
        prediction (right), under a header naming the columns and each class's colour."""
        from PIL import ImageDraw

        crops, targets = self.split("val")
        if "val" not in self.outputs:
            self.evaluate("val", self.cfg.strategy)
        n, s = min(GRID, len(crops)), self.size
        header = HEADER + LEGEND_ROW * math.ceil(len(self.ds.labels) / LEGEND_PER_ROW)
        sheet = Image.new("RGB", (2 * s, header + n * s), "white")
        draw = ImageDraw.Draw(sheet)
        for col, title in enumerate(("truth", "prediction")):
            draw.text((col * s + 6, 4), title, fill="black", font=_font(14))
        for k, name in enumerate(self.ds.labels):
            x = (k % LEGEND_PER_ROW) * (2 * s // LEGEND_PER_ROW) + 6
            y = HEADER + (k // LEGEND_PER_ROW) * LEGEND_ROW
            draw.rectangle([x, y + 2, x + 12, y + 14], fill=_colour(k))
            draw.text((x + 16, y + 1), name, fill="black", font=_font(12))
        for i in range(n):
            truth, predicted = self.truth_and_prediction(targets[i], self.outputs["val"][i])
            for col, drawn in enumerate((truth, predicted)):
                im = self.painted(Image.fromarray(crops[i]), drawn, self.ds.labels)
                sheet.paste(im, (col * s, header + i * s))
        sheet.save(report / "predictions.png")


HEADER, LEGEND_ROW, LEGEND_PER_ROW = 22, 18, 4  # predictions.png's header, pixels


def _colour(k: int) -> tuple[int, int, int]:
    from tasks.vision import PALETTE

    return tuple(int(v) for v in PALETTE[int(k) % len(PALETTE)])


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


class ObjectDetection(DenseRecipe):
    loss_name = "detection loss (classification + boxes, torchvision's)"

    @staticmethod
    def after_augmentation() -> list:
        """Boxes pushed partly out are clipped, those left without area dropped."""
        from torchvision.transforms import v2

        return [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2)]

    @staticmethod
    def tensors(t: dict) -> dict:
        return {
            "boxes": torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(t["labels"], dtype=torch.int64),
        }

    @staticmethod
    def wrapped(target: dict, size) -> dict:
        from torchvision import tv_tensors

        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=size)
        return {**target, "boxes": boxes}

    @staticmethod
    def scaled(t: dict, scale: float, size: int) -> dict:
        return {"boxes": t["boxes"] * scale, "labels": t["labels"]}

    def _loss(self, module: nn.Module, x, targets) -> torch.Tensor:
        moved = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        return sum(module(x, moved).values())

    def truth_and_prediction(self, target: dict, output: dict):
        keep = output["scores"] >= self.contract.post["min_score"]
        truth = (target["boxes"], target["labels"], [None] * len(target["labels"]))
        return truth, (output["boxes"][keep], output["labels"][keep], output["scores"][keep])

    @staticmethod
    def painted(im, drawn, labels):
        """Each box in its class's colour, its label (and score) on a tab above it."""
        from PIL import ImageDraw

        draw, font = ImageDraw.Draw(im), _font(11)
        for b, c, score in zip(*drawn, strict=True):
            colour = _colour(c)
            x0, y0, x1, y1 = (float(v) for v in b)
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
            text = labels[int(c)] + ("" if score is None else f" {float(score):.2f}")
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            ty = y0 - (bottom - top) - 4 if y0 >= (bottom - top) + 4 else y0
            draw.rectangle([x0, ty, x0 + right - left + 4, ty + bottom - top + 4], fill=colour)
            draw.text((x0 + 2, ty + 2 - top), text, fill="white", font=font)
        return im


class SemanticSegmentation(DenseRecipe):
    loss_name = "pixel cross-entropy (void excluded)"

    @classmethod
    def preprocessing_extra(cls, cfg) -> dict:
        return {"ignore_index": cfg.ignore_index}

    @staticmethod
    def after_augmentation() -> list:
        return []

    @staticmethod
    def tensors(t: dict) -> dict:
        return {"mask": torch.as_tensor(t["mask"], dtype=torch.int64)}

    @staticmethod
    def wrapped(target: dict, size) -> dict:
        from torchvision import tv_tensors

        return {"mask": tv_tensors.Mask(target["mask"])}

    @staticmethod
    def scaled(t: dict, scale: float, size: int) -> dict:
        h, w = t["mask"].shape
        m = Image.fromarray(t["mask"]).resize(
            (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))),
            Image.Resampling.NEAREST,
        )
        canvas = np.full((size, size), IGNORE, np.uint8)
        canvas[: m.size[1], : m.size[0]] = np.asarray(m)
        return {"mask": canvas}

    def _loss(self, module: nn.Module, x, targets) -> torch.Tensor:
        y = torch.stack([t["mask"] for t in targets]).to(self.device)
        return nn.functional.cross_entropy(module(x).float(), y, ignore_index=IGNORE)

    def truth_and_prediction(self, target: dict, output: dict):
        return target["mask"], output["mask"]

    @staticmethod
    def painted(im, mask, labels=None):
        from tasks.vision import PALETTE

        mask = mask.astype(np.int64)
        colours = PALETTE[mask % len(PALETTE)].astype(np.float32)
        blend = 0.5 * np.asarray(im, np.float32) + 0.5 * colours
        blend[mask == IGNORE] = np.asarray(im, np.float32)[mask == IGNORE]
        return Image.fromarray(blend.astype(np.uint8))
