"""Redis URLs: their secrets, hidden from every message, and the parts conveyor checks itself.

Passwords never leave here in a message: ``redact_url`` hides the user-info password (even one
with unencoded ``/ ? # @``) and ``password=`` options; ``secrets_in_url`` lists every secret text
of a URL, so messages that may quote one can be scrubbed; errors about a URL name the redacted
URL only, and quote no host part (a mistyped password may sit there).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, unquote_plus

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from conveyor.errors import ConfigError

__all__ = ["DEFAULT_SENTINEL_PORT", "redact_url", "secrets_in_url"]

DEFAULT_SENTINEL_PORT = 26379

#: a ``name=value`` query option (a name may be percent-encoded: redis-py decodes it); the value
#: runs to the next ``&name=`` (so an unencoded ``&``, ``#`` or ``@`` inside it stays hidden) or
#: to the end
_NAME = r"(?:[\w.~+-]|%[0-9A-Fa-f]{2})+"


def _spelled(word: str) -> str:
    """A pattern for ``word`` with any of its letters percent-encoded (redis-py decodes option
    names)."""
    return "".join(f"(?:{c}|%{ord(c.lower()):02x}|%{ord(c.upper()):02x})" for c in word)


#: a ``...password=value`` option (``password``, ``sentinel_password`` ...); the value runs to
#: the next ``&name=`` (so an unencoded ``&``, ``#`` or ``@`` inside it stays hidden) or to the end
_QUERY_SECRET = re.compile(
    rf"(?i)((?:^|[?&;])(?:[\w.~+-]|%[0-9a-f]{{2}})*?{_spelled('password')}=)(.*?)(?=&{_NAME}=|$)",
    re.DOTALL,
)


def _hide_options(text: str, hide: Callable[[str], str]) -> str:
    """``text`` with the value of each ``...password=`` option replaced by ``hide(value)``."""
    return _QUERY_SECRET.sub(lambda m: m.group(1) + hide(m.group(2)), text)


# -- secrets -----------------------------------------------------------------------------------


def _userinfo(url: str) -> tuple[int, int, bool] | None:
    """Where the user-info of ``url`` starts and ends (its last ``@`` outside the secret query
    options), and whether a plain URL parser would have found it there: ``None`` when there is
    none. See ``_userinfo_ends``."""
    start, ends = _userinfo_ends(url, raw=False)
    at, plain = ends[0]
    return None if at is None else (start, at, plain)


def _userinfo_ends(url: str, *, raw: bool = True) -> tuple[int, list[tuple[int | None, bool]]]:
    """Where the user-info of ``url`` starts, and each place it may end (the ``@``) with whether
    a plain URL parser would have found it there (``None``: no user-info).

    The user-info ends at the last ``@`` outside the secret query options: a password may hold
    unencoded ``/ ? # @``, which end the host part for ``urlsplit`` (it then finds no password
    at all, and the password shows up as path, query or fragment). A password may also hold
    ``&password=``: then its ``@`` looks like part of an option's value. Such a URL reads as well
    as one whose option value holds the ``@``, so when an option's value holds an ``@`` the
    reading with the user-info ending at the last ``@`` is given too, and both are hidden
    (``raw=False``: the first reading only). Hiding more than the secret is the price of a
    URL that can be read both ways.
    """
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    masked = _hide_options(url, lambda value: "*" * len(value))
    first = _reading(masked, start)
    ends = [first]
    if raw:
        second = _reading(url, start)
        if second != first:
            ends.append(second)
    return start, ends


def _reading(text: str, start: int) -> tuple[int | None, bool]:
    """Where the user-info of ``text`` ends (its last ``@``) and whether that is in the host part;
    ``(None, True)`` without one."""
    at = text.rfind("@")
    if at < start:
        return None, True
    host_end = next((i for i in range(start, len(text)) if text[i] in "/?#"), len(text))
    return at, at < host_end


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """The spans of ``url`` that hold a secret, in every reading of it."""
    start, ends = _userinfo_ends(url)
    spans = []
    for end, plain in ends:
        at = 0 if end is None else end
        if end is not None:
            user, colon, _password = url[start:at].partition(":")
            # Without a colon it is a user name, unless the URL is so broken that it may be
            # anything.
            if colon:
                spans.append((start + len(user) + 1, at))
            elif not plain:
                spans.append((start, at))
        spans += [(at + m.start(2), at + m.end(2)) for m in _QUERY_SECRET.finditer(url[at:])]
    return spans


def _hidden(url: str) -> list[tuple[int, int]]:
    """The spans of ``url`` that hold a secret, merged, in order."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(_secret_spans(url)):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def redact_url(url: str) -> str:
    """``url`` with its password and ``password=`` options replaced by ``***``, fit for logs and
    error messages, whatever the URL holds.

    >>> redact_url("redis://user:secret@host:6379/0")
    'redis://user:***@host:6379/0'
    >>> redact_url("redis+sentinel://:p/w#d@s1:26379,s2:26379/mymaster?sentinel_password=x")
    'redis+sentinel://:***@s1:26379,s2:26379/mymaster?sentinel_password=***'
    """
    out, shown_to = [], 0
    for a, b in _hidden(url):
        out += [url[shown_to:a], "***"]
        shown_to = b
    out.append(url[shown_to:])
    return "".join(out)


def secrets_in_url(url: str) -> set[str]:
    """Every secret text in ``url``, as written and percent-decoded: the password and the values
    of ``password=`` options. For scrubbing messages that may quote them.

    >>> sorted(secrets_in_url("redis://u:p%40ss@h/0"))
    ['p%40ss', 'p@ss']
    """
    found = [url[a:b] for a, b in _secret_spans(url)]
    decoded = [f(s) for s in found for f in (unquote, unquote_plus)]
    return {s for s in (*found, *decoded) if s}


def _error_text(exc: BaseException, secrets: Iterable[str]) -> str:
    """``exc``'s message without the secrets it may quote (the exception's name if a secret
    too short to replace safely shows up in it)."""
    text = str(exc)
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            if len(secret) < 4:
                return type(exc).__name__
            text = text.replace(secret, "***")
    return text


def _config_error(message: str) -> ConfigError:
    """A ConfigError whose message is one line."""
    return ConfigError(" ".join(message.split()))


def _named(names: Iterable[str], shown: str, always: Iterable[str] = ()) -> str:
    """`` a, b``: the option names that the redacted URL ``shown`` shows (a name that it does
    not show came out of a secret value with an unencoded ``&`` in it), and those in
    ``always`` (keyword arguments)."""
    keywords = set(always)
    visible = sorted(
        {
            n
            for n in names
            if n in keywords or re.search(rf"(?:^|[?&;]){re.escape(n)}(?:[=&;#]|$)", shown)
        }
    )
    return " " + ", ".join(visible) if visible else ""


def _address(text: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` of ``host[:port]`` or ``[ipv6][:port]``. The ValueError says what is
    wrong without quoting the text (a mistyped URL may hold a password there)."""
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError("a bad IPv6 address: write [address]:port")
        port_text = tail[1:] if tail else None
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
    if port_text is None:
        return host, default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) <= 65535:
        raise ValueError("a bad port: use a number from 1 to 65535")
    return host, int(port_text)


def _parse_sentinel_url(
    parts: SplitResult, bad: Callable[[str], ConfigError]
) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """The sentinels' addresses, the service and the connection settings of a Sentinel URL."""
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise bad("names no sentinel")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        try:
            host, port = _address(item, DEFAULT_SENTINEL_PORT)
        except ValueError as exc:
            raise bad(f"has {exc}") from None
        if not host:
            raise bad("has an empty sentinel address")
        sentinels.append((unquote(host), port))
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if len(path) > 1 and path[-1] == "":
        path.pop()  # a trailing slash
    if not path or not path[0]:
        raise bad("names no service")
    if len(path) > 2:
        raise bad("has more than a service and a db in its path")

    settings: dict[str, Any] = {}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        parser: Any = URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parser is not None:
            try:
                settings[name] = parser(values[-1])
            except (TypeError, ValueError):
                raise bad(f"has a bad value for option {name!r}") from None
        else:  # connect() refused unknown options already
            settings[name] = values[-1]
    if len(path) == 2:
        if not re.fullmatch(r"[0-9]+", path[1]):
            raise bad("has a bad db: use a number")
        settings["db"] = int(path[1])
    if parts.username:
        settings["username"] = unquote(parts.username)
    if parts.password:
        settings["password"] = unquote(parts.password)
    return sentinels, path[0], settings


#: URL options that are strings (numbers and flags: those redis-py has a parser for)
_STR_OPTIONS = frozenset(
    {
        "username",
        "password",
        "client_name",
        "lib_name",
        "lib_version",
        "encoding",
        "encoding_errors",
    }
)


def _known_option(name: str, *, sentinel: bool) -> bool:
    """Whether a URL option is one the connections take: redis-py hands any other one to the
    connection class, which fails at the first command, far from the URL."""
    if name in URL_QUERY_ARGUMENT_PARSERS or name in _STR_OPTIONS or name.startswith("ssl_"):
        return True
    return sentinel and name in ("sentinel_username", "sentinel_password")
