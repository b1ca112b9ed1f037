"""The launch path's Redis check in a few bytes of RESP: connect, AUTH, SELECT, PING.

The check runs while the early-started worker imports Celery (launch/early.py), on the same two cores:
redis-py costs about 35 ms of CPU to import (its asyncio and cluster clients come with it), which the
worker's start then waits for. A plain `redis://` URL (host, port, user, password, database number, no
query) is checked here with the standard library; anything else (TLS, a unix socket, query options)
goes through redis-py, which knows them all. Errors carry the server's own words (`WRONGPASS ...`,
`NOAUTH ...`) or the socket's exception, so that `Broker.failure` explains them as it explains redis-py's.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import SplitResult, unquote, urlsplit

_DB = re.compile(r"/?(\d*)")


class RedisReplyError(Exception):
    """The server answered a command with an error (its text, as the server wrote it)."""


def simple(url: str) -> SplitResult | None:
    """The parts of a plain redis:// URL this module checks, else None (redis-py checks it)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        return None
    if parts.scheme != "redis" or parts.query or parts.fragment or not _DB.fullmatch(parts.path or ""):
        return None
    return parts


def _command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _reply(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("Connection closed by server.")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    if line.startswith(b"-"):
        raise RedisReplyError(line[1:].decode(errors="replace"))
    return line


def ping(parts: SplitResult, timeout: float) -> None:
    """AUTH (when the URL has a password), SELECT (a database other than 0), PING; raises OSError,
    ConnectionError or RedisReplyError when the server does not answer or refuses."""
    match = _DB.fullmatch(parts.path or "")
    db = match.group(1) if match else ""
    with socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=timeout) as sock:
        buffer = bytearray()

        def call(*args: str) -> None:
            sock.sendall(_command(*args))
            _reply(sock, buffer)

        if parts.password is not None:
            # As redis-py does: the ACL form (a server whose user has no password accepts any), and the
            # password alone for a server older than Redis 6, which knows no users.
            password = unquote(parts.password)
            try:
                call("AUTH", unquote(parts.username) if parts.username else "default", password)
            except RedisReplyError as exc:
                if parts.username or "wrong number of arguments" not in str(exc):
                    raise
                call("AUTH", password)
        if db and int(db) != 0:
            call("SELECT", str(int(db)))
        call("PING")
