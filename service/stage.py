"""Stage one model-store version for the image: `python -m service.stage digits:v1 build/models`.

Copies the version into DEST/<name>/<version>/ (the BentoML store's layout, which the
Dockerfile copies into the image's store) and prints the resolved tag (`latest` resolved).
DEST is emptied first only when it is absent, empty or an earlier stage's (its MARKER file):
any other folder given is refused, never deleted.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

MARKER = ".tuneserve-stage"


def stage(tag: str, dest: Path) -> str:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except (NotFound, ValueError) as e:
        raise SystemExit(f"error: {tag!r} is not in the BentoML model store ({e})") from None
    name, version = model.tag.name, model.tag.version
    if dest.exists() and not (dest / MARKER).is_file() and any(dest.iterdir()):
        raise SystemExit(
            f"error: '{dest}' holds files this command did not stage (no {MARKER}); "
            "refusing to empty it: give a new or empty folder"
        )
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    (dest / MARKER).write_text("staged by python -m service.stage; emptied by the next stage\n")
    shutil.copytree(model.path, dest / name / version)
    (dest / name / "latest").write_text(version)
    return f"{name}:{version}"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m service.stage NAME[:VERSION] DEST")
    print(stage(sys.argv[1], Path(sys.argv[2])))
