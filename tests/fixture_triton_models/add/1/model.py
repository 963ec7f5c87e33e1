"""Test fixture: sum = (a + b) * scale, with scale from config.pbtxt's parameters."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.scale = np.float32(parameters.get("scale", {}).get("string_value", "1"))

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "a").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "b").as_numpy()
            if a.shape != b.shape:
                message = f"a and b must have the same shape, got {a.shape} and {b.shape}"
                error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            output = ((a + b) * self.scale).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("sum", output)]))
        return responses
