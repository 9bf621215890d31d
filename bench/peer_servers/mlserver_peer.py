"""MLServer: a custom runtime with adaptive batching (max_batch_size, max_batch_time)."""

from common import PeerModel
from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceRequest, InferenceResponse


class PeerRuntime(MLModel):
    async def load(self) -> bool:
        self.model = PeerModel()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        values = StringCodec.decode_input(payload.inputs[0])
        labels = self.model.predict(values)
        return InferenceResponse(
            model_name=self.name, outputs=[StringCodec.encode_output("label", labels)]
        )
