"""Who runs a local broker: the uids owning the TCP sockets that listen on its port.

Any local user can listen on a free loopback port first, and then be the broker that a developer's
workers read their tasks from. Linux lists every socket in /proc/net/tcp and /proc/net/tcp6 with its state
(0A: listening) and owner uid; elsewhere nothing is known (no warning). System accounts (uid below the
login range, like Debian's `redis` user) and root run system services: only another login user's listener
is foreign.
"""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path
from urllib.parse import urlsplit

from tlrun.errors import BrokerError

LISTEN = "0A"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672}


def listener_uids(port: int, proc_net: Path = Path("/proc/net")) -> set[int]:
    """The uids of the sockets listening on `port` (any local address); empty when not known."""
    uids = set()
    for name in ("tcp", "tcp6"):
        try:
            rows = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 8 or fields[3] != LISTEN:
                continue
            try:
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    uids.add(int(fields[7]))
            except ValueError:
                continue
    return uids


def first_login_uid(login_defs: Path = Path("/etc/login.defs")) -> int:
    try:
        match = re.search(r"^\s*UID_MIN\s+(\d+)", login_defs.read_text(), re.M)
    except OSError:
        match = None
    return int(match.group(1)) if match else 1000


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def foreign_listener(url: str, proc_net: Path = Path("/proc/net")) -> int | None:
    """The uid of another login user listening where `url` points on this host, else None."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.split("+")[-1])
    except ValueError:
        return None
    if (parts.hostname or "") not in LOCAL_HOSTS or not port:
        return None
    me, login = os.getuid(), first_login_uid()
    foreign = sorted(uid for uid in listener_uids(port, proc_net) if uid != me and uid >= login)
    return foreign[0] if foreign else None


NO_LOGIN_SHELLS = ("nologin", "false", "sync", "halt", "shutdown")


def other_login_users(entries: list[pwd.struct_passwd] | None = None) -> list[str]:
    """Names of the other accounts on this host that can log in (a login-range uid and a shell): each could
    reach a password-less broker on loopback."""
    me, login = os.getuid(), first_login_uid()
    names = []
    for entry in pwd.getpwall() if entries is None else entries:
        shell = os.path.basename(entry.pw_shell or "")
        if entry.pw_uid != me and login <= entry.pw_uid < 65534 and shell and shell not in NO_LOGIN_SHELLS:
            names.append(entry.pw_name)
    return sorted(names)


TRUST_ENV = "TLRUN_TRUST_BROKER_OWNER"


class ForeignBrokerError(BrokerError):
    """Another login user listens where the broker should be; nothing with a secret was sent."""


_trusted: set[str] = set()


def trust(names: str | None) -> None:
    """The login users whose broker this project uses on purpose (TLRUN_TRUST_BROKER_OWNER, a comma list, from
    the environment or .env): their listener may receive the password."""
    _trusted.update(n.strip() for n in (names or "").split(",") if n.strip())


def refuse_foreign(urls: list[str], secret: bool, proc_net: Path = Path("/proc/net")) -> None:
    """Before a byte with a password goes to a local port: raise BrokerError (exit 5) naming the owner when
    another login user listens there, unless trusted. Without a secret to lose this is doctor's and the
    launcher's warning, not a refusal."""
    from tlrun.redact import redact_url

    if not secret:
        return
    trusted = _trusted | {n.strip() for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip()}
    for url in urls:
        uid = foreign_listener(url, proc_net)
        if uid is None or user_name(uid) in trusted:
            continue
        name = user_name(uid)
        raise ForeignBrokerError(
            f"the broker at {redact_url(url)} is run by {name}, another local user: tlrun sends it no password "
            "(whoever listens on that port would receive it, and could read and feed every task)",
            hint=f"run a broker of your own (a free port, a password); or, if {name} runs it for you on purpose, "
            f"set {TRUST_ENV}={name}",
        )
