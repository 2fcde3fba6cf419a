"""Callers, tokens, certificates and the start-up checks, without a server."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from service.api.auth import (
    Authenticator,
    StartupError,
    _bearer,
    is_loopback,
    security_from_settings,
    server_credentials,
)
from service.config import Settings
from service.domain.callers import OPEN, AuthFileError, Caller, Callers


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


GOOD = f"""
[callers.billing]
token_sha256 = ["{sha("old-token")}", "{sha("new-token")}"]
tasks = ["demo.add", "reports.*"]
rate = 50

[callers.ops]
token_sha256 = "{sha("ops-token")}"
read_all = true
tls_cn = "ops.internal"

[callers.robot]
tls_cn = "robot.internal"
tasks = ["*"]
"""


@pytest.fixture
def callers(tmp_path: Path) -> Callers:
    path = tmp_path / "callers.toml"
    path.write_text(GOOD)
    return Callers.load(path)


def test_load_reads_every_caller(callers: Callers) -> None:
    billing, ops, robot = list(callers)
    assert (billing.name, billing.tasks, billing.rate, billing.read_all) == (
        "billing",
        ("demo.add", "reports.*"),
        50.0,
        False,
    )
    assert len(billing.token_hashes) == 2 and "token" not in repr(billing).replace("token_hashes", "")
    assert ops.read_all and ops.tasks == () and ops.rate is None
    assert robot.token_hashes == () and robot.tls_cn == "robot.internal"
    assert callers.use_certificates


def test_tokens_rotate_and_wrong_ones_match_nobody(callers: Callers) -> None:
    billing, ops, _ = list(callers)
    assert callers.by_token("old-token") is callers.by_token("new-token") is billing
    assert callers.by_token("ops-token") is ops
    for wrong in ("", "old-token ", "OLD-TOKEN", sha("old-token")):
        assert callers.by_token(wrong) is None
    assert callers.by_common_name("robot.internal") is list(callers)[2]
    assert callers.by_common_name("nobody") is None


def test_patterns() -> None:
    caller = Caller("c", tasks=("demo.add", "reports.*"))
    assert caller.may_enqueue("demo.add") and caller.may_enqueue("reports.build")
    assert not caller.may_enqueue("demo.addx") and not caller.may_enqueue("Demo.add")
    assert not caller.may_enqueue("demo.sleep")
    assert caller.may_read("c") and not caller.may_read("other") and not caller.may_read("")
    assert OPEN.may_enqueue("anything") and OPEN.may_read("someone")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[callers.a\n", "not valid TOML"),
        ("", "declares no callers"),
        ("[other]\nx = 1\n", "unknown top-level keys"),
        ('[callers.a]\ntoken_sha256 = "my-token"\n', "token_sha256 must be a hex SHA-256"),
        (f'[callers.a]\ntoken_sha256 = ["{sha("x")}", 3]\n', "token_sha256"),
        ("[callers.a]\ntasks = []\n", "needs token_sha256 or tls_cn"),
        (f'[callers.a]\ntoken_sha256 = "{sha("x")}"\ntasks = "demo.*"\n', "tasks must be a list"),
        (f'[callers.a]\ntoken_sha256 = "{sha("x")}"\nrate = 0\n', "rate must be a positive"),
        (f'[callers.a]\ntoken_sha256 = "{sha("x")}"\nrate = true\n', "rate must be a positive"),
        (f'[callers.a]\ntoken_sha256 = "{sha("x")}"\nread_all = "yes"\n', "read_all must be"),
        (f'[callers.a]\ntoken_sha256 = "{sha("x")}"\ntask = ["demo.*"]\n', "unknown keys ['task']"),
        (f'[callers."a b"]\ntoken_sha256 = "{sha("x")}"\n', "caller name"),
        (
            f'[callers.a]\ntoken_sha256 = "{sha("x")}"\n[callers.b]\ntoken_sha256 = "{sha("x")}"\n',
            "share a token hash",
        ),
        ('[callers.a]\ntls_cn = "x"\n[callers.b]\ntls_cn = "x"\n', "share tls_cn"),
    ],
)
def test_malformed_files_name_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "callers.toml"
    path.write_text(text)
    with pytest.raises(AuthFileError) as caught:
        Callers.load(path)
    assert str(path) in str(caught.value) and problem in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="cannot be read"):
        Callers.load(tmp_path / "nope.toml")


def test_bearer_parsing() -> None:
    assert _bearer(None) is None and _bearer([("x-other", "v")]) is None
    assert _bearer([("authorization", "Bearer abc")]) == "abc"
    assert _bearer([("authorization", "bearer abc")]) == "abc"
    assert _bearer([("authorization", "Basic abc")]) == ""
    assert _bearer([("authorization", "Bearer a"), ("authorization", "Bearer b")]) == ""


def test_identify(callers: Callers) -> None:
    auth = Authenticator(callers, client_certificates=True)
    billing, ops, robot = list(callers)
    token = [("authorization", "Bearer new-token")]
    assert auth.identify(token, {}) is billing
    assert auth.identify([], {"x509_common_name": [b"robot.internal"]}) is robot
    assert auth.identify([], {}) is None
    assert (
        auth.identify([("authorization", "Bearer wrong")], {"x509_common_name": [b"robot.internal"]}) is None
    )
    # a token and a certificate naming two callers identify nobody; naming the same one is fine
    assert auth.identify(token, {"x509_common_name": [b"robot.internal"]}) is None
    ops_token = [("authorization", "Bearer ops-token")]
    assert auth.identify(ops_token, {"x509_common_name": [b"ops.internal"]}) is ops
    assert Authenticator.open().identify([], {}) is OPEN
    assert auth.uses_certificates and not Authenticator(callers).uses_certificates


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("127.0.0.2:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.1.2.3:1", False),
        ("example.com:1", False),
        (":50051", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_open_mode_needs_loopback_or_allow_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(StartupError, match="TASKGATE_ALLOW_INSECURE=1"):
        security_from_settings(Settings(listen="0.0.0.0:50051"))
    with caplog.at_level(logging.WARNING, logger="service.api.auth"):
        assert security_from_settings(Settings(listen="127.0.0.1:0")).authenticator.is_open
    assert "OPEN MODE" in caplog.text


def test_auth_file_errors_become_startup_errors(tmp_path: Path) -> None:
    path = tmp_path / "callers.toml"
    path.write_text("[callers.a]\ntasks = []\n")
    with pytest.raises(StartupError, match=str(path)):
        security_from_settings(Settings(listen="0.0.0.0:1", auth_file=str(path)))


def test_tls_settings(tmp_path: Path) -> None:
    assert server_credentials(Settings()) is None
    with pytest.raises(StartupError, match="set together"):
        server_credentials(Settings(tls_cert="cert.pem"))
    with pytest.raises(StartupError, match="needs TASKGATE_TLS_CERT"):
        server_credentials(Settings(tls_client_ca="ca.pem"))
    with pytest.raises(StartupError, match=r"TASKGATE_TLS_KEY .*cannot be read"):
        server_credentials(Settings(tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem")))
