"""Test fixture: initialize() fails like a model whose weights are missing; Triton reports a load error."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights file missing: /nonexistent/weights.bin")

    def execute(self, requests):  # never called
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", x)]))
        return responses
