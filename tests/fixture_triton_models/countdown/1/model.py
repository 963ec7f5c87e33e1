"""Test fixture: a decoupled model that answers count=N with N responses, index = 0 .. N-1."""

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def execute(self, requests):
        # Decoupled: responses go through each request's sender; execute returns None.
        for request in requests:
            sender = request.get_response_sender()
            count = int(pb_utils.get_input_tensor_by_name(request, "count").as_numpy()[0])
            if count < 0:
                error = pb_utils.TritonError(f"count must be >= 0, got {count}", pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                continue
            for index in range(count):
                output = pb_utils.Tensor("index", np.array([index], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[output]))
            # The stream ends with a send of only the FINAL flag, no response; count=0 sends just this.
            sender.send(flags=FINAL)
