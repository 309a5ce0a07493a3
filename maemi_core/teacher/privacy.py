"""Private images never leave the premises unless the profile explicitly says they may.

A teacher endpoint counts as on premises when its host is this machine (a loopback address
or one of this host's own addresses) or is listed in ``teacher.on_prem_hosts``. The check
runs before any client is created, so a refused configuration sends nothing.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse

from maemi_core.config import MaemiConfig


class PrivacyError(PermissionError):
    """A private dataset would be sent to an external teacher."""


def _own_addresses() -> set[str]:
    addrs = {"127.0.0.1", "::1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addrs.add(info[4][0])
    except OSError:
        pass
    return addrs


def is_on_prem(base_url: str, allow_hosts: list[str] | tuple[str, ...] = ()) -> bool:
    host = urlparse(base_url).hostname
    if not host:
        return False
    if host in allow_hosts or host in ("localhost", socket.gethostname()):
        return True
    try:
        ip = ipaddress.ip_address(host)
        return ip.is_loopback or str(ip) in _own_addresses()
    except ValueError:
        pass
    try:  # a name: on premises only if every address it resolves to is this machine
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    own = _own_addresses()
    return bool(resolved) and all(ipaddress.ip_address(a).is_loopback or a in own for a in resolved)


def check_teacher_privacy(cfg: MaemiConfig) -> None:
    """Raise :class:`PrivacyError` if ``cfg`` would send a private dataset off the premises."""
    t = cfg.teacher
    if t.kind != "openai" or not cfg.dataset.private or t.allow_external_teacher:
        return
    if not is_on_prem(t.base_url or "", t.on_prem_hosts):
        host = urlparse(t.base_url or "").hostname
        raise PrivacyError(
            f"dataset '{cfg.dataset.name}' is private (dataset.private: true) and teacher.base_url points at "
            f"{host!r}, which is not this host nor listed in teacher.on_prem_hosts. No image was sent. "
            f"To use this teacher anyway set teacher.allow_external_teacher: true in {cfg.config_path}; "
            f"to declare it an on-prem server add {host!r} to teacher.on_prem_hosts; or use teacher.kind: measurement."
        )
