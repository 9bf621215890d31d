"""Ray Serve: `@serve.batch` in a deployment of PEER_WORKERS replicas."""

import os
import time

import ray
from common import PeerModel
from ray import serve
from starlette.requests import Request

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "32"))
WAIT_S = float(os.environ.get("PEER_BATCH_WAIT_S", "0.01"))


@serve.deployment(
    num_replicas=int(os.environ.get("PEER_WORKERS", "2")),
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
)
class Peer:
    def __init__(self) -> None:
        self.model = PeerModel()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
    async def batched(self, inputs: list[str]) -> list[str]:
        return self.model.predict(inputs)

    async def __call__(self, request: Request) -> dict:
        return {"label": await self.batched((await request.json())["input"])}


if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PEER_PORT"])})
    serve.run(Peer.bind(), route_prefix="/predict")
    while True:
        time.sleep(3600)
