"""mTLS: real handshakes with certificates from a test CA; the client certificate names the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from service.api.auth import security_from_settings
from service.app import Runtime
from service.config import Settings
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.security import Issued, Pki, add, bearer, make_pki, refused, serving, write_auth_file


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
async def mtls_port(
    runtime: Runtime, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[int]:
    folder = tmp_path_factory.mktemp("tls")
    auth_file = write_auth_file(folder)
    for name, data in (("cert.pem", pki.server.cert), ("key.pem", pki.server.key), ("ca.pem", pki.ca.cert)):
        (folder / name).write_bytes(data)
    settings = Settings(
        listen="127.0.0.1:0",
        auth_file=str(auth_file),
        tls_cert=str(folder / "cert.pem"),
        tls_key=str(folder / "key.pem"),
        tls_client_ca=str(folder / "ca.pem"),
    )
    async with serving(runtime, security_from_settings(settings)) as port:
        yield port


async def mtls_call(
    port: int,
    pki: Pki,
    client: Issued | None,
    host: str = "localhost",
    metadata: tuple[tuple[str, str], ...] = (),
) -> pb.EnqueueResponse:
    if client is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    else:
        credentials = grpc.ssl_channel_credentials(pki.ca.cert, client.key, client.cert)
    async with aio.secure_channel(f"{host}:{port}", credentials) as channel:
        return await pb_grpc.TaskServiceStub(channel).Enqueue(add(), metadata=metadata, timeout=10)


async def test_mtls_client_certificate_names_the_caller(mtls_port: int, pki: Pki, runtime: Runtime) -> None:
    for host in ("localhost", "127.0.0.1"):
        answer = await mtls_call(mtls_port, pki, pki.client, host)
        record = await runtime.store.get(answer.task_id)
        assert record is not None and record.caller == "mtls"
    # a declared token works over mTLS too, even from a certificate that names nobody
    answer = await mtls_call(mtls_port, pki, pki.unknown, metadata=bearer("billing"))
    assert answer.task_id


async def test_mtls_refuses_strangers(mtls_port: int, pki: Pki) -> None:
    for client in (pki.stranger, None):
        error = await refused(mtls_call(mtls_port, pki, client))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    error = await refused(mtls_call(mtls_port, pki, pki.unknown))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # a certificate and a token that name two different callers identify nobody
    error = await refused(mtls_call(mtls_port, pki, pki.client, metadata=bearer("billing")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
