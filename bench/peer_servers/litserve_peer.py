"""LitServe: dynamic batching in the LitAPI, one worker process per `workers_per_device`."""

import os

import litserve as ls
from common import PeerModel


class PeerAPI(ls.LitAPI):
    def setup(self, device):
        self.model = PeerModel()

    def decode_request(self, request):
        return request["input"]

    def predict(self, inputs):
        return self.model.predict(list(inputs))

    def encode_response(self, output):
        return {"label": output}


if __name__ == "__main__":
    api = PeerAPI(
        max_batch_size=int(os.environ.get("PEER_MAX_BATCH", "32")),
        batch_timeout=float(os.environ.get("PEER_BATCH_WAIT_S", "0.01")),
    )
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=int(os.environ.get("PEER_WORKERS", "2"))
    )
    server.run(port=int(os.environ["PEER_PORT"]), host="127.0.0.1", generate_client_file=False)
