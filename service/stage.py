"""Stage one model-store version for the image: `python -m service.stage digits:v1 build/models`.

Copies the version into DEST/<name>/<version>/ (the BentoML store's layout, which the
Dockerfile copies into the image's store) and prints the resolved tag (`latest` resolved).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def stage(tag: str, dest: Path) -> str:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except (NotFound, ValueError) as e:
        raise SystemExit(f"error: {tag!r} is not in the BentoML model store ({e})") from None
    name, version = model.tag.name, model.tag.version
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model.path, dest / name / version)
    (dest / name / "latest").write_text(version)
    return f"{name}:{version}"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m service.stage NAME[:VERSION] DEST")
    print(stage(sys.argv[1], Path(sys.argv[2])))
