"""A subset of the contracts on uvloop (asyncio with libuv's loop)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.runtime.test_channel import (
    test_cancel_during_receive_buffered,
    test_random_cancellations_keep_every_item_exactly_once,
)
from tests.runtime.test_semantics import (
    test_admission_waits_or_refuses,
    test_backpressure_bounds_items_inside_with_a_slow_consumer,
    test_cancelling_the_caller_cancels_the_request,
    test_deadline_cancels_the_request_everywhere,
    test_deadline_racing_the_result_gives_one_agreed_outcome,
    test_drain_lets_in_flight_requests_finish,
    test_exactly_one_outcome_under_faults_and_random_cancellations,
    test_leaving_a_stream_early_cancels_its_generator,
    test_replicas_keep_order_when_ordered,
)
from tests.test_engine import test_map_ordered_over_sync_and_async_iterables

pytest.importorskip("uvloop")
pytestmark = pytest.mark.anyio

__all__ = [
    "test_admission_waits_or_refuses",
    "test_backpressure_bounds_items_inside_with_a_slow_consumer",
    "test_cancel_during_receive_buffered",
    "test_cancelling_the_caller_cancels_the_request",
    "test_deadline_cancels_the_request_everywhere",
    "test_deadline_racing_the_result_gives_one_agreed_outcome",
    "test_drain_lets_in_flight_requests_finish",
    "test_exactly_one_outcome_under_faults_and_random_cancellations",
    "test_leaving_a_stream_early_cancels_its_generator",
    "test_map_ordered_over_sync_and_async_iterables",
    "test_random_cancellations_keep_every_item_exactly_once",
    "test_replicas_keep_order_when_ordered",
]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"loop_factory": _uvloop_factory()})


def _uvloop_factory() -> Any:
    import uvloop

    return uvloop.new_event_loop


def test_the_loop_really_is_uvloop() -> None:
    import anyio
    import uvloop

    async def which() -> str:
        import asyncio

        return type(asyncio.get_running_loop()).__module__

    module = anyio.run(
        which, backend="asyncio", backend_options={"loop_factory": _uvloop_factory()}
    )
    assert module.startswith("uvloop"), module
    assert uvloop.__version__
