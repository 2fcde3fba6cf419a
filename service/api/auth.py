"""Who is calling: bearer tokens and mTLS client certificates, checked before any handler runs.

``AuthInterceptor`` refuses TaskService and reflection calls that carry no valid
credentials (UNAUTHENTICATED, one fixed message); health stays open. The servicer then
re-derives the caller from the same metadata and TLS auth context with
``Authenticator.caller_of`` (nothing is passed between interceptor and handler).
Without an auth file the gateway runs open: every call is the anonymous caller ``OPEN``.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from service.config import Settings
from service.domain.callers import OPEN, AuthFileError, Caller, Callers
from service.domain.errors import Unauthenticated

log = logging.getLogger(__name__)
#: Refused calls go to the audit log too (the method, never the credentials).
audit = logging.getLogger("taskgate.audit")

#: The one message of every UNAUTHENTICATED answer: it never says which part was wrong.
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials"
#: Methods under these prefixes need no credentials.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."

Metadata = Iterable[tuple[str, str | bytes]]
AuthContext = Mapping[str, Iterable[bytes]]
Context = aio.ServicerContext[Any, Any]


class StartupError(Exception):
    """The security configuration is unusable; ``taskgate serve`` exits with this message."""


def _bearer(metadata: Metadata | None) -> str | None:
    """The bearer token of the call; None without one, "" when the header is malformed."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        return ""
    scheme, _, token = values[0].partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Authenticator:
    """Identifies the caller of a call from its metadata and its TLS auth context."""

    def __init__(
        self, callers: Callers | None, *, reflection_open: bool = False, client_certificates: bool = False
    ) -> None:
        """Build an authenticator.

        Args:
            callers: The declared callers; None = open mode.
            reflection_open: Serve reflection without credentials.
            client_certificates: The server asks for client certificates (mTLS), so a call
                may be identified by its certificate rather than by its metadata.
        """
        self._callers = callers
        self.reflection_open = reflection_open
        self._client_certificates = client_certificates

    @classmethod
    def open(cls) -> Authenticator:
        """An authenticator for open mode: everyone is the anonymous caller."""
        return cls(None, reflection_open=True)

    @property
    def is_open(self) -> bool:
        """True in open mode (no auth file)."""
        return self._callers is None

    @property
    def uses_certificates(self) -> bool:
        """True when a call may be identified by its client certificate."""
        return self._client_certificates and self._callers is not None and self._callers.use_certificates

    def identify(self, metadata: Metadata | None, auth_context: AuthContext) -> Caller | None:
        """The caller these credentials belong to, or None.

        A token, when sent, must be valid (a good certificate does not excuse a wrong token);
        a token and a certificate naming different callers identify nobody.
        """
        if self._callers is None:
            return OPEN
        token = _bearer(metadata)
        by_token = self._callers.by_token(token) if token else None
        if token is not None and by_token is None:
            return None
        by_cert = None
        names = list(auth_context.get("x509_common_name", ()))
        if len(names) == 1:
            by_cert = self._callers.by_common_name(names[0].decode("utf-8", "replace"))
        if by_token is not None and by_cert is not None and by_token is not by_cert:
            return None
        return by_token or by_cert

    def caller_of(self, context: Context) -> Caller:
        """The caller of the call ``context`` belongs to.

        Raises:
            Unauthenticated: the call carries no valid credentials.
        """
        if self._callers is None:
            return OPEN
        caller = self.identify(context.invocation_metadata(), context.auth_context())
        if caller is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return caller


_Factory = Callable[..., "grpc.RpcMethodHandler[Any, Any]"]
_KINDS: dict[tuple[bool, bool], tuple[str, _Factory]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


async def _refuse(request: Any, context: Context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


class AuthInterceptor(aio.ServerInterceptor):
    """Refuses calls without valid credentials before their handler runs (health excepted)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def _needs_caller(self, method: str) -> bool:
        if self._auth.is_open or method.startswith(HEALTH_PREFIX):
            return False
        return not (self._auth.reflection_open and method.startswith(REFLECTION_PREFIX))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Pass the handler through, guarded, or replace it with a refusal."""
        handler = await continuation(handler_call_details)
        if handler is None or not self._needs_caller(handler_call_details.method):
            return handler
        kind, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
        metadata: Metadata = handler_call_details.invocation_metadata or ()
        if not self._auth.uses_certificates and self._auth.identify(metadata, {}) is None:
            # Decided from the metadata alone: refused before the request is even parsed.
            audit.info("caller=- method=%s outcome=UNAUTHENTICATED", handler_call_details.method)
            return factory(_refuse, response_serializer=handler.response_serializer)
        return factory(
            self._guarded(getattr(handler, kind), handler_call_details.method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guarded(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        """``behavior``, run only once the call's credentials (with its TLS peer) check out."""

        async def check(context: Context) -> None:
            if self._auth.identify(context.invocation_metadata(), context.auth_context()) is None:
                audit.info("caller=- method=%s outcome=UNAUTHENTICATED", method)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: Context) -> Any:
                await check(context)
                async for item in behavior(request, context):
                    yield item

            return streaming

        async def unary(request: Any, context: Context) -> Any:
            await check(context)
            return await behavior(request, context)

        return unary


def is_loopback(listen: str) -> bool:
    """True when ``listen`` (host:port) only accepts connections from this machine."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StartupError(f"{setting} {path!r}: cannot be read ({reason})") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from TASKGATE_TLS_CERT / _KEY (/ _CLIENT_CA for mTLS); None without TLS.

    Raises:
        StartupError: a file is missing or only half of the pair is set.
    """
    if not (settings.tls_cert or settings.tls_key):
        if settings.tls_client_ca:
            raise StartupError("TASKGATE_TLS_CLIENT_CA needs TASKGATE_TLS_CERT and TASKGATE_TLS_KEY")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise StartupError("TASKGATE_TLS_CERT and TASKGATE_TLS_KEY must be set together")
    pair = [(_read("TASKGATE_TLS_KEY", settings.tls_key), _read("TASKGATE_TLS_CERT", settings.tls_cert))]
    if not settings.tls_client_ca:
        return grpc.ssl_server_credentials(pair)
    root = _read("TASKGATE_TLS_CLIENT_CA", settings.tls_client_ca)
    return grpc.ssl_server_credentials(pair, root_certificates=root, require_client_auth=True)


@dataclass(frozen=True, slots=True)
class Security:
    """Who may call, and over what transport."""

    authenticator: Authenticator
    credentials: grpc.ServerCredentials | None = None


def security_from_settings(settings: Settings) -> Security:
    """Check the security settings at start-up and build what the server needs.

    Raises:
        StartupError: a malformed auth file (the message names it and the problem), unusable
            TLS files, or open mode on a non-loopback address without TASKGATE_ALLOW_INSECURE=1.
    """
    credentials = server_credentials(settings)
    loopback = is_loopback(settings.listen)
    if not settings.auth_file:
        if not loopback and not settings.allow_insecure:
            raise StartupError(
                f"refusing to listen on {settings.listen} without TASKGATE_AUTH_FILE: anyone who can "
                "reach it could enqueue any task. Declare callers in TASKGATE_AUTH_FILE, or set "
                "TASKGATE_ALLOW_INSECURE=1 to run open anyway."
            )
        log.warning(
            "!!! OPEN MODE: TASKGATE_AUTH_FILE is not set; every caller may enqueue and read every "
            "task (listening on %s) !!!",
            settings.listen,
        )
        return Security(Authenticator.open(), credentials)
    try:
        callers = Callers.load(settings.auth_file)
    except AuthFileError as exc:
        raise StartupError(str(exc)) from None
    if callers.use_certificates and not settings.tls_client_ca:
        log.warning("callers with tls_cn cannot be identified: TASKGATE_TLS_CLIENT_CA is not set")
    if credentials is None and not loopback:
        log.warning("bearer tokens travel in clear: set TASKGATE_TLS_CERT and TASKGATE_TLS_KEY")
    log.info("%d callers declared in %s", len(callers), settings.auth_file)
    authenticator = Authenticator(
        callers, reflection_open=settings.reflection_open, client_certificates=bool(settings.tls_client_ca)
    )
    return Security(authenticator, credentials)
