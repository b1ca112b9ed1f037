"""What a failed broker connection means, said as the user can act on it: a missing client library, a scheme
no transport knows, refused credentials, TLS, nothing listening, an unknown host, silence."""

from __future__ import annotations

import socket
import sys
import time
from urllib.parse import urlsplit

from tlrun import redact
from tlrun.errors import BrokerError
from tlrun.redact import redact_url

CONNECT_TIMEOUT = 3.0

# The client library each transport needs, and what installs it.
_TRANSPORT_PACKAGES = {"redis": "redis", "rediss": "redis", "amqp": "amqp", "amqps": "amqp", "pyamqp": "amqp"}


class TransportUnloadable(BrokerError):
    """The transport's client library is missing or the wrong version: no setting of the app changes that."""


def transport_unloadable(url: str, exc: BaseException) -> BrokerError | None:
    """A transport whose client library is missing or the wrong version (an ImportError, kombu's
    VersionMismatch): said as what it is, with the command that installs a working one; else None."""
    if not isinstance(exc, ImportError) and type(exc).__name__ != "VersionMismatch":
        return None
    scheme = urlsplit(url).scheme.split("+")[-1].lower()
    package = _TRANSPORT_PACKAGES.get(scheme, f"kombu[{scheme}]")
    missing = getattr(exc, "name", None)
    what = f"module {missing!r} is missing" if missing else redact.mask(str(exc).strip() or type(exc).__name__)
    return TransportUnloadable(
        f"the {scheme} transport cannot be loaded: {what}",
        hint=f"install a working client into this environment: {sys.executable} -m pip install -U '{package}' "
        "(pip resolves the version your kombu needs)",
    )


_UNKNOWN_HOST = ("Name or service not known", "nodename nor servname", "Temporary failure in name resolution")


def failure(url: str, exc: BaseException, started: float) -> BrokerError:
    waited = time.monotonic() - started
    redact.register(url)
    reason = redact.mask(str(exc).strip() or type(exc).__name__)
    if isinstance(exc, AttributeError):  # kombu keeps a client library that did not import as None
        scheme = urlsplit(url).scheme.split("+")[-1].lower()
        try:
            __import__(_TRANSPORT_PACKAGES.get(scheme, "kombu"))
        except ImportError as missing:
            exc = missing
    unloadable = transport_unloadable(url, exc)
    if unloadable is not None:
        return unloadable
    if isinstance(exc, KeyError) or "transport" in reason.lower():
        return BrokerError(
            f"broker URL {redact_url(url)} has an unsupported scheme ({reason})",
            hint="use redis://host:port/db or amqp://user:password@host:port/vhost",
        )
    if any(word in reason for word in ("WRONGPASS", "NOAUTH", "username-password", "ACCESS_REFUSED")):
        return BrokerError(
            f"broker {redact_url(url)} refused the credentials: {reason}",
            hint="check the user and password in CELERY_BROKER_URL (or REDIS_URL)",
        )
    if "ssl" in reason.lower() or "certificate" in reason.lower():
        return BrokerError(
            f"broker {redact_url(url)} refused the TLS connection: {reason}",
            hint="check the app's broker_use_ssl (client certificate, key, CA) against the broker's TLS settings",
        )
    if isinstance(exc, ConnectionRefusedError) or "refused" in reason.lower():
        return BrokerError(
            f"broker {redact_url(url)} refused the connection (nothing listens there): {reason}",
            hint="is the broker running? check the host and port in CELERY_BROKER_URL (or REDIS_URL)",
        )
    host = urlsplit(url).hostname or "?"
    if isinstance(exc, socket.gaierror) or any(words in reason for words in _UNKNOWN_HOST):
        return BrokerError(
            f"broker host {host!r} is not known (DNS): {reason}",
            hint="check the host name in CELERY_BROKER_URL (or REDIS_URL)",
        )
    if waited < 0.5 * CONNECT_TIMEOUT:  # an error at once, not a broker that stayed silent
        return BrokerError(
            f"broker {redact_url(url)} could not be reached: {reason}",
            hint="check the host, port and password in CELERY_BROKER_URL (or REDIS_URL)",
        )
    return BrokerError(
        f"broker {redact_url(url)} did not answer within {waited:.1f} s: {reason}",
        hint="is the broker running? check CELERY_BROKER_URL (or REDIS_URL) and its password",
    )
