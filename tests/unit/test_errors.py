"""The error tree's mapping to gRPC statuses: service.api.status.status_for."""

from __future__ import annotations

import grpc
import pytest

from service.api import status
from service.domain import errors


@pytest.mark.parametrize(
    ("error_class", "code"),
    [
        (errors.TaskgateError, grpc.StatusCode.INTERNAL),
        (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnknownTask, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ArgumentsDoNotBind, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.TaskNotFound, grpc.StatusCode.NOT_FOUND),
        (errors.RequestIdConflict, grpc.StatusCode.ALREADY_EXISTS),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.DatabaseUnavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.BrokerUnavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_gateway_errors_keep_their_message(
    error_class: type[errors.TaskgateError], code: grpc.StatusCode
) -> None:
    assert status.status_for(error_class("what went wrong")) == (code, "what went wrong")


@pytest.mark.parametrize("exc", [RuntimeError("secret"), KeyError("secret"), ValueError("secret")])
def test_other_errors_are_internal_without_details(exc: Exception) -> None:
    code, message = status.status_for(exc)
    assert code is grpc.StatusCode.INTERNAL
    assert "secret" not in message
    assert message == status.INTERNAL_MESSAGE
