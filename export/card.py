"""The artifact contract, `artifacts/<name>/<version>/` (DESIGN.md §2). Standard library only:
the service imports this module to load an artifact without torch.

    model.onnx          fp32, single file, dynamic batch (and sequence) axes
    model.int8.onnx     optional, CPU variant      model.fp16.onnx   optional, GPU variant
    card.json           everything needed to serve: inputs, outputs, labels, preprocessing,
                        parity result, variants with sha256, reference file name
    reference.json      reference distributions for drift, measured on the holdout
    tokenizer/          text models
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from export.errors import CardError

SCHEMA_VERSION = 2  # 2: postprocessing, the task's outputs and metrics (DESIGN.md §0)
READS = (1, 2)  # version 1: image and text classification cards, served as before
FIRST_SCHEMA = {"image-classification": 1, "text-classification": 1}  # other tasks: 2
CARD = "card.json"
MODEL = "model.onnx"
REFERENCE = "reference.json"
TOKENIZER = "tokenizer"
VARIANT_FILES = {"fp32": MODEL, "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
REQUIRED = (
    "schema_version",
    "name",
    "version",
    "task",
    "labels",
    "inputs",
    "outputs",
    "preprocessing",
    "files",
    "variants",
    "parity",
    "reference",
)
# BentoML tag rule: lowercase letters, digits, '-', '_' and '.', starting and ending alphanumeric.
TAG_PART = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_card(folder: str | Path, card: dict) -> Path:
    path = Path(folder) / CARD
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def load_card(folder: str | Path) -> dict:
    """Read and validate card.json: schema version and required fields."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise CardError(f"artifact card '{path}' is missing")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CardError(f"artifact card '{path}' is not valid JSON: {e}") from e
    if not isinstance(card, dict):
        raise CardError(f"artifact card '{path}' must hold a JSON object")
    version = card.get("schema_version")
    if version not in READS:
        raise CardError(
            f"artifact card '{path}' has schema_version {version!r}; this tuneserve reads "
            f"schema_version {', '.join(map(str, READS))}: re-export the checkpoint"
        )
    if version < FIRST_SCHEMA.get(card.get("task"), 2):
        raise CardError(
            f"artifact card '{path}' has schema_version 1 with task {card.get('task')!r}, "
            f"which needs schema_version 2: re-export the checkpoint with this tuneserve"
        )
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise CardError(f"artifact card '{path}' lacks field(s): {', '.join(missing)}")
    return card


def support_files(folder: str | Path) -> list[dict]:
    """Every file of an artifact besides the models and the card (reference.json, tokenizer
    files) with its sha256: each changes predictions or their monitoring."""
    folder = Path(folder)
    return [
        {"file": p.relative_to(folder).as_posix(), "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CARD and p.suffix != ".onnx"
    ]


def verify_files(folder: str | Path, card: dict) -> None:
    """Every file the card lists (models, variants, support files) exists and has the sha256
    the card records."""
    folder = Path(folder)
    problems = []
    models = [
        card["files"]["model"],
        *([card["files"]["decoder"]] if "decoder" in card["files"] else []),
    ]
    decoders = [  # generative variants: their decoder graph beside the encoder
        {"file": v["decoder_file"], "sha256": v["decoder_sha256"]}
        for v in card["variants"]
        if "decoder_file" in v
    ]
    for entry in [*models, *card["variants"], *decoders, *card["files"].get("support", [])]:
        path = folder / entry["file"]
        if not path.is_file():
            problems.append(f"'{path}' is missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"'{path}' does not match the sha256 in {CARD}")
    if problems:
        raise CardError("artifact files do not match the card: " + "; ".join(problems))


def variant_file(card: dict, precision: str) -> str | None:
    """The file of a precision that passed validation, or None."""
    if precision == "fp32":
        return card["files"]["model"]["file"]
    return next((v["file"] for v in card["variants"] if v["precision"] == precision), None)


def decoder_file(card: dict, precision: str) -> str | None:
    """A generative artifact's decoder graph for a precision that passed validation."""
    if precision == "fp32":
        return card["files"]["decoder"]["file"]
    return next((v["decoder_file"] for v in card["variants"] if v["precision"] == precision), None)
