"""Plain BentoML (the newest release): a batchable API, `bentoml serve bentoml_peer:Peer`."""

import os

import bentoml
from common import PeerModel

WORKERS = int(os.environ.get("PEER_WORKERS", "2"))
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "32"))


@bentoml.service(workers=WORKERS, traffic={"max_concurrency": 4096})
class Peer:
    def __init__(self) -> None:
        self.model = PeerModel()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=60_000)
    def predict(self, inputs: list[str]) -> list[str]:
        return self.model.predict(inputs)
