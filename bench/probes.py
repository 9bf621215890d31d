"""Hostile probe sets per task for bench/hostile.py (`--artifacts`): bodies that must get a 4xx
with a JSON error, and the heaviest legal request of each task (what `/livez` must stay fast
under). Bodies are raw bytes: several are JSON that `json.dumps` cannot write (a lone
surrogate escape, 400-digit integers, Infinity, deep nesting).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

MAX_BODY = 20 * 1024 * 1024  # the service's default TUNESERVE_MAX_BODY_BYTES
NESTED = b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"  # 100 KB


def body(inputs, **params) -> bytes:
    return json.dumps({"inputs": inputs, **params}).encode()


def with_raw(template: dict, key: str, raw: str) -> bytes:
    """`template` as JSON with `"<key>": <raw>` inside its first input spliced in as is."""
    text = json.dumps(template)
    return text.replace(f'"{key}": "RAW"', f'"{key}": {raw}').encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg(megapixels: float, seed: int = 0, quality: int = 80) -> bytes:
    """A smooth photo-like JPEG (gradients and mild noise): a 24-MP one is about 1-2 MB."""
    from PIL import Image

    h = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    w = int(h * 4 / 3)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def flac_bomb(seconds: float = 5.9, rate: int = 655_350, channels: int = 8) -> bytes:
    """Silence at 655 kHz x 8 channels: about 32 KB of FLAC, 124 MB of samples decoded."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(rate * seconds), channels), np.int16), rate, format="FLAC")
    return buf.getvalue()


def wav(seconds: float, rate: int = 16_000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def fit_body(item: str, per_request: int = 64) -> int:
    """How many copies of a base64 `item` fit in one request body."""
    return max(1, min(per_request, (MAX_BODY - 1024) // (len(item) + 4)))


def common() -> list[tuple[str, bytes]]:
    """Bodies no task takes: each must be a 4xx."""
    return [
        ("nested 50,000 deep", NESTED),
        ("lone surrogate", b'{"inputs": ["\\ud800"]}'),
        ("400-digit integer", b'{"inputs": [' + b"9" * 400 + b"]}"),
        ("1e400", b'{"inputs": [1e400]}'),
        ("Infinity", b'{"inputs": [Infinity]}'),
        ("NaN", b'{"inputs": [NaN]}'),
        ("no inputs", b'{"inputs": []}'),
        ("65 inputs", body(["x"] * 65)),
        ("inputs not a list", b'{"inputs": "x"}'),
        ("top_k a string", body(["x"], top_k="2")),
        ("top_k a float", body(["x"], top_k=2.0)),
        ("render a string", body(["x"], render="yes")),
        ("min_score a string", body(["x"], min_score="high")),
        ("unknown field", body(["x"], colour="red")),
        ("not JSON", b"{not json"),
        ("not UTF-8", b'{"inputs": ["\xff\xfe"]}'),
    ]


def text_probes() -> list[tuple[str, bytes]]:
    return [
        ("20,001 characters", body(["a " * 10_000 + "b"])),
        ("surrogate inside a text", b'{"inputs": ["ok \\udfff then"]}'),
        ("a number", body([12])),
        ("an object", body([{"text": "x"}])),
        ("empty", body([" "])),
    ]


def qa_probes() -> list[tuple[str, bytes]]:
    context = "Alice lives in Rome and works for a bank. " * 10
    return [
        ("question too long for the windows", body([{"question": "why " * 400, "context": "c"}])),
        ("surrogate in the question", b'{"inputs": [{"question": "\\ud800?", "context": "c"}]}'),
        ("context of 20,001 characters", body([{"question": "q", "context": "x" * 20_001}])),
        ("no context", body([{"question": "q"}])),
        ("context a number", body([{"question": "q", "context": 3}])),
        ("extra field", body([{"question": "q", "context": context, "id": 1}])),
        ("a bare text", body(["who?"])),
    ]


def image_probes(dense: bool) -> list[tuple[str, bytes]]:
    from hostile import bomb_png

    probes = [
        ("decompression bomb (400 MP PNG)", body([b64(bomb_png())])),
        ("truncated PNG", body([b64(b"\x89PNG\r\n\x1a\n truncated")])),
        ("not base64", body(["%%%"])),
        ("base64 of text", body([b64(b"not an image")])),
        ("a number", body([7])),
    ]
    if dense:
        small = b64(jpeg(0.1))
        probes += [
            ("render 'yes'", body([small], render="yes")),
            ("render 1", body([small], render=1)),
            ("min_score 2", body([small], min_score=2)),
        ]
    return probes


def table_probes(columns: list[dict]) -> list[tuple[str, bytes]]:
    numeric = next((c["name"] for c in columns if c["kind"] == "numeric"), None)
    row = {c["name"]: (1.0 if c["kind"] == "numeric" else "x") for c in columns}
    probes = [
        ("missing columns", body([{}])),
        ("unknown column", body([{**row, "zz_unknown": 1}])),
        ("a list row", body([[1, 2, 3]])),
        ("nested value", body([{**row, columns[0]["name"]: {"a": [1]}}])),
    ]
    if numeric is not None:
        for name, raw in (("400 digits", "9" * 400), ("1e400", "1e400"), ("Infinity", "Infinity")):
            probes.append(
                (
                    f"{numeric} = {name}",
                    with_raw({"inputs": [{**row, numeric: "RAW"}]}, numeric, raw),
                )
            )
        probes.append((f"{numeric} = 'lots'", body([{**row, numeric: "lots"}])))
    return probes


def audio_probes() -> list[tuple[str, bytes]]:
    bomb = b64(flac_bomb())
    return [
        ("FLAC of 655 kHz x 8 channels (124 MB decoded)", body([bomb])),
        ("64 such FLACs", body([bomb] * 64)),
        ("61 s of audio", body([b64(wav(61.0))])),
        ("not audio", body([b64(b"RIFF, not a wave")])),
        ("empty", body([""])),
        ("a number", body([3])),
    ]


def task_probes(card: dict) -> list[tuple[str, bytes]]:
    """The hostile bodies for the artifact's task (common ones first)."""
    task = card["task"]
    if task in ("text-classification", "token-classification"):
        extra = text_probes()
    elif task == "question-answering":
        extra = qa_probes()
    elif task in ("image-classification", "object-detection", "semantic-segmentation"):
        extra = image_probes(dense=task != "image-classification")
    elif task == "tabular-classification":
        extra = table_probes(card["preprocessing"]["features"])
    elif task == "audio-classification":
        extra = audio_probes()
    else:
        raise ValueError(f"no probe set for task {task!r}")
    return common() + extra


def heaviest(card: dict) -> tuple[str, bytes]:
    """The heaviest legal request of the task under the default limits."""
    task = card["task"]
    long_text = ("The quick brown fox jumps over the lazy dog near Paris. " * 400)[:19_990]
    if task in ("text-classification", "token-classification"):
        return "64 texts of 19,990 characters", body([long_text] * 64)
    if task == "question-answering":
        pair = {"question": "Where does the fox jump?", "context": long_text}
        return "64 contexts of 19,990 characters", body([pair] * 64)
    if task in ("image-classification", "object-detection", "semantic-segmentation"):
        photo = b64(jpeg(24.0))
        n = min(8, fit_body(photo))
        params = {} if task == "image-classification" else {"render": True}
        return f"{n} JPEGs of 24 MP" + (" with render" if params else ""), body(
            [photo] * n, **params
        )
    if task == "tabular-classification":
        row = {
            c["name"]: (1.5 if c["kind"] == "numeric" else (c["categories"] or ["x"])[0])
            for c in card["preprocessing"]["features"]
        }
        return "64 rows", body([row] * 64)
    if task == "audio-classification":
        clip = b64(wav(60.0))
        n = fit_body(clip)
        return f"{n} clips of 60 s", body([clip] * n)
    raise ValueError(f"no heaviest request for task {task!r}")
