"""Registration in the BentoML model store as `<name>:<version>` (so `bentoml build` packs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from export.errors import VersionExists


def tag_exists(tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(tag)
    except NotFound:
        return False
    return True


def stored_versions(name: str) -> list[str]:
    """Versions of `name` already in the model store (a fresh clone may share the store)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return [str(m.tag.version) for m in bentoml.models.list(name)]
    except NotFound:  # no model of that name yet
        return []


def register(folder: Path, name: str, version: str, card: dict) -> str:
    import bentoml

    tag = f"{name}:{version}"
    if tag_exists(tag):
        raise VersionExists(f"model store already holds '{tag}'; versions are never overwritten")
    labels = {"task": card["task"], "format": "onnx", "tuneserve": "artifact"}
    metadata = {
        "labels": card["labels"],
        "card_schema_version": card["schema_version"],
        "model_sha256": card["files"]["model"]["sha256"],
        "variants": [v["precision"] for v in card["variants"]],
    }
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        shutil.copytree(folder, model.path, dirs_exist_ok=True)
    return tag
