"""The rules that keep a web page from using the HTTP API through a visitor's browser:
the ``Host`` a request names (against DNS rebinding) and the ``Origin`` it comes from
(against cross-site requests). See :class:`BrowserRules`."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

import h11

from meshllm.api.errors import ApiError


def url_host(host: str) -> str:
    """*host* as it goes in a URL (IPv6 addresses in brackets)."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


# -- browser rules ----------------------------------------------------------------------------
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST_HEADER = re.compile(
    r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?"
)
PREFLIGHT_MAX_AGE_S = 600  # how long a browser may keep an allowed preflight's answer


class BrowserRules:
    """What keeps a web page from using the API through a visitor's browser.

    - ``Host`` must name the server as it listens (its address and port; for a loopback
      address also ``localhost``, ``127.0.0.1`` and ``[::1]``; for a wildcard address any IP
      address) or be in *allowed_hosts*. A page on a name the attacker re-points at this
      machine (DNS rebinding) sends that name: refused. A request with no Host (HTTP/1.0)
      is refused too, since the name it was sent to cannot be checked.
    - A request with an ``Origin`` (a browser's, from a page) is refused unless the origin is
      in *allowed_origins*; its responses then carry ``Access-Control-Allow-Origin``.
      No Origin: not a page's cross-site request (curl, SDKs, servers).
    """

    def __init__(
        self,
        host: str,
        port: int,
        allowed_hosts: tuple[str, ...] = (),
        allowed_origins: tuple[str, ...] = (),
    ):
        self.host = host
        self.port = port
        self._config = (allowed_hosts, allowed_origins)
        self._names, self._any_ip = _own_names(host)
        self._extra: set[tuple[str, int | None]] = set()  # port None: any port
        for entry in allowed_hosts:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"not HOST or HOST:PORT: {entry!r}")
            self._extra.add(parsed)
        self._origins = {origin_key(o) for o in allowed_origins}

    def on_port(self, port: int) -> BrowserRules:
        """The same rules for a server bound to *port* (asked for port 0)."""
        return BrowserRules(self.host, port, *self._config)

    def host_allowed(self, value: str) -> bool:
        parsed = split_host(value)
        if parsed is None:
            return False
        name, given = parsed
        port = 80 if given is None else given  # the port a Host without one means
        if (name, None) in self._extra or (name, port) in self._extra:
            return True
        return port == self.port and (name in self._names or (self._any_ip and _is_ip(name)))

    def admit(self, head: h11.Request) -> list[tuple[str, str]]:
        """Refuse (ApiError) a request a web page may have made behind the visitor's back;
        otherwise the CORS headers its response must carry."""
        host = single_header(head, b"host")
        if host is None:
            raise ApiError(
                421, "a Host header is required (HTTP/1.0 requests too)", code="invalid_host"
            )
        if not self.host_allowed(host):
            raise ApiError(
                421,
                f"this server does not answer for Host {host[:100]!r}: use "
                f"{url_host(self.host)}:{self.port}, or add the name to [api] allowed_hosts",
                code="invalid_host",
            )
        origin = single_header(head, b"origin")
        if origin is None:
            return []
        if origin_key(origin) not in self._origins:
            raise ApiError(
                403,
                f"requests from web pages at {origin[:100]!r} are refused: add it to "
                f"[api] allowed_origins to allow them",
                code="origin_not_allowed",
            )
        return [("access-control-allow-origin", origin), ("vary", "origin")]

    @staticmethod
    def preflight_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
        """The answer to an allowed origin's preflight (the origin headers come from admit):
        the request headers it asks for are allowed, since the origin is trusted."""
        asked = headers.get("access-control-request-headers")
        return [
            ("access-control-allow-methods", "GET, HEAD, POST"),
            *([("access-control-allow-headers", asked)] if asked else []),
            ("access-control-max-age", str(PREFLIGHT_MAX_AGE_S)),
        ]


def single_header(head: h11.Request, name: bytes) -> str | None:
    values = [v.decode("latin-1") for k, v in head.headers if k == name]
    if len(values) > 1:
        raise ApiError(400, f"more than one {name.decode()} header", code="bad_http")
    return values[0] if values else None


def split_host(value: str) -> tuple[str, int | None] | None:
    """The name (lower case, IPv6 without brackets, no final dot) and port (None if not
    given) of a ``Host`` header or an ``allowed_hosts`` entry; None for anything else."""
    match = _HOST_HEADER.fullmatch(value.strip().lower())
    if match is None:
        return None
    if match["v6"] is not None and not (_is_ip(match["v6"]) and ":" in match["v6"]):
        return None  # brackets hold an IPv6 address only
    name = _canonical(match["v6"] or match["name"].rstrip("."))
    port = None if match["port"] is None else int(match["port"])
    if port is not None and not 0 < port <= 65535:
        return None
    return name, port


def origin_key(origin: str) -> str:
    """*origin* as compared: lower case, without its scheme's default port (browsers leave
    it out)."""
    key = origin.strip().lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if key.startswith(scheme) and key.endswith(port):
            return key.removesuffix(port)
    return key


def _own_names(host: str) -> tuple[frozenset[str], bool]:
    """The names a Host header may give for a server listening on *host*, and whether any
    IP address is one (a wildcard address listens on all of this machine's)."""
    name = _canonical(host.lower().rstrip("."))
    if not _is_ip(name):
        return frozenset({name} | (_LOOPBACK_NAMES if name == "localhost" else set())), False
    ip = ipaddress.ip_address(name)
    if ip.is_unspecified:
        return _LOOPBACK_NAMES, True
    return frozenset({name} | (_LOOPBACK_NAMES if ip.is_loopback else set())), False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _canonical(name: str) -> str:
    """An IP address in one spelling (``0:0::1`` is ``::1``); a name as it is."""
    return str(ipaddress.ip_address(name)) if _is_ip(name) else name
