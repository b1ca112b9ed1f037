"""The app's own broker settings, for every connection tlrun opens (pings, census, health, doctor, the lease,
the node-name claims, queue lengths).

A connection built from the URL alone drops what the app gives its own: a `global_keyprefix` (pings and
queue lengths on other keys), `priority_steps` (queue lengths that miss messages), client certificates
(`broker_use_ssl`), Sentinel's `master_name`, a login method, a custom control exchange. So tlrun takes the
app's settings, as JSON-able data (`options_from_conf`), from the best source at hand:

- `app`: an app tlrun imported itself (a broker_url from the app, doctor, init, debug mode);
- `worker`: a held worker, which imports the app anyway, sends them with its `ready` (entry.py), over a socket
  pair: secrets included, never on disk;
- `record`: a launcher writes them, secrets removed, to a 0600 file in the lock directory, for the commands
  that must not import the app (health, stop, ps --cluster); a removed secret is filled from the URL, or the
  command imports the app;
- `url`: nothing else at hand (an app that does not import): the URL alone, said once.

Every connection is then a Celery app configured with those settings and tlrun's own overrides on top
(`OVERRIDES`, each a named choice): key prefixes, priority steps, separators and TLS are kombu's own work,
never a copy of its rules here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlrun import safefile

# The settings of the app's conf that shape a connection. `broker_url` itself is not among them: the URL is
# resolved once (-b, the environment, .env, the app) and the options follow it.
CONF_KEYS = (
    "broker_transport_options",
    "broker_use_ssl",
    "broker_login_method",
    "broker_connection_timeout",
    "broker_heartbeat",
    "broker_failover_strategy",
    "control_exchange",
    "control_queue_ttl",
    "control_queue_expires",
    "control_queue_durable",
    "control_queue_exclusive",
    "control_exchange_type",
)

# tlrun's own choices over the app's, for its short-lived control connections (the worker keeps the app's):
OVERRIDES = {
    # a probe fails fast and says why; the worker's own connection retries as the app says
    "broker_connection_retry": False,
    "broker_connection_retry_on_startup": False,
}
# ... and in the transport options: Redis reply collection waits on BRPOP, whose timeout is `polling_interval`
# (kombu's default 1 s): a ping whose first try was lost would see its reply up to that late.
PROBE_POLL_INTERVAL = 0.05

_SECRET_WORDS = ("pass", "secret", "token", "credential")
REMOVED = "<removed: a secret>"

_registered: dict[str, tuple[dict[str, Any], str]] = {}


def options_from_conf(conf: Any) -> dict[str, Any]:
    """The connection settings of a Celery app's conf, as JSON-able data (a value that is not, such as a
    credential provider object, is left out: it cannot cross a process)."""
    options: dict[str, Any] = {}
    for key in CONF_KEYS:
        try:
            value = conf.get(key)
        except Exception:  # a Django settings object that fails to load: nothing more to take
            continue
        if value is None or (key == "broker_transport_options" and not value):
            continue
        if callable(value) and not isinstance(value, str):
            continue  # a failover strategy given as a function
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            if isinstance(value, Mapping):
                value = {k: v for k, v in value.items() if _json_able(v)}
            else:
                continue
        options[key] = value
    alternates = _alternates(conf)
    if alternates:
        options["alternates"] = alternates
    return options


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _alternates(conf: Any) -> list[str]:
    """The failover URLs after the first one of the app's broker_url (`a;b;c` or a list)."""
    try:
        urls = conf.get("broker_url")
    except Exception:
        return []
    if isinstance(urls, str):
        urls = urls.split(";")
    return [str(u).strip() for u in (urls or [])[1:] if str(u).strip()]


def register(url: str, options: Mapping[str, Any], source: str) -> None:
    """From now on, every connection of this process to `url` uses `options` (source: app|worker|record|url)."""
    _registered[url] = (dict(options), source)


def known(url: str) -> bool:
    return url in _registered


def options_for(url: str) -> tuple[dict[str, Any], str]:
    """The options registered for `url` and their source; ({}, "url") when none were."""
    options, source = _registered.get(url, ({}, "url"))
    return dict(options), source


def plain(url: str) -> bool:
    """Nothing the app sets changes how a connection to `url` is made (a redis-py PING from the URL is then
    the same check): no TLS options, login method, failover URLs or Sentinel, and transport options that only
    name keys or timing."""
    options, _ = options_for(url)
    if url.startswith("sentinel://") or any(options.get(k) for k in ("broker_use_ssl", "broker_login_method")):
        return False
    if options.get("alternates"):
        return False
    transport = dict(options.get("broker_transport_options") or {})
    return set(transport) <= _NAMING_ONLY


# Transport options that name keys or set timing, never how a connection is made.
_NAMING_ONLY = {
    "global_keyprefix",
    "priority_steps",
    "sep",
    "queue_order_strategy",
    "visibility_timeout",
    "polling_interval",
    "unacked_restore_interval",
    "unacked_restore_throttle",
    "unacked_mutex_expire",
    "fanout_prefix",
    "fanout_patterns",
}


def celery_conf(url: str, connect_timeout: float, socket_timeout: float) -> dict[str, Any]:
    """The conf of tlrun's probe app for `url`: the app's settings, then tlrun's overrides."""
    options, _ = options_for(url)
    alternates = options.pop("alternates", [])
    transport = dict(options.pop("broker_transport_options", None) or {})
    transport.update(
        polling_interval=PROBE_POLL_INTERVAL,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
    )
    if url.startswith("sentinel://"):
        sentinel = dict(transport.get("sentinel_kwargs") or {})
        sentinel.setdefault("socket_timeout", socket_timeout)
        sentinel.setdefault("socket_connect_timeout", connect_timeout)
        transport["sentinel_kwargs"] = sentinel
    conf: dict[str, Any] = {**options, **OVERRIDES}
    conf["broker_url"] = ";".join([url, *alternates]) if alternates else url
    conf["broker_transport_options"] = transport
    conf["broker_connection_timeout"] = connect_timeout  # tlrun's: a probe waits this long, not the app's
    return conf


def key_prefix(url: str) -> str:
    """The app's `global_keyprefix` on Redis (kombu prepends it to every key of its own): tlrun's keys (the
    lease, the node-name claims) take it too, so that an ACL limited to the prefix lets them through."""
    options, _ = options_for(url)
    return str((options.get("broker_transport_options") or {}).get("global_keyprefix") or "")


# -- the record: for commands that must not import the app --------------------------------------------------
def without_secrets(options: Mapping[str, Any]) -> dict[str, Any]:
    def clean(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if key and any(word in key.lower() for word in _SECRET_WORDS) and value:
            return REMOVED
        return value

    cleaned: dict[str, Any] = clean(dict(options))
    if "alternates" in cleaned:
        from tlrun.redact import redact_url

        cleaned["alternates"] = [redact_url(u) for u in cleaned["alternates"]]
    return cleaned


def targets(url: str) -> list[str]:
    """Every URL a connection to `url` may reach: it, then the app's failover URLs."""
    options, _ = options_for(url)
    return [url, *[str(u) for u in options.get("alternates") or []]]


def carries_secret(url: str) -> bool:
    """A connection to `url` would send a secret: a password in one of its URLs, or in the app's options
    (a Sentinel password, a TLS key's passphrase)."""
    from urllib.parse import urlsplit

    options, _ = options_for(url)
    for target in targets(url):
        try:
            if urlsplit(target).password:
                return True
        except ValueError:
            return True  # unreadable: assume it does
    return without_secrets(options) != options


def has_removed(options: Any) -> bool:
    if isinstance(options, Mapping):
        return any(has_removed(v) for v in options.values())
    if isinstance(options, list):
        return any(has_removed(v) for v in options)
    return options == REMOVED or (isinstance(options, str) and "***" in options)


def record_path(lock_dir: Path, project_id: str) -> Path:
    return lock_dir / f"{project_id}.broker.json"


def write_record(path: Path, url: str, options: Mapping[str, Any]) -> None:
    from tlrun.redact import redact_url

    text = json.dumps({"url": redact_url(url), "options": without_secrets(options)}, sort_keys=True)
    safefile.write_atomic(path, text + "\n", mode=0o600)


def read_record(path: Path, url: str) -> dict[str, Any] | None:
    """The recorded options for `url` (the same broker, as redacted), or None: none recorded, another
    broker's, or a secret removed that only the app can give back."""
    from tlrun.redact import redact_url

    raw = safefile.read_private(path, 256 * 1024)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("url") != redact_url(url) or not isinstance(data.get("options"), dict):
        return None
    options: dict[str, Any] = data["options"]
    return None if has_removed(options) else options


def learn(url: str, record: Path, load: Any, app_first: bool = False) -> str | None:
    """Register the app's options for `url`, for a command that talks to the broker: the record (when it has
    them) or `load()` (the app's conf; may raise), in the order asked, else the URL alone. Returns a note to
    say once, or None."""
    if known(url):
        return None
    recorded = read_record(record, url)
    if recorded is not None and not app_first:
        register(url, recorded, "record")
        return None
    try:
        conf = load()
    except Exception as exc:
        if recorded is not None:
            register(url, recorded, "record")
            return None
        register(url, {}, "url")
        return f"the app's broker settings are not known ({exc}): tlrun talks to the broker with its URL alone"
    register(url, options_from_conf(conf), "app")
    return None


def encode(options: Mapping[str, Any]) -> str:
    """One line for the hold socket (entry.py to hold.py)."""
    return json.dumps(dict(options), separators=(",", ":"))


def decode(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def remove_record(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
