"""Triton Inference Server through PyTriton: its dynamic batcher, PEER_WORKERS model instances."""

import os

import numpy as np
from common import PeerModel
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

model = PeerModel()


@batch
def infer(input):
    values = [v[0].decode() if isinstance(v[0], bytes) else v[0] for v in input]
    labels = model.predict(values)
    return {"label": np.array([[x.encode()] for x in labels], dtype=np.object_)}


if __name__ == "__main__":
    port = int(os.environ["PEER_PORT"])
    config = TritonConfig(http_port=port, grpc_port=port + 1, metrics_port=port + 2)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="peer",
            infer_func=[infer] * int(os.environ.get("PEER_WORKERS", "2")),
            inputs=[Tensor(name="input", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="label", dtype=bytes, shape=(1,))],
            config=ModelConfig(
                max_batch_size=int(os.environ.get("PEER_MAX_BATCH", "32")),
                batcher=DynamicBatcher(
                    max_queue_delay_microseconds=int(
                        1e6 * float(os.environ.get("PEER_BATCH_WAIT_S", "0.01"))
                    )
                ),
            ),
            strict=False,
        )
        triton.serve()
