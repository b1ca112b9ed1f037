"""Keep passwords out of everything tlrun prints, logs or puts on a command line.

Two layers. By structure: `redact_url` masks the user-info and password-like query parameters of a URL,
even when the password holds an unencoded `#`, `/`, `?` or `@` (which defeat urllib's parser), and the
`redis://PASSWORD@host` form. By value: every password a broker URL can carry, as written and as the
transport decodes it, is registered once (`register`) and masked wherever it appears (`mask`), in every
line tlrun prints: the CLI wraps stdout and stderr in `MaskingStream`, and each log file has a `Redactor`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "***"
SECRET_QUERY_KEYS = ("password", "passwd", "pass", "pwd", "secret", "token", "sasl_password", "auth")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:" + "|".join(SECRET_QUERY_KEYS) + r")=)([^&;#]*)")
_MIN_SECRET = 3  # shorter values would mask ordinary words


def _split(url: str) -> tuple[str, str | None, str]:
    """(scheme://, user-info or None, the rest). The user-info ends at the *last* '@' before the host:
    an unencoded '#', '/', '?' or '@' in a password stays inside it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", None, url
    at = rest.rfind("@")
    if at < 0:
        return scheme + sep, None, rest
    return scheme + sep, rest[:at], rest[at + 1 :]


def secrets_of(url: str | None) -> list[str]:
    """Every password `url` may carry: after the user's ':' (or the whole user-info of `redis://PW@host`),
    urllib's reading of it, password-like query values; each as written and percent-decoded."""
    if not url:
        return []
    found: list[str] = []
    _, userinfo, rest = _split(url)
    if userinfo is not None:
        found.append(userinfo.partition(":")[2] if ":" in userinfo else userinfo)
    try:
        found.append(urlsplit(url).password or "")
    except ValueError:
        pass
    query = rest.partition("?")[2]
    found += [value for key, value in parse_qsl(query, keep_blank_values=True) if key.lower() in SECRET_QUERY_KEYS]
    found += [m.group(2) for m in _QUERY_SECRET.finditer(url)]
    out: list[str] = []
    for secret in found:
        # As written, as decoded, and the pieces a parser cuts an unencoded password into (a library's
        # error may quote one: "Port could not be cast to integer value as 'piece'").
        for form in (secret, unquote(secret), *re.split(r"[#/?@:]", secret)):
            if len(form) >= _MIN_SECRET and form not in out:
                out.append(form)
    return out


def redact_url(url: str | None) -> str:
    """`redis://:secret@host:6379/0` -> `redis://:***@host:6379/0`; `redis://secret@host` -> `redis://***@host`;
    `?password=secret` -> `?password=***`. A URL without secrets comes back unchanged."""
    if not url:
        return "(none)"
    head, userinfo, rest = _split(url)
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:{MASK}" if colon else MASK
        url = f"{head}{userinfo}@{rest}"
    url = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, url)
    return Redactor(secrets_of(url))(url)


class Redactor:
    """Replaces every occurrence of the known secrets in a line of text."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


_registered: set[str] = set()
_lock = threading.Lock()


def register(url: str | None) -> None:
    """Remember the passwords of a URL this process uses, for `mask`."""
    with _lock:
        _registered.update(secrets_of(url))


def registered() -> list[str]:
    with _lock:
        return list(_registered)


def mask(text: str) -> str:
    """Mask every registered password in `text`."""
    return Redactor(registered())(text) if _registered else text


class MaskingStream:
    """A text stream that masks registered passwords in whatever is written to it (the CLI's stdout and
    stderr: click, logging and the renderer all write through it)."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(mask(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
