"""Who may call the gateway and what each caller may do, read from the TOML auth file.

The file (``TASKGATE_AUTH_FILE``) declares one table per caller::

    [callers.billing]
    token_sha256 = "<hex sha-256 of the bearer token>"  # or a list: two hashes while rotating
    tasks = ["demo.add", "reports.*"]                  # fnmatch patterns it may enqueue
    read_all = false                                   # may it read other callers' tasks?
    rate = 50                                          # enqueues per second; absent = unlimited
    tls_cn = "billing.internal"                        # mTLS client certificate CN naming it

Tokens are never stored in clear: only their SHA-256. No gRPC here.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,255}$")
_HASH_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_KEYS = frozenset({"token_sha256", "tasks", "read_all", "rate", "tls_cn"})


@dataclass(frozen=True, slots=True)
class Caller:
    """One declared caller and its permissions.

    Attributes:
        name: The caller's name (recorded with each task it enqueues); "" in open mode.
        tasks: fnmatch-style patterns of the task names it may enqueue.
        read_all: Whether it may read tasks other callers enqueued.
        rate: Enqueues per second (token bucket, burst ``max(1, rate)``); None = unlimited.
        tls_cn: The client certificate common name that identifies it, if any.
        token_hashes: SHA-256 digests of its bearer tokens (several while rotating).
    """

    name: str
    tasks: tuple[str, ...] = ()
    read_all: bool = False
    rate: float | None = None
    tls_cn: str | None = None
    token_hashes: tuple[bytes, ...] = field(default=(), repr=False)

    def may_enqueue(self, task_name: str) -> bool:
        """True when ``task_name`` matches one of the caller's patterns."""
        return _matches(self.tasks, task_name)

    def may_read(self, owner: str) -> bool:
        """True when the caller may read a task enqueued by ``owner``."""
        return self.read_all or owner == self.name


@functools.lru_cache(maxsize=4096)
def _matches(patterns: tuple[str, ...], task_name: str) -> bool:
    return any(fnmatch.fnmatchcase(task_name, pattern) for pattern in patterns)


#: The caller of a gateway running without an auth file: may do everything.
OPEN = Caller(name="", tasks=("*",), read_all=True)


class AuthFileError(Exception):
    """The auth file is missing, is not TOML, or declares something invalid."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"auth file {str(path)!r}: {problem}")
        self.path = str(path)
        self.problem = problem


def token_hash(token: str) -> bytes:
    """The SHA-256 digest of a bearer token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Callers:
    """The declared callers, looked up by token or by certificate common name."""

    def __init__(self, callers: Iterable[Caller]) -> None:
        self._callers = tuple(callers)
        self._hashes = [(digest, caller) for caller in self._callers for digest in caller.token_hashes]
        self._by_cn = {caller.tls_cn: caller for caller in self._callers if caller.tls_cn}

    def __iter__(self) -> Iterator[Caller]:
        return iter(self._callers)

    def __len__(self) -> int:
        return len(self._callers)

    @property
    def use_certificates(self) -> bool:
        """True when some caller is identified by its client certificate."""
        return bool(self._by_cn)

    def by_token(self, token: str) -> Caller | None:
        """The caller whose token this is, or None.

        Every declared hash is compared (with ``hmac.compare_digest``), so the time taken
        does not depend on which one matches.
        """
        digest = token_hash(token)
        found: Caller | None = None
        for candidate, caller in self._hashes:
            if hmac.compare_digest(candidate, digest):
                found = caller
        return found

    def by_common_name(self, common_name: str) -> Caller | None:
        """The caller whose ``tls_cn`` is ``common_name``, or None."""
        return self._by_cn.get(common_name)

    @classmethod
    def load(cls, path: Path | str) -> Callers:
        """Read and check the auth file.

        Raises:
            AuthFileError: it cannot be read, is not TOML, or declares something invalid.
        """
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise AuthFileError(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
        except UnicodeDecodeError:
            raise AuthFileError(path, "is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise AuthFileError(path, f"is not valid TOML ({exc})") from None
        try:
            return cls.parse(data)
        except ValueError as exc:
            raise AuthFileError(path, str(exc)) from None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Callers:
        """Check the decoded file.

        Raises:
            ValueError: the message says which caller and key is wrong.
        """
        extra = sorted(set(data) - {"callers"})
        if extra:
            raise ValueError(f"unknown top-level keys {extra}; only [callers.<name>] tables are allowed")
        tables = data.get("callers")
        if not isinstance(tables, dict) or not tables:
            raise ValueError("declares no callers (expected [callers.<name>] tables)")
        callers = [_caller(name, table) for name, table in tables.items()]
        _check_unique(callers)
        return cls(callers)


def _caller(name: str, table: Any) -> Caller:
    where = f"[callers.{name}]"
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"{where}: a caller name may use only letters, digits and _ . : - (1-255)")
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    extra = sorted(set(table) - _KEYS)
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}")
    hashes = _hashes(where, table.get("token_sha256", []))
    tasks = table.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(p, str) and p for p in tasks):
        raise ValueError(f"{where}: tasks must be a list of non-empty strings")
    read_all = table.get("read_all", False)
    if not isinstance(read_all, bool):
        raise ValueError(f"{where}: read_all must be true or false")
    rate = table.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0):
        raise ValueError(f"{where}: rate must be a positive number of enqueues per second")
    tls_cn = table.get("tls_cn")
    if tls_cn is not None and (not isinstance(tls_cn, str) or not tls_cn):
        raise ValueError(f"{where}: tls_cn must be a non-empty string")
    if not hashes and tls_cn is None:
        raise ValueError(f"{where}: needs token_sha256 or tls_cn, or nobody can be this caller")
    return Caller(
        name=name,
        tasks=tuple(tasks),
        read_all=read_all,
        rate=float(rate) if rate is not None else None,
        tls_cn=tls_cn,
        token_hashes=hashes,
    )


def _hashes(where: str, value: Any) -> tuple[bytes, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and _HASH_RE.fullmatch(v) for v in values):
        raise ValueError(
            f"{where}: token_sha256 must be a hex SHA-256 (64 hex digits) or a list of them "
            "(the hash of the token, never the token itself)"
        )
    return tuple(bytes.fromhex(v) for v in values)


def _check_unique(callers: list[Caller]) -> None:
    owners: dict[bytes, str] = {}
    names: dict[str, str] = {}
    for caller in callers:
        for digest in caller.token_hashes:
            if owners.setdefault(digest, caller.name) != caller.name:
                raise ValueError(f"callers {owners[digest]!r} and {caller.name!r} share a token hash")
        if caller.tls_cn is not None and names.setdefault(caller.tls_cn, caller.name) != caller.name:
            raise ValueError(f"callers {names[caller.tls_cn]!r} and {caller.name!r} share tls_cn")
