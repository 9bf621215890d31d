"""The model every peer serves, identical for all of them: the artifact's ONNX file in ONNX
Runtime (one intra-op thread per process, as tuneserve's workers), inputs decoded and
pre-processed by tuneserve's own task contract (`tasks/`, torch-free), so that only the
serving system differs.

PEER_MODE=users pads each batch to its longest text (what users write); PEER_MODE=bucketed
runs it through the contract's length buckets, as tuneserve does. Images have one size:
the two modes are the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class PeerModel:
    def __init__(self, artifact: str | None = None, mode: str | None = None):
        import onnxruntime as ort

        import tasks

        folder = Path(artifact or os.environ["PEER_ARTIFACT"])
        self.mode = mode or os.environ.get("PEER_MODE", "users")
        card = json.loads((folder / "card.json").read_text())
        tokenizer = None
        if tasks.uses_tokenizer(card["task"]):
            tokenizer = tasks.load_tokenizer(folder / "tokenizer", card)
        self.contract = tasks.create(card, tokenizer)
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        self.labels = list(card["labels"])

    def run(self, feeds: dict) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def predict(self, values: list) -> list[str]:
        """Labels of a batch of request values (texts, or base64 / raw image bytes)."""
        items = [self.contract.decode(v) for v in values]
        if self.mode == "bucketed":
            logits, _ = self.contract.run(self.run, items)
        else:
            logits = self.run(self.contract.feeds(items))[0]
        return [self.labels[i] for i in np.asarray(logits).argmax(1)]
