"""Keep passwords out of everything tlrun prints, logs or puts on a command line."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def url_password(url: str | None) -> str | None:
    """The password embedded in a broker URL, or None."""
    if not url:
        return None
    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


def redact_url(url: str | None) -> str:
    """`redis://:secret@host:6379/0` -> `redis://:***@host:6379/0`; other URLs unchanged."""
    if not url:
        return "(none)"
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))
    except ValueError:
        # An unparsable URL may still hold a secret: show only its scheme.
        return url.split(":", 1)[0] + "://" + MASK


class Redactor:
    """Replaces every occurrence of the known secrets in a line of text."""

    def __init__(self, secrets: list[str | None]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text
