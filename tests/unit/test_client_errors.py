"""``_rpc_errors``: the client's one gRPC error boundary, for calls, generators and async generators."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from taskgate.errors import InvalidArgument, NotFound, TaskgateError, Unavailable
from taskgate.errors import rpc_errors as _rpc_errors


class StatusError(grpc.RpcError):
    """An RpcError that, like gRPC's own, is also a Call with a code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_call_error_becomes_its_taskgate_error() -> None:
    error = StatusError(grpc.StatusCode.NOT_FOUND, "task x not found")
    with pytest.raises(NotFound, match="task x not found") as caught, _rpc_errors():
        raise error
    assert caught.value.__cause__ is error
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_an_unlisted_code_is_a_plain_taskgate_error() -> None:
    with pytest.raises(TaskgateError) as caught, _rpc_errors():
        raise StatusError(grpc.StatusCode.ABORTED, "aborted")
    assert type(caught.value) is TaskgateError
    assert caught.value.code == grpc.StatusCode.ABORTED


def test_other_exceptions_pass_through() -> None:
    with pytest.raises(ValueError, match="mine"), _rpc_errors():
        raise ValueError("mine")


def test_a_generator_mid_stream_error_is_mapped_and_close_passes_through() -> None:
    def stream(fail: bool) -> Iterator[int]:
        with _rpc_errors():
            yield 1
            if fail:
                raise StatusError(grpc.StatusCode.UNAVAILABLE, "gone")
            yield 2

    failing = stream(fail=True)
    assert next(failing) == 1
    with pytest.raises(Unavailable, match="gone"):
        next(failing)
    closing = stream(fail=False)
    assert next(closing) == 1
    closing.close()


async def test_an_async_generator_mid_stream_error_is_mapped_and_aclose_passes_through() -> None:
    async def stream(fail: bool) -> AsyncIterator[int]:
        with _rpc_errors():
            yield 1
            if fail:
                raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "bad")
            yield 2

    failing = stream(fail=True)
    assert await anext(failing) == 1
    with pytest.raises(InvalidArgument, match="bad"):
        await anext(failing)
    closing = stream(fail=False)
    assert await anext(closing) == 1
    await closing.aclose()
