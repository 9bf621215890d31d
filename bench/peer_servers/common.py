"""The model every peer serves, identical for all of them: the artifact's ONNX file in ONNX
Runtime (one intra-op thread per process, as tuneserve's workers), inputs decoded and
pre-processed by tuneserve's own task contract (`tasks/`, torch-free), so that only the
serving system differs.

PEER_MODE=users pads each batch to its longest text (what users write); PEER_MODE=bucketed
runs it through the contract's length buckets, as tuneserve does. Images have one size:
the two modes are the same. Tasks beyond classification run the contract's own batch path
and answer the `answer_key` of each answer (the same reduction of tuneserve's answers is
what they are checked against); their JSON inputs (table rows, questions) arrive as JSON
text, since every peer's request carries strings.
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
        self.json_inputs = isinstance(self.contract.example_input, dict)  # tables, questions

    def run(self, feeds: dict) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def predict(self, values: list) -> list[str]:
        """Answer keys of a batch of request values (texts, base64 images or clips, JSON)."""
        if self.json_inputs:
            values = [json.loads(v) for v in values]
        items = [self.contract.decode(v) for v in values]
        if self.contract.metric != "accuracy":  # not classification: the contract's batch path
            outputs, _ = self.contract.run(self.run, items)
            return [
                answer_key(self.contract.postprocess(outputs[i], {})) for i in range(len(items))
            ]
        if self.mode == "bucketed":
            logits, _ = self.contract.run(self.run, items)
        else:
            logits = self.run(self.contract.feeds(items))[0]
        return [answer_key({"label": self.labels[i]}) for i in np.asarray(logits).argmax(1)]


# Floats (scores, boxes, class shares) and pictures (masks, drawings) move in their last digits
# with the batch an input ran in; labels, offsets and texts must not.
UNCOMPARED = ("score", "box", "mask", "image", "class_shares", "top_k")


def answer_key(answer: dict) -> str:
    """What must agree between tuneserve's answer to one input and a peer's."""

    def keep(x):
        if isinstance(x, dict):
            return {
                k: keep(v) for k, v in x.items() if k not in UNCOMPARED and not isinstance(v, float)
            }
        if isinstance(x, list):
            return [keep(v) for v in x]
        return x

    return json.dumps(keep(answer), sort_keys=True)
