"""TorchServe: a custom handler module; batching by the frontend (batch_size, max_batch_delay)."""

import json

from common import PeerModel

_model = None


def handle(data, context):
    global _model
    if _model is None:
        _model = PeerModel()
    if data is None:
        return None
    values = []
    for row in data:
        body = row.get("body") or row.get("data")
        if isinstance(body, bytes | bytearray):
            body = json.loads(body)
        values.append(body["input"])
    return [{"label": label} for label in _model.predict(values)]
