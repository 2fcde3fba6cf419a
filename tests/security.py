"""Shared pieces of the security tests: callers and their tokens, a secured server, a PKI."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio

from service.api.auth import Authenticator, Security
from service.api.limits import ServiceLimits
from service.api.server import build_server
from service.app import Runtime
from service.domain.callers import Callers
from taskgate.v1 import task_service_pb2 as pb
from taskgate.v1 import task_service_pb2_grpc as pb_grpc
from tests.helpers import args

TOKENS = {
    name: secrets.token_urlsafe(24)
    for name in ("billing", "billing-new", "reader", "other", "slow", "batcher")
}
MTLS_CN = "mtls-client.internal"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


AUTH_FILE = f"""
[callers.billing]
token_sha256 = ["{sha(TOKENS["billing"])}", "{sha(TOKENS["billing-new"])}"]
tasks = ["demo.add", "demo.f*"]

[callers.reader]
token_sha256 = "{sha(TOKENS["reader"])}"
read_all = true

[callers.other]
token_sha256 = "{sha(TOKENS["other"])}"
tasks = ["demo.*"]

[callers.slow]
token_sha256 = "{sha(TOKENS["slow"])}"
tasks = ["demo.add"]
rate = 0.2

[callers.batcher]
token_sha256 = "{sha(TOKENS["batcher"])}"
tasks = ["demo.add"]
rate = 0.2

[callers.mtls]
tls_cn = "{MTLS_CN}"
tasks = ["demo.add"]
"""


def bearer(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


def add(x: int = 1, y: int = 2, request_id: str = "") -> pb.EnqueueRequest:
    return pb.EnqueueRequest(task_name="demo.add", args=args(x, y), request_id=request_id)


def held_task() -> pb.EnqueueAtRequest:
    """A task due in an hour: it stays in the database, so its stream stays open."""
    run_time = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    request = pb.EnqueueAtRequest(task_name="demo.add", args=args(1, 2))
    request.run_time.FromDatetime(run_time)
    return request


def write_auth_file(folder: Path) -> Path:
    """The callers above, as a TOML file in ``folder``."""
    path = folder / "callers.toml"
    path.write_text(AUTH_FILE)
    return path


@contextlib.asynccontextmanager
async def serving(
    runtime: Runtime, security: Security, limits: ServiceLimits | None = None
) -> AsyncIterator[int]:
    server, port = build_server(
        runtime.gateway, runtime.health, "127.0.0.1:0", security=security, limits=limits
    )
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def secured_stub(
    runtime: Runtime, auth_file: Path, limits: ServiceLimits | None = None
) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    security = Security(Authenticator(Callers.load(auth_file)))
    async with serving(runtime, security, limits) as port, aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield pb_grpc.TaskServiceStub(ch)


async def refused(call: object) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def count_tasks(runtime: Runtime, caller: str) -> int:
    async with runtime.store.engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM tasks WHERE caller = :caller")
        return int((await conn.execute(query, {"caller": caller})).scalar_one())


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Issued:
    cert: bytes
    key: bytes


def _issue(
    subject: str, issuer: str, issuer_key: ec.EllipticCurvePrivateKey | None, *, ca: bool = False
) -> tuple[Issued, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(subject))
        .issuer_name(_subject(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca and subject == "taskgate-server":
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), pem_key), key


@dataclass
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # CN of a declared caller, signed by another CA
    unknown: Issued  # signed by our CA, CN of nobody


def make_pki() -> Pki:
    """A CA with a server certificate (localhost, 127.0.0.1) and three client certificates."""
    ca, ca_key = _issue("taskgate-test-ca", "taskgate-test-ca", None, ca=True)
    _, rogue_key = _issue("rogue-ca", "rogue-ca", None, ca=True)
    return Pki(
        ca=ca,
        server=_issue("taskgate-server", "taskgate-test-ca", ca_key)[0],
        client=_issue(MTLS_CN, "taskgate-test-ca", ca_key)[0],
        stranger=_issue(MTLS_CN, "rogue-ca", rogue_key)[0],
        unknown=_issue("nobody.internal", "taskgate-test-ca", ca_key)[0],
    )
