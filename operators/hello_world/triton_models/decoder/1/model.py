"""hello_world decoder as a Triton Python-backend model: invert the input, then keep one copy.

The math repeats operators/hello_world/math.py because Triton runs this file in its own Python
(one with numpy < 2), where pipeline_runner is not installed.
"""

import contextlib
import json
import math
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def invert(array):
    """Bitwise NOT for integers and bools, negation for floats: an exact involution for each."""
    return np.negative(array) if array.dtype.kind == "f" else np.invert(array)


def transform(array, copies):
    if array.shape[-1] % copies:
        raise ValueError(f"last dimension {array.shape[-1]} is not a multiple of input_copies={copies}")
    return invert(array[..., : array.shape[-1] // copies])


def parameter(merged, name, kind):
    """``merged[name]`` as ``kind`` (int: >= 1, float: >= 0), or a ValueError naming the parameter.

    config.pbtxt values are always strings; request values are whatever JSON type the client sent,
    so both strings and numbers are accepted (bools are not: JSON true would pass as int 1).
    """
    value = merged[name]
    allowed = (int, str) if kind is int else (int, float, str)
    number = None
    if isinstance(value, allowed) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = kind(value)  # int("2.5") raises, so an integer really is one
    if number is None or not (math.isfinite(number) and number >= (1 if kind is int else 0)):
        wanted = "an integer >= 1" if kind is int else "a number >= 0"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return number


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.defaults = {"input_copies": "3", "delay": "0"}
        self.defaults.update({key: value["string_value"] for key, value in config.get("parameters", {}).items()})

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                # request.parameters() is the request's parameters as a JSON object string;
                # they win over config.pbtxt's.
                merged = {**self.defaults, **json.loads(request.parameters() or "{}")}
                copies = parameter(merged, "input_copies", int)
                delay = parameter(merged, "delay", float)
                array = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
                if delay:
                    time.sleep(delay)  # simulated compute; blocks this instance like real work would
                output = pb_utils.Tensor("output", transform(array, copies))
                responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
            except ValueError as problem:
                # One bad request gets an error response; the others in the batch still succeed.
                error = pb_utils.TritonError(str(problem), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses
