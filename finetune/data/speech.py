"""Transcribed speech (speech recognition): the LibriSpeech layout and the Hugging Face
audiofolder convention.

- LibriSpeech: `<speaker>/<chapter>/<speaker>-<chapter>-<utt>.{flac,mp3,wav}` with
  `<speaker>-<chapter>.trans.txt` (`ID TRANSCRIPT` per line) beside the clips, anywhere
  under the path; the speaker is the first part of the id.
- audiofolder: `metadata.csv` with `file_name` and `transcription` columns (and `speaker_id`
  where known), optionally in `train/`, `validation/` (or `val/`) and `test/` folders.

Cleaning, counted: undecodable clips (listed), empty transcripts, exact duplicate clips,
and clips over the model's window (not trained on: teacher forcing reads one window; kept
in test, which is transcribed whole like a served clip). Splits are carved by speaker where
speakers are known (a speaker in two splits leaks their voice), as the other tasks carve.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import math
from collections import Counter
from pathlib import Path

import numpy as np

from finetune.data.dataset import MAX_LISTED_FILES, Dataset, Split
from finetune.data.splits import ROLES, three_way
from finetune.errors import DataError
from tasks.audio import AUDIO_EXTS, SAMPLE_RATE, read_audio
from tasks.errors import InputError

TASK = "speech-recognition"
FOLDERS = {"train": ("train",), "val": ("validation", "val", "dev"), "test": ("test",)}
WINDOW_SECONDS = 30.0  # Whisper's window: longer clips are not trained on


def detect(path: Path) -> str | None:
    if path.is_dir() and (
        (path / "metadata.csv").is_file()
        and _has_transcription(path / "metadata.csv")
        or any((path / f / "metadata.csv").is_file() for names in FOLDERS.values() for f in names)
        or next(path.rglob("*.trans.txt"), None) is not None
    ):
        return TASK
    return None


def _has_transcription(csv_path: Path) -> bool:
    with open(csv_path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return "transcription" in header and "file_name" in header


def _librispeech(root: Path) -> list[tuple[Path, str, str]]:
    """(clip, transcript, speaker) of every line of every `*.trans.txt` under `root`."""
    out = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            clip = next(
                (
                    trans.parent / f"{uid}{e}"
                    for e in AUDIO_EXTS
                    if (trans.parent / f"{uid}{e}").is_file()
                ),
                None,
            )
            out.append((clip or trans.parent / f"{uid}.missing", text, uid.split("-")[0]))
    return out


def _audiofolder(csv_path: Path) -> list[tuple[Path, str, str | None]]:
    out = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows, start=2):
        if not row.get("file_name"):
            raise DataError(f"'{csv_path}', line {i}: file_name is empty")
        speaker = row.get("speaker_id") or None
        out.append((csv_path.parent / row["file_name"], row.get("transcription") or "", speaker))
    return out


def _parts(path: Path) -> tuple[dict[str, list], str]:
    given = {}
    for role, names in FOLDERS.items():
        for name in names:
            if (path / name / "metadata.csv").is_file():
                given[role] = _audiofolder(path / name / "metadata.csv")
                break
    if given:
        if "train" not in given:
            raise DataError(f"'{path}': split folders hold no train/metadata.csv")
        return given, "audiofolder (split folders)"
    if (path / "metadata.csv").is_file():
        return {"train": _audiofolder(path / "metadata.csv")}, "audiofolder"
    return {"train": _librispeech(path)}, "LibriSpeech"


def _clean(parts: dict[str, list], counts: Counter) -> tuple[dict[str, list], list[str]]:
    """Decodable clips with a transcript, each clip once; (rows per role, undecodable files)."""
    undecodable: list[str] = []
    seen: set[str] = set()
    clean: dict[str, list] = {}
    for role, rows in parts.items():
        kept = []
        for clip, text, speaker in rows:
            text = " ".join(text.split())
            if not text:
                counts["empty_transcript"] += 1
                continue
            try:
                data = clip.read_bytes()
                wave = read_audio(data, math.inf)
            except (OSError, InputError):
                counts["undecodable"] += 1
                if len(undecodable) < MAX_LISTED_FILES:
                    undecodable.append(str(clip))
                continue
            key = hashlib.sha256(data).hexdigest()
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            kept.append(
                {
                    "audio": base64.b64encode(data).decode(),
                    "text": text,
                    "speaker": speaker,
                    "seconds": len(wave) / SAMPLE_RATE,
                    "key": key,
                }
            )
        clean[role] = kept
    return clean, undecodable


def load(path: Path, cfg, image_prep=None) -> Dataset:
    """The three splits; the model's window is `cfg.clip_seconds` (default 30 s: Whisper's),
    and longer clips are kept for test only."""
    window = float(cfg.clip_seconds or WINDOW_SECONDS)
    parts, layout = _parts(path)
    counts: Counter = Counter()
    clean, undecodable = _clean(parts, counts)
    if not clean.get("train"):
        raise DataError(f"'{path}' ({layout}) holds no clip with a transcript that decodes")
    speakers_known = all(r["speaker"] is not None for r in clean["train"])
    splits = three_way(
        clean,
        cfg,
        str(path),
        key=lambda r: r["key"],
        group=(lambda r: r["speaker"]) if speakers_known else None,
        counts=counts,
    )
    for role in ("train", "val"):
        before = len(splits[role])
        splits[role] = [r for r in splits[role] if r["seconds"] <= window]
        counts["over_window"] += before - len(splits[role])
    if not splits["val"]:
        raise DataError(f"'{path}': no validation clip is within the {window:g}-s window")

    def split(rows) -> Split:
        return Split(
            [r["audio"] for r in rows],
            np.zeros(len(rows), dtype=np.int64),
            [{"text": r["text"]} for r in rows],
        )

    ds = Dataset(TASK, [], split(splits["train"]), split(splits["val"]), split(splits["test"]))
    ds.summary = _summary(path, layout, parts, splits, speakers_known, counts, undecodable)
    return ds


def _summary(path, layout, parts, splits, speakers_known, counts, undecodable) -> dict:
    speakers = {role: sorted({r["speaker"] for r in splits[role]} - {None}) for role in ROLES}
    cleaning = ("undecodable", "empty_transcript", "duplicates", "over_window")
    cleaning += ("leaked_from_train", "test_in_train", "test_in_val")
    return {
        "path": str(path),
        "layout": layout,
        "pre_split": "val" in parts,
        "splits": {role: "given" if role in parts else "carved" for role in ROLES},
        **{f"{role}_size": len(splits[role]) for role in ROLES},
        **{f"{role}_seconds": round(sum(r["seconds"] for r in splits[role]), 1) for role in ROLES},
        "speakers": {role: len(s) for role, s in speakers.items()},
        "split_by": "speaker" if speakers_known else "clip",
        "train_per_class": {},
        "counted": "speakers",
        "cleaning": {**{k: counts[k] for k in cleaning}, "undecodable_files": undecodable},
    }
