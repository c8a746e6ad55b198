"""Network access for downloads: the offline switches and a once-per-process reachability check.

The libraries tlbench downloads through retry a dead connection for a long time
(``huggingface_hub`` backs off for about a minute per file when nothing is cached; ``urllib``
has no timeout at all). So before a download tlbench asks :func:`unreachable` about the
host: one TCP connect with a :data:`CONNECT_TIMEOUT_S` timeout (to the HTTPS proxy when one
is configured), remembered for the rest of the process. An unreachable host makes the caller
fail at once with its usual message (what was looked for, how to fix it); nothing retries.

``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or ``TLBENCH_OFFLINE`` set to 1/true/yes/on
(read at call time) turn downloads off without any connect.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from typing import Optional
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TLBENCH_OFFLINE")
CONNECT_TIMEOUT_S = 2.0
_TRUE = ("1", "true", "yes", "on")

# (host, port) -> None when a connect succeeded, else why it failed; filled once per process
_checked: dict[tuple[str, int], Optional[str]] = {}


def offline_var() -> Optional[str]:
    """The first of :data:`OFFLINE_VARS` that is set to a true value, else None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def is_offline() -> bool:
    """True when downloads are switched off (:data:`OFFLINE_VARS`, checked at call time)."""
    return offline_var() is not None


def _connect(host: str, port: int, timeout: float) -> None:
    """One TCP connection, closed at once (tests replace this function)."""
    socket.create_connection((host, port), timeout=timeout).close()


def _target(url: str) -> tuple[str, int]:
    """Where a download of ``url`` would connect first: its host, or the configured proxy."""
    u = urlparse(url)
    scheme = u.scheme or "https"
    host = u.hostname or url
    default = 443 if scheme == "https" else 80
    proxies = urllib.request.getproxies()  # *_proxy environment variables (and the OS settings)
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            return p.hostname, p.port or (443 if p.scheme == "https" else 80)
    return host, u.port or default


def unreachable(url: str) -> Optional[str]:
    """None when a download of ``url`` can connect; else one sentence saying why not.

    Checked once per host (or proxy) and process: the first call makes one connect with a
    :data:`CONNECT_TIMEOUT_S` timeout, later calls answer from memory."""
    key = _target(url)
    if key not in _checked:
        error = _try_connect(*key)
        _checked[key] = None if error is None else (
            f"the network is unreachable (one connection attempt to {key[0]}:{key[1]} with a "
            f"{CONNECT_TIMEOUT_S:g} s timeout: {error})")
    return _checked[key]


def _try_connect(host: str, port: int) -> Optional[str]:
    """None when one connect succeeds, else why not. Runs in a daemon thread so that a slow DNS
    lookup (which the socket timeout does not bound) cannot hold the caller either."""
    result: list[Optional[str]] = []

    def attempt() -> None:
        try:
            _connect(host, port, CONNECT_TIMEOUT_S)
            result.append(None)
        except OSError as e:  # DNS failure, refused, timeout, no route ...
            result.append(f"{type(e).__name__}: {e or 'timed out'}")

    worker = threading.Thread(target=attempt, name="tlbench-net-check", daemon=True)
    worker.start()
    worker.join(CONNECT_TIMEOUT_S + 0.5)
    return result[0] if result else f"no answer within {CONNECT_TIMEOUT_S + 0.5:g} s"


def mark_unreachable(url: str, why: str) -> None:
    """Remember that a download from ``url``'s host failed to connect (later ones fail at once)."""
    _checked[_target(url)] = why


def forget() -> None:
    """Drop what was learnt about the network (tests; a long-lived process after a network change)."""
    _checked.clear()
