"""Object detection and semantic segmentation data (DESIGN.md §1).

Detection layouts:
- Pascal VOC: images (at the top, or in `images/` or `JPEGImages/`) with one XML each, beside
  them or in `annotations/` / `Annotations/`; optional `train.txt` / `val.txt` / `test.txt`
  stem lists, or `train/`, `val/`, `test/` folders each laid out so;
- COCO: a JSON file with `images`, `annotations` and `categories`, images beside it or in
  `images/` (per split folder, or one file per split: `train.json`, `val.json`).
Segmentation layouts: `images/` + `masks/` with the same stems (a class index per pixel),
optionally under `train/`, `val/`, `test/`, with an optional `classes.txt`; Pascal VOC's
`JPEGImages/` + `SegmentationClass/` (palette PNGs, 255 = void border) with
`ImageSets/Segmentation/{train,val}.txt`.

Cleaning, counted in the summary: boxes with zero or negative area (dropped), boxes outside
the image (clipped), XML sizes that disagree with the image, images without boxes (kept as
negatives), unreadable images and masks (listed), masks whose size differs from the image's,
mask values outside the classes (void), duplicate images.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.dataset import Dataset, Split, split_summary
from finetune.data.splits import ROLES, three_way
from finetune.errors import DataError
from tasks.segmentation import IGNORE

DETECTION = "object-detection"
SEGMENTATION = "semantic-segmentation"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SPLIT_DIRS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}
MAX_LISTED = 50


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def _first_dir(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _split_roots(path: Path) -> dict[str, Path]:
    """{"train": folder, "val": ..., "test": ...} for pre-split folders, else {"train": path}."""
    found = {}
    for child in sorted(path.iterdir()):
        role = SPLIT_DIRS.get(child.name.lower())
        if child.is_dir() and role and role not in found:
            found[role] = child
    return found if "train" in found else {"train": path}


def _coco_file(folder: Path) -> Path | None:
    for p in sorted(folder.glob("*.json")):
        try:
            head = p.read_text(errors="replace")[:200_000]
        except OSError:
            continue
        if '"annotations"' in head and '"images"' in head and '"categories"' in head:
            return p
    return None


def _voc_xml_dir(root: Path) -> Path | None:
    for d in (root / "annotations", root / "Annotations", root):
        if d.is_dir() and any(d.glob("*.xml")):
            return d
    return None


def detect(path: Path) -> str | None:
    """The dense vision task of a data folder, or None (then another loader applies)."""
    if not path.is_dir():
        return None
    root = _split_roots(path)["train"]
    if (root / "masks").is_dir() and (root / "images").is_dir():
        return SEGMENTATION
    if (root / "SegmentationClass").is_dir():
        return SEGMENTATION
    if _coco_file(root) is not None or _voc_xml_dir(root) is not None:
        return DETECTION
    return None


# --------------------------------------------------------------------------- decoding


def _read_image(p: Path, bad: list[str], counts: Counter) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception:  # any decoder error: the file is listed and skipped
        counts["undecodable_images"] += 1
        if len(bad) < MAX_LISTED:
            bad.append(str(p))
        return None


def _clean_boxes(boxes: np.ndarray, w: int, h: int, counts: Counter) -> np.ndarray:
    """Clip to the image, drop what has no area left."""
    if not len(boxes):
        return boxes.reshape(0, 4)
    clipped = np.clip(boxes, 0, [w, h, w, h])
    counts["boxes_clipped"] += int((np.abs(clipped - boxes) > 0.5).any(1).sum())
    area_ok = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    counts["boxes_without_area"] += int((~area_ok).sum())
    return clipped[area_ok]


# --------------------------------------------------------------------------- detection


def _voc_records(root: Path, counts: Counter, bad: list[str]) -> list[dict]:
    xml_dir = _voc_xml_dir(root)
    image_dir = _first_dir(root, "images", "JPEGImages") or root
    by_stem = {p.stem: p for p in _images(image_dir)}
    records = []
    for xml in sorted(xml_dir.glob("*.xml")):
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DataError(f"'{xml}': not valid XML ({e})") from None
        name = tree.findtext("filename") or ""
        image = by_stem.get(Path(name).stem) or by_stem.get(xml.stem)
        if image is None:
            counts["annotations_without_image"] += 1
            continue
        objects = []
        for obj in tree.iter("object"):
            box = obj.find("bndbox")
            label = (obj.findtext("name") or "").strip()
            if box is None or not label:
                raise DataError(f"'{xml}': an <object> has no <name> or <bndbox>")
            try:
                coords = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                raise DataError(
                    f"'{xml}': a <bndbox> lacks a numeric xmin/ymin/xmax/ymax"
                ) from None
            objects.append((label, coords))
        size = (tree.findtext("size/width"), tree.findtext("size/height"))
        records.append({"path": image, "objects": objects, "xml_size": size, "source": xml})
    return records


def _coco_records(file: Path, counts: Counter) -> list[dict]:
    try:
        data = json.loads(file.read_text())
        cats = {c["id"]: c["name"] for c in data["categories"]}
        images = {im["id"]: im for im in data["images"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"'{file}': not COCO JSON ({type(e).__name__}: {e})") from None
    folder = _first_dir(file.parent, "images") or file.parent
    objects: dict[int, list] = {i: [] for i in images}
    for a in data["annotations"]:
        if a.get("iscrowd"):
            counts["crowd_annotations_skipped"] += 1
            continue
        x, y, w, h = a["bbox"]
        if a["image_id"] not in objects or a["category_id"] not in cats:
            raise DataError(
                f"'{file}': annotation {a.get('id')} names an unknown image or category"
            )
        objects[a["image_id"]].append((cats[a["category_id"]], [x, y, x + w, y + h]))
    return [
        {
            "path": folder / im["file_name"],
            "objects": objects[i],
            "xml_size": (im.get("width"), im.get("height")),
            "source": file,
        }
        for i, im in images.items()
    ]


def _stem_lists(path: Path) -> dict[str, set[str]]:
    """train.txt / val.txt / test.txt of image stems (also under ImageSets/Main/)."""
    out = {}
    for folder in (path, path / "ImageSets" / "Main", path / "ImageSets" / "Segmentation"):
        for role, names in (("train", ("train",)), ("val", ("val", "valid")), ("test", ("test",))):
            for n in names:
                f = folder / f"{n}.txt"
                if f.is_file() and role not in out:
                    out[role] = {ln.split()[0] for ln in f.read_text().splitlines() if ln.strip()}
    return out if "train" in out else {}


def _by_lists(records: list[dict], lists: dict[str, set[str]], counts: Counter) -> dict:
    parts: dict[str, list] = {role: [] for role in lists}
    for r in records:
        role = next((k for k, stems in lists.items() if r["path"].stem in stems), None)
        if role is None:
            counts["images_in_no_list"] += 1
            continue
        parts[role].append(r)
    return parts


def _assign(records, role, root, single: bool, parts: dict, sources: dict, counts) -> None:
    """A folder's records into `parts`: by its stem lists when it has them (one folder for
    every split), else all to `role`."""
    lists = _stem_lists(root) if single else {}
    if lists:
        for k, v in _by_lists(records, lists, counts).items():
            parts[k], sources[k] = v, root / f"{k}.txt"
    else:
        parts[role], sources[role] = records, root


def _load_detection(r: dict, counts: Counter, bad: list[str]) -> dict | None:
    px = _read_image(r["path"], bad, counts)
    if px is None:
        return None
    h, w = px.shape[:2]
    xs, ys = r["xml_size"]
    try:
        if xs and ys and (int(float(xs)), int(float(ys))) != (w, h) and int(float(xs)) > 0:
            counts["annotation_size_mismatch"] += 1
    except ValueError:
        counts["annotation_size_mismatch"] += 1
    labels = [lb for lb, _ in r["objects"]]
    boxes = np.asarray([b for _, b in r["objects"]], dtype=np.float64).reshape(-1, 4)
    area_ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    counts["boxes_without_area"] += int((~area_ok).sum())
    boxes, labels = boxes[area_ok], [lb for lb, ok in zip(labels, area_ok, strict=True) if ok]
    clipped = _clean_boxes(boxes, w, h, counts)
    if len(clipped) != len(boxes):  # boxes entirely outside the image
        keep = (np.clip(boxes[:, 2], 0, w) > np.clip(boxes[:, 0], 0, w)) & (
            np.clip(boxes[:, 3], 0, h) > np.clip(boxes[:, 1], 0, h)
        )
        labels = [lb for lb, k in zip(labels, keep, strict=True) if k]
    if not labels:
        counts["images_without_boxes"] += 1
    return {"pixels": px, "boxes": clipped, "names": labels, "path": str(r["path"])}


def _detection_parts(path: Path, counts: Counter, bad: list[str]) -> tuple[dict, dict]:
    roots = _split_roots(path)
    parts, sources = {}, {}
    for role, root in roots.items():
        coco = _coco_file(root)
        records = _coco_records(coco, counts) if coco else _voc_records(root, counts, bad)
        if not records:
            raise DataError(f"'{root}' holds no annotated images (VOC XML or COCO JSON)")
        _assign(records, role, root, len(roots) == 1, parts, sources, counts)
    loaded = {}
    for role, records in parts.items():
        loaded[role] = [x for r in records if (x := _load_detection(r, counts, bad)) is not None]
    return loaded, sources


# --------------------------------------------------------------------------- segmentation


def _seg_records(root: Path) -> list[dict]:
    if (root / "SegmentationClass").is_dir():
        images, masks = root / "JPEGImages", root / "SegmentationClass"
    else:
        images, masks = root / "images", root / "masks"
    by_stem = {p.stem: p for p in _images(masks)}
    return [{"path": p, "mask": by_stem.get(p.stem)} for p in _images(images)]


def _load_mask(p: Path, counts: Counter, bad: list[str]) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(p) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(
                    f"mask '{p}' is a {im.mode} image; masks hold one class index per pixel "
                    f"(8-bit grey or palette PNG)"
                )
            return np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except Exception:
        counts["undecodable_masks"] += 1
        if len(bad) < MAX_LISTED:
            bad.append(str(p))
        return None


def _segmentation_parts(path: Path, counts: Counter, bad: list[str]) -> tuple[dict, dict]:
    roots = _split_roots(path)
    parts, sources = {}, {}
    for role, root in roots.items():
        records = _seg_records(root)
        missing = [r for r in records if r["mask"] is None]
        counts["images_without_mask"] += len(missing)
        records = [r for r in records if r["mask"] is not None]
        if not records:
            raise DataError(f"'{root}' holds no image with a mask of the same name")
        _assign(records, role, root, len(roots) == 1, parts, sources, counts)
    loaded = {}
    for role, records in parts.items():
        loaded[role] = []
        for r in records:
            px, mask = _read_image(r["path"], bad, counts), _load_mask(r["mask"], counts, bad)
            if px is None or mask is None:
                continue
            if mask.shape != px.shape[:2]:
                counts["mask_size_mismatch"] += 1
                continue
            loaded[role].append({"pixels": px, "mask": mask, "path": str(r["path"])})
    return loaded, sources


def _classes_file(path: Path) -> list[str] | None:
    for folder in (path, _split_roots(path)["train"]):
        f = folder / "classes.txt"
        if f.is_file():
            names = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
            if names:
                return names
    return None


# --------------------------------------------------------------------------- dataset


def _digest(px: np.ndarray) -> str:
    return hashlib.sha1(px.tobytes()).hexdigest()


def _detection_labels(path: Path, parts: dict, cfg, counts: Counter):
    """The box classes of training, and each record's target in their indices."""
    labels = sorted({n for r in parts["train"] for n in r["names"]})
    if not labels:
        raise DataError(f"'{path}': no training image has a box")
    index = {n: i for i, n in enumerate(labels)}
    for role in ("val", "test"):
        unknown = sum(n not in index for r in parts[role] for n in r["names"])
        counts[f"unknown_{role}_labels"] += unknown

    def target(r) -> dict:
        keep = [n in index for n in r["names"]]
        return {
            "boxes": r["boxes"][np.asarray(keep, bool)] if keep else r["boxes"],
            "labels": np.asarray([index[n] for n in r["names"] if n in index], np.int64),
        }

    return labels, target, Counter(n for r in parts["train"] for n in r["names"])


def _segmentation_labels(path: Path, parts: dict, cfg, counts: Counter):
    """The classes (a classes file, else class_0..class_K), and each record's mask with void
    pixels (the ignore index, or out of range) set to IGNORE."""
    labels = _classes_file(path)
    top = max(int(r["mask"][r["mask"] != cfg.ignore_index].max(initial=0)) for r in parts["train"])
    if labels is None:
        labels = [f"class_{i}" for i in range(top + 1)]

    def target(r) -> dict:
        m = r["mask"]
        void = (m == cfg.ignore_index) | (m >= len(labels)) | (m < 0)
        counts["void_pixels"] += int(void.sum())
        return {"mask": np.where(void, IGNORE, m).astype(np.uint8)}

    return labels, target, Counter()


def _pixel_tally(targets: list[dict], labels: list[str], per_class: Counter) -> None:
    for t in targets:
        m = t["mask"]
        for c, n in zip(*np.unique(m[m != IGNORE], return_counts=True), strict=True):
            per_class[labels[int(c)]] += int(n)


@dataclass(frozen=True)
class _Kind:
    parts: Callable  # (path, counts, undecodable) → (records per split, sources)
    labels: Callable  # (path, parts, cfg, counts) → (labels, record → target, per-class counts)
    counted: str  # what train_per_class counts
    tally: Callable | None = None  # (training targets, labels, per-class counts): adds to them


KINDS = {
    DETECTION: _Kind(_detection_parts, _detection_labels, "boxes"),
    SEGMENTATION: _Kind(_segmentation_parts, _segmentation_labels, "pixels", _pixel_tally),
}


def _dedupe_train(parts: dict, counts: Counter) -> None:
    seen, kept = set(), []
    for r in parts["train"]:
        d = _digest(r["pixels"])
        if d in seen:
            counts["duplicates"] += 1
            continue
        seen.add(d)
        kept.append(r)
    parts["train"] = kept


def load(path: Path, cfg, image_prep=None) -> Dataset:
    """The Dataset of a detection or segmentation folder: inputs are the decoded images
    (uint8 HWC, original size), targets their boxes ({"boxes" [n, 4] x1 y1 x2 y2 in pixels,
    "labels" [n]}) or masks ({"mask": [H, W] class indices, IGNORE for void})."""
    task = detect(path)
    kind = KINDS[task]
    counts: Counter = Counter()
    bad: list[str] = []
    parts, sources = kind.parts(path, counts, bad)
    if "train" not in parts or not parts["train"]:
        raise DataError(f"'{path}' leaves no training images after cleaning")
    _dedupe_train(parts, counts)
    parts = three_way(parts, cfg, str(path), key=lambda r: _digest(r["pixels"]), counts=counts)
    labels, target, per_class = kind.labels(path, parts, cfg, counts)
    split = {}
    for role in ROLES:
        targets = [target(r) for r in parts[role]]
        if kind.tally is not None and role == "train":
            kind.tally(targets, labels, per_class)
        split[role] = Split(
            [r["pixels"] for r in parts[role]], np.zeros(len(parts[role]), np.int64), targets
        )
        if not parts[role]:
            raise DataError(f"'{path}' leaves no {role} images after cleaning")
    ds = Dataset(task, labels, split["train"], split["val"], split["test"])
    ds.summary = {
        "path": str(path),
        "layout": task,
        "files": {k: str(v) for k, v in sources.items()},
        **split_summary(sources, ds, None),
        "train_per_class": {k: int(per_class.get(k, 0)) for k in labels},
        "counted": kind.counted,
        "cleaning": {**{k: int(v) for k, v in sorted(counts.items())}, "undecodable_files": bad},
    }
    return ds
