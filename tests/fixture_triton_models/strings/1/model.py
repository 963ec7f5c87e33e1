"""upper = text in upper case, twice = 2 * num, flag = num > 1."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            num = pb_utils.get_input_tensor_by_name(request, "num").as_numpy()
            upper = np.array([s.upper() for s in text.reshape(-1)], dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("upper", upper),
                pb_utils.Tensor("twice", (num * 2).astype(np.float16)),
                pb_utils.Tensor("flag", num > 1),
            ]))
        return responses
