"""The work queue reads a delivery's attempt and age from JetStream's ack subject, as nats-py would."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from pipeline_runner.work_queue import delivery_metadata

STORED_NS = 1764770000123456789


@pytest.mark.parametrize(
    "reply",
    [
        f"$JS.ACK.PR_d_encoder_v1.workers.3.120.118.{STORED_NS}.0",  # without a domain
        f"$JS.ACK.hub.ACCOUNTHASH.PR_d_encoder_v1.workers.3.120.118.{STORED_NS}.7.x1y2",  # with one
        f"$JS.ACK.hub.ACCOUNTHASH.PR_d_encoder_v1.workers.3.120.118.{STORED_NS}.7",  # no random token
    ],
)
def test_the_delivery_count_and_store_time_match_nats_py_metadata(reply: str) -> None:
    msg = Msg(None, subject="s", reply=reply, data=b"")  # type: ignore[arg-type]
    metadata = delivery_metadata(msg)
    assert metadata.delivered == msg.metadata.num_delivered == 3
    assert metadata.stored_ns == STORED_NS
    assert abs(metadata.stored_ns / 1e9 - msg.metadata.timestamp.timestamp()) < 1e-6


def test_a_subject_it_does_not_know_is_left_to_nats_py() -> None:
    msg = Msg(None, subject="s", reply="$JS.ACK.a.b.c", data=b"")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="[Nn]ot a JetStream message|NotJSMessage"):
        delivery_metadata(msg)
