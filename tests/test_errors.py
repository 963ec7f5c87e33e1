"""The exceptions a caller gets for an operator's error answer."""

from __future__ import annotations

import pytest

from pipeline_runner import OperatorError, OperatorTimeoutError, RequestTimeoutError
from pipeline_runner.errors import operator_error


def test_a_downstream_timeout_answer_is_caught_as_a_timeout_and_keeps_its_code() -> None:
    with pytest.raises(RequestTimeoutError) as caught:
        raise operator_error("encoder_decoder", "timeout", "the request's deadline passed while it was served")
    error = caught.value
    assert isinstance(error, OperatorTimeoutError) and isinstance(error, OperatorError)
    assert isinstance(error, TimeoutError)
    assert (error.operator, error.code) == ("encoder_decoder", "timeout")
    assert str(error) == "encoder_decoder: timeout: the request's deadline passed while it was served"


@pytest.mark.parametrize("code", ["bad_input", "operator_failed", "worker_lost", "overloaded"])
def test_other_error_answers_are_operator_errors_and_not_timeouts(code: str) -> None:
    error = operator_error("encoder", code, "why")
    assert isinstance(error, OperatorError)
    assert not isinstance(error, RequestTimeoutError)
    assert error.code == code
