"""HTTP(S) proxy selection with the rules Docker uses (Go's ``httpproxy.FromEnvironment``).

* ``HTTPS_PROXY`` (or ``https_proxy``) for https requests, ``HTTP_PROXY`` (or
  ``http_proxy``) for http ones; the upper-case name wins, as in Go. A value without a
  scheme means ``http://`` (so do curl and Go); https requests go through it with CONNECT.
* ``NO_PROXY`` (or ``no_proxy``): comma-separated; ``*`` means every host; ``example.com``
  matches it and its subdomains, ``.example.com`` only the subdomains; ``host:port`` only
  that port; IP addresses and CIDR ranges match addresses written in the URL.
* ``localhost`` and loopback addresses are never proxied (Go's rule; curl would proxy
  them unless listed): a proxy's loopback is not ours.

Pure logic: ``ProxySettings.from_environ`` takes the mapping; the CLI passes os.environ.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

from ..errors import UsageError

IPNet = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
DEFAULT_PORTS = {"http": 80, "https": 443}


def _env(environ: Mapping[str, str], name: str) -> str:
    return (environ.get(name.upper()) or environ.get(name.lower()) or "").strip()


def _proxy_url(value: str, var: str) -> Optional[str]:
    if not value:
        return None
    if "://" not in value:
        value = "http://" + value
    scheme = value.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"{var}={value!r}: {scheme} proxies are not supported",
                         "use an http:// (or https://) proxy URL")
    return value


@dataclass(frozen=True)
class ProxySettings:
    """The proxies requests go through; empty: none (direct connections)."""

    https_proxy: Optional[str] = None
    http_proxy: Optional[str] = None
    no_proxy: str = ""

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "ProxySettings":
        env = os.environ if environ is None else environ
        return cls(https_proxy=_proxy_url(_env(env, "https_proxy"), "HTTPS_PROXY"),
                   http_proxy=_proxy_url(_env(env, "http_proxy"), "HTTP_PROXY"),
                   no_proxy=_env(env, "no_proxy"))

    def proxy_for(self, scheme: str, host: str, port: Optional[int] = None) -> Optional[str]:
        """The proxy URL for a request to ``scheme://host[:port]``, or None (direct)."""
        proxy = self.https_proxy if scheme == "https" else self.http_proxy if scheme == "http" else None
        if proxy is None or not use_proxy(host, port or DEFAULT_PORTS.get(scheme, 0), self.no_proxy):
            return None
        return proxy


def use_proxy(host: str, port: int, no_proxy: str) -> bool:
    """False when ``host:port`` is exempt: loopback, or matched by a NO_PROXY entry."""
    host = host.strip().lower().strip("[]").rstrip(".")
    if host == "localhost":
        return False
    ip = _ip(host)
    if ip is not None and ip.is_loopback:
        return False
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return False
        net = _cidr(entry)
        if net is not None:
            if ip is not None and ip in net:
                return False
            continue
        e_host, e_port = _split_port(entry)
        if not e_host:
            continue
        if e_port is not None and e_port != port:
            continue
        e_ip = _ip(e_host)
        if e_ip is not None:
            if ip is not None and ip == e_ip:
                return False
            continue
        if e_host.startswith("*."):
            e_host = e_host[1:]
        if e_host.startswith("."):
            if host.endswith(e_host):
                return False
        elif host == e_host or host.endswith("." + e_host):
            return False
    return True


def _ip(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _cidr(text: str) -> Optional[IPNet]:
    if "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _split_port(entry: str) -> Tuple[str, Optional[int]]:
    """``host[:port]`` / ``[v6]:port`` / bare IPv6 → (host, port or None)."""
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            return entry, None
        rest = entry[end + 1:]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        return entry[1:end], port
    if entry.count(":") == 1:
        h, _, p = entry.partition(":")
        return h, int(p) if p.isdigit() else None
    return entry, None
