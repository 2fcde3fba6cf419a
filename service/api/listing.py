"""ListTasks requests: the AIP-160 filter subset, ``order_by``, page sizes and page tokens.

The filter grammar (AIP-160, the part ListTasks accepts)::

    expression  = sequence { "AND" sequence }
    sequence    = factor { factor }            (juxtaposed factors: AND)
    factor      = term { "OR" term }           (OR binds tighter than AND)
    term        = [ "NOT" | "-" ] simple
    simple      = restriction | "(" expression ")"
    restriction = FIELD OP value               (OP: = != < <= > >=)
    value       = "quoted string" | bare word

A small recursive-descent parser (no parser library: the grammar is a dozen lines) that
turns the text into ``service.domain.query`` nodes; the store binds their values as
parameters. Every error is ``InvalidRequest`` naming the position (1-based) and the problem.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from service.domain.errors import InvalidRequest
from service.domain.model import TaskState
from service.domain.query import TIME_FIELDS, All, Any, Compare, Expr, Field, Not, Op, PageKey, Value

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_FILTER_LENGTH = 4096
#: Nesting deeper than this (parentheses, NOT) is refused: the parser recurses.
MAX_DEPTH = 32

_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<op><=|>=|!=|=|<|>)
  | (?P<paren>[()])
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<word>[A-Za-z0-9_.*:+\-]+)
    """,
    re.VERBOSE,
)
_KEYWORDS = frozenset({"AND", "OR", "NOT"})
_STATE_PREFIX = "TASK_STATE_"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "op", "paren", "string", "word", "end"
    text: str
    at: int  # 1-based position in the filter text


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            if text[pos] in "\"'":
                raise _error(pos + 1, "a quoted string is not closed")
            raise _error(pos + 1, f"unexpected character {text[pos]!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), pos + 1))
        pos = match.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


def _error(at: int, problem: str) -> InvalidRequest:
    return InvalidRequest(f"filter: at position {at}: {problem}")


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokens(text)
        self._index = 0
        self._depth = 0

    @property
    def _next(self) -> _Token:
        return self._tokens[self._index]

    def _take(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    def _keyword(self, word: str) -> bool:
        token = self._next
        if token.kind == "word" and token.text == word:
            self._index += 1
            return True
        return False

    def parse(self) -> Expr:
        expr = self._expression()
        token = self._next
        if token.kind != "end":
            raise _error(token.at, f"unexpected {token.text!r}")
        return expr

    def _expression(self) -> Expr:
        parts = [self._sequence()]
        while self._keyword("AND"):
            parts.append(self._sequence())
        return parts[0] if len(parts) == 1 else All(tuple(parts))

    def _sequence(self) -> Expr:
        parts = [self._factor()]
        while self._starts_term():
            parts.append(self._factor())
        return parts[0] if len(parts) == 1 else All(tuple(parts))

    def _starts_term(self) -> bool:
        token = self._next
        if token.kind == "paren":
            return token.text == "("
        return token.kind in ("word", "string") and token.text not in ("AND", "OR")

    def _factor(self) -> Expr:
        parts = [self._term()]
        while self._keyword("OR"):
            parts.append(self._term())
        return parts[0] if len(parts) == 1 else Any(tuple(parts))

    def _term(self) -> Expr:
        token = self._next
        if self._keyword("NOT"):
            return Not(self._nested(self._simple))
        if token.kind == "word" and token.text.startswith("-") and len(token.text) > 1:
            # "-field": the negation sign glued to the field name
            self._tokens[self._index] = _Token("word", token.text[1:], token.at + 1)
            return Not(self._simple())
        if token.kind == "word" and token.text == "-":
            self._index += 1
            return Not(self._nested(self._simple))
        return self._simple()

    def _nested(self, parse: Callable[[], Expr]) -> Expr:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _error(self._next.at, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return parse()
        finally:
            self._depth -= 1

    def _simple(self) -> Expr:
        token = self._next
        if token.kind == "paren" and token.text == "(":
            self._index += 1
            expr = self._nested(self._expression)
            close = self._take()
            if close.kind != "paren" or close.text != ")":
                raise _error(close.at, "expected ')'")
            return expr
        return self._restriction()

    def _restriction(self) -> Expr:
        name = self._take()
        if name.kind != "word" or name.text in _KEYWORDS:
            what = "the end of the filter" if name.kind == "end" else repr(name.text)
            raise _error(name.at, f"expected a field name, found {what}")
        try:
            field = Field(name.text)
        except ValueError:
            known = ", ".join(f.value for f in Field)
            raise _error(name.at, f"unknown field {name.text!r} (fields: {known})") from None
        op_token = self._take()
        if op_token.kind != "op":
            raise _error(op_token.at, f"expected a comparison (= != < <= > >=) after {field.value!r}")
        value = self._take()
        if value.kind not in ("word", "string") or (value.kind == "word" and value.text in _KEYWORDS):
            raise _error(value.at, f"expected a value after {op_token.text!r}")
        return _compare(field, Op(op_token.text), value)


def _unquote(token: _Token) -> str:
    if token.kind != "string":
        return token.text
    return re.sub(r"\\(.)", r"\1", token.text[1:-1])


def _compare(field: Field, op: Op, token: _Token) -> Compare:
    text = _unquote(token)
    value: Value
    if field is Field.STATE:
        if op not in (Op.EQ, Op.NE):
            raise _error(token.at, "state takes only = and !=")
        name = text.upper().removeprefix(_STATE_PREFIX)
        try:
            value = TaskState(name)
        except ValueError:
            known = ", ".join(s.value for s in TaskState)
            raise _error(token.at, f"unknown state {text!r} (states: {known})") from None
        return Compare(field, op, value)
    if field in TIME_FIELDS:
        return Compare(field, op, _time(text, token.at))
    if text.endswith("*"):
        if op not in (Op.EQ, Op.NE):
            raise _error(token.at, "a value ending in * (a prefix) takes only = and !=")
        return Compare(field, op, text[:-1], prefix=True)
    return Compare(field, op, text)


def _time(text: str, at: int) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _error(at, f"{text!r} is not an RFC 3339 time (e.g. 2026-01-31T12:00:00Z)") from None
    if moment.tzinfo is None:
        raise _error(at, f"{text!r} has no time zone offset (add Z for UTC)")
    return moment.astimezone(dt.UTC)


def parse_filter(text: str) -> Expr | None:
    """The filter tree of ``text``; None for an empty filter.

    Raises:
        InvalidRequest: the text is too long or not in the accepted grammar; the message
            names the position and the problem.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise InvalidRequest(f"filter is longer than {MAX_FILTER_LENGTH} characters")
    if not text.strip():
        return None
    return _Parser(text).parse()


def parse_order_by(text: str) -> bool:
    """True for newest first (``create_time desc``, the default), False for ``create_time``.

    Raises:
        InvalidRequest: any other ordering.
    """
    words = text.split()
    if not words or words == ["create_time", "desc"]:
        return True
    if words in (["create_time"], ["create_time", "asc"]):
        return False
    raise InvalidRequest(f"order_by {text!r} is not supported; use 'create_time desc' or 'create_time'")


def page_size(value: int) -> int:
    """The page size to use: 0 means the default, more than the maximum is cut to it.

    Raises:
        InvalidRequest: a negative page size.
    """
    if value < 0:
        raise InvalidRequest("page_size must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _binding(filter_text: str, newest_first: bool) -> str:
    text = f"{filter_text.strip()}\x00{'desc' if newest_first else 'asc'}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_page_token(key: PageKey, filter_text: str, newest_first: bool) -> str:
    """An opaque token for the page after ``key``, bound to this filter and order."""
    body = {"b": _binding(filter_text, newest_first), "t": key.create_time.isoformat(), "i": key.task_id}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filter_text: str, newest_first: bool) -> PageKey | None:
    """The keyset of a page token; None for an empty token.

    Raises:
        InvalidRequest: the token is malformed, or came from a call with another filter or
            order_by.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        binding, moment, task_id = body["b"], dt.datetime.fromisoformat(body["t"]), body["i"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidRequest("page_token is not a token this server issued") from None
    if not isinstance(task_id, str) or moment.tzinfo is None:
        raise InvalidRequest("page_token is not a token this server issued")
    if binding != _binding(filter_text, newest_first):
        raise InvalidRequest(
            "page_token was issued for another filter or order_by; start from the first page"
        )
    return PageKey(moment, task_id)
