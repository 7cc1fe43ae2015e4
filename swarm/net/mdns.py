"""LAN discovery over mDNS/DNS-SD: advertise one opaque payload, report other instances' payloads.

Owns the zeroconf instance, the payload's TXT encoding and which interfaces mDNS may use. Service
type (derived by the caller from the token, see `service_type_from_tag`) and payload are opaque.

    svc = MdnsService(service_type, instance_name, payload, interface_ips, port, on_found)
    svc.start()          # ~0.5 s; False (one warning logged) where mDNS cannot run
    svc.update(payload)  # re-announce
    svc.close()          # goodbye packets, threads stopped (~0.25 s)

`on_found(payload)` runs on zeroconf's browser thread for each other instance of the type, again
when its TXT changes, possibly more than once; it may come before `start()` returns. Keep it
short, hand off to your event loop, never call `close()` from it; its exceptions are logged.

Interfaces: zeroconf sends and joins the group only on `interface_ips`, and a socket filter makes
its shared 0.0.0.0:5353 socket drop what arrives on any other interface (Linux).

Loopback (Linux 6.18, fresh network namespace, only `lo` up): mDNS on 127.0.0.1 works with `lo`
as it is -- no MULTICAST flag, no multicast route -- since zeroconf sets IP_MULTICAST_IF and
IP_MULTICAST_LOOP. Any number of processes on 127.0.0.1 find each other, and nothing is sent on
or heard from another interface. Where the group cannot be joined (e.g. `lo` down: ENODEV),
`start()` returns False after one warning. A later node is found in ~0.01-0.2 s after `start()`.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import ipaddress
import logging
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf._utils.name import service_type_name

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Payloads are sealed node records; 1 KiB keeps one announcement under a 1500-byte MTU.
MAX_PAYLOAD_BYTES = 1024
TXT_VERSION = b"cv=1"
_CHUNK_KEY = b"p"
# A TXT string is at most 255 bytes; "pN=" costs 3 of them.
_CHUNK_BYTES = 252
_MAX_CHUNKS = -(-MAX_PAYLOAD_BYTES // _CHUNK_BYTES)
_MAX_INSTANCE_BYTES = 63
_INFO_TIMEOUT_MS = 2000
_WILDCARDS = ("0.0.0.0", "::")
_LOOPBACK = "127.0.0.1"

# Linux constants Python does not name: setsockopt SO_ATTACH_FILTER and the classic BPF
# ancillary load of the receiving interface's index (SKF_AD_OFF + SKF_AD_IFINDEX).
_SO_ATTACH_FILTER = 26
_SKF_AD_IFINDEX = (-0x1000 + 8) & 0xFFFFFFFF
_PURGE_TIMEOUT_S = 5.0

_warned: set[str] = set()
_warned_lock = threading.Lock()


def service_type_from_tag(tag: bytes) -> str:
    """A valid DNS-SD service type for arbitrary bytes: '_c<13 base32 chars>._tcp.local.'.

    The name is 14 characters, inside the 15-character service-name limit of RFC 6763; the 'c'
    guarantees the letter the RFC requires. It is a hash, so it reveals nothing of `tag`.
    """
    digest = hashlib.sha256(b"covey/mdns-type/" + tag).digest()[:8]
    label = "c" + base64.b32encode(digest).decode("ascii").rstrip("=").lower()
    return f"_{label}._tcp.local."


def encode_txt(payload: bytes) -> bytes:
    """TXT rdata for `payload`: 'cv=1' then 'p0=<chunk>', 'p1=<chunk>', ... (binary values)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"mDNS payload is {len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
    chunks = [payload[i : i + _CHUNK_BYTES] for i in range(0, len(payload), _CHUNK_BYTES)]
    strings = [TXT_VERSION] + [b"%s%d=%s" % (_CHUNK_KEY, n, c) for n, c in enumerate(chunks)]
    return b"".join(bytes((len(s),)) + s for s in strings)


def split_txt(text: bytes) -> list[bytes] | None:
    """The character-strings of TXT rdata, or None if a length runs past the end."""
    strings: list[bytes] = []
    i = 0
    while i < len(text):
        end = i + 1 + text[i]
        if end > len(text):
            return None
        strings.append(text[i + 1 : end])
        i = end
    return strings


def decode_txt(text: bytes) -> bytes | None:
    """The payload `encode_txt` wrote, or None for anything malformed, foreign or oversized.

    Unknown keys are ignored (room for later fields); duplicate or missing chunks are not.
    """
    strings = split_txt(text)
    if strings is None or TXT_VERSION not in strings:
        return None
    chunks: dict[int, bytes] = {}
    for s in strings:
        key, sep, value = s.partition(b"=")
        if not sep or not key.startswith(_CHUNK_KEY):
            continue
        index = key[len(_CHUNK_KEY) :]
        if not index.isdigit() or len(index) > 2:
            continue
        n = int(index)
        if n in chunks or n >= _MAX_CHUNKS:
            return None
        chunks[n] = value
    if sorted(chunks) != list(range(len(chunks))):
        return None
    payload = b"".join(chunks[n] for n in range(len(chunks)))
    return payload if len(payload) <= MAX_PAYLOAD_BYTES else None


def host_ipv4_addresses() -> list[str]:
    """Every non-loopback IPv4 address of this host, in adapter order."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for addr in adapter.ips:
            if isinstance(addr.ip, str) and not ipaddress.IPv4Address(addr.ip).is_loopback:
                found.append(addr.ip)
    return found


def expand_listen_ip(ip: str, host_addresses: Sequence[str] | None = None) -> list[str]:
    """Concrete IPv4 addresses for a listen address; never returns a wildcard.

    0.0.0.0 (or ::) becomes every non-loopback IPv4 address of this host (`host_addresses`, or
    asked of the OS when None), falling back to 127.0.0.1 on a host with no network so local
    nodes still meet. A concrete IPv4 address is returned as is; other IPv6 addresses give [].
    """
    if ip in _WILDCARDS:
        addresses = host_ipv4_addresses() if host_addresses is None else list(host_addresses)
        return _dedupe(addresses) or [_LOOPBACK]
    parsed = ipaddress.ip_address(ip)
    return [str(parsed)] if parsed.version == 4 else []


def mdns_interfaces_for(
    listen_ips: Sequence[str], host_addresses: Sequence[str] | None = None
) -> list[str]:
    """The IPv4 addresses zeroconf should use for nodes listening on `listen_ips`.

    127.0.0.1 -> ["127.0.0.1"] (loopback only); a specific address -> itself; 0.0.0.0 -> every
    non-loopback IPv4 address (so not loopback: pass 127.0.0.1 too to also meet loopback-only
    nodes). Pure when `host_addresses` is given.
    """
    return _dedupe([a for ip in listen_ips for a in expand_listen_ip(ip, host_addresses)])


def _dedupe(items: Iterable[_T]) -> list[_T]:
    return list(dict.fromkeys(items))


def _concrete_ipv4(ip: str) -> str:
    parsed = ipaddress.ip_address(ip)
    if parsed.version != 4 or parsed.is_unspecified:
        raise ValueError(f"mDNS interface must be a concrete IPv4 address, not {ip!r}")
    return str(parsed)


def _warn_once(key: str, message: str, *args: object) -> None:
    with _warned_lock:
        if key in _warned:
            log.debug(message, *args)
            return
        _warned.add(key)
    log.warning(message, *args)


def interface_indexes(ips: Sequence[str]) -> list[int]:
    """OS interface indexes of the adapters holding `ips` (addresses not found are skipped)."""
    wanted = set(ips)
    indexes = []
    for adapter in ifaddr.get_adapters():
        if any(isinstance(a.ip, str) and a.ip in wanted for a in adapter.ips):
            indexes.append(adapter.index or socket.if_nametoindex(adapter.name))
    return _dedupe(indexes)


def ifindex_filter(indexes: Sequence[int]) -> bytes:
    """Classic BPF socket filter: accept a packet only if it arrived on one of `indexes`.

    ld ifidx; jeq idx_i -> accept (for each i); ret 0; accept: ret -1.
    """
    n = len(indexes)
    insns = [(0x20, 0, 0, _SKF_AD_IFINDEX)]
    insns += [(0x15, n - i, 0, idx) for i, idx in enumerate(indexes)]
    insns += [(0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]
    return b"".join(struct.pack("HBBI", *insn) for insn in insns)


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _confine_listen_socket(zc: Zeroconf, ips: Sequence[str]) -> None:
    """Make zeroconf's shared 0.0.0.0:5353 receive socket drop what arrives on other interfaces.

    Unfiltered, it receives the group on every interface where anything on the host (avahi,
    another node) joined it, and unicast to any local address: a loopback-only node would find
    LAN nodes and answer LAN queries. IP_MULTICAST_ALL=0 is not the fix: with it, Linux's UDP
    early demux hands a group packet to an arbitrary member of the SO_REUSEPORT group (seen on
    6.18), so a LAN node sharing the host with a loopback node misses its packets. Then empty the
    cache, which may hold records heard before the filter was attached.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        indexes = interface_indexes(ips)
        if not indexes:
            raise ValueError("no interface holds these addresses")
        # Private attribute: the engine keeps no public handle on the shared receive socket.
        sock: socket.socket = zc.engine._listen_transport.sock  # type: ignore[union-attr]
        _attach_filter(sock, ifindex_filter(indexes))
        if zc.loop is None:
            raise ValueError("zeroconf has no event loop yet")
        asyncio.run_coroutine_threadsafe(_purge_cache(zc), zc.loop).result(_PURGE_TIMEOUT_S)
    except (AttributeError, OSError, ValueError, TimeoutError) as e:
        _warn_once("confine", "mDNS: cannot confine receiving to %s: %s", list(ips), e)


async def _purge_cache(zc: Zeroconf) -> None:
    cache = zc.cache
    cache.async_remove_records([r for n in cache.names() for r in cache.async_entries_with_name(n)])


class MdnsService:
    """Advertise `payload` under `instance_name` and report other instances' payloads.

    `service_type` like '_cxxxxxxxxxxxxx._tcp.local.' (see `service_type_from_tag`);
    `instance_name` unique per node (a peer id), at most 63 bytes; `interface_ips` concrete IPv4
    addresses (see `mdns_interfaces_for`), also advertised as the A records; `port` goes in SRV.
    start/update/close are blocking and safe from any thread but zeroconf's own.
    """

    def __init__(
        self,
        service_type: str,
        instance_name: str,
        payload: bytes,
        interface_ips: Sequence[str],
        port: int,
        on_found: Callable[[bytes], None],
    ) -> None:
        try:
            service_type_name(service_type, strict=True)
            service_type_name(f"{instance_name}.{service_type}", strict=True)
        except BadTypeInNameException as e:
            raise ValueError(f"bad mDNS service type or instance name: {e}") from e
        if len(instance_name.encode()) > _MAX_INSTANCE_BYTES:
            raise ValueError(f"mDNS instance name longer than {_MAX_INSTANCE_BYTES} bytes")
        self._text = encode_txt(payload)
        self._type = service_type
        self._name = f"{instance_name}.{service_type}"
        self._interfaces = _dedupe([_concrete_ipv4(ip) for ip in interface_ips])
        self._port = port
        self._on_found = on_found
        host = hashlib.sha256(instance_name.encode()).hexdigest()[:16]
        self._server = f"covey-{host}.local."
        self._lock = threading.Lock()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None

    def start(self) -> bool:
        """Advertise and browse; False (one warning logged) if mDNS cannot run here."""
        with self._lock:
            if self._zc is not None:
                return True
            if not self._interfaces:
                _warn_once("no-interfaces", "mDNS: no IPv4 interface to use; LAN discovery off")
                return False
            try:
                zc = Zeroconf(
                    interfaces=list(self._interfaces),
                    ip_version=IPVersion.V4Only,
                    # Its own thread, even if the caller's thread runs an asyncio loop.
                    use_asyncio=False,
                )
            except OSError as e:
                _warn_once(
                    "start", "mDNS unavailable on %s (%s); LAN discovery off", self._interfaces, e
                )
                return False
            if not zc.engine.senders:
                zc.close()
                _warn_once(
                    "no-senders",
                    "mDNS: cannot send on any of %s; LAN discovery off",
                    self._interfaces,
                )
                return False
            _confine_listen_socket(zc, self._interfaces)
            try:
                self._advertise_and_browse(zc)
            except Exception as e:  # a zeroconf failure must not take the node down
                if self._browser is not None:
                    self._browser.cancel()
                self._browser = self._info = None
                zc.close()
                _warn_once("register", "mDNS failed to start (%r); LAN discovery off", e)
                return False
            self._zc = zc
            return True

    def _advertise_and_browse(self, zc: Zeroconf) -> None:
        # Browse first so the others' answers arrive while our announcements go out. Ask for
        # multicast answers (QM) only: nodes on one host share <ip>:5353 through SO_REUSEPORT,
        # and a unicast answer would reach just one of them.
        self._browser = ServiceBrowser(
            zc, self._type, handlers=[self._on_change], question_type=DNSQuestionType.QM
        )
        self._info = self._service_info(self._text)
        # Instance names are unique peer ids, so skip the ~1.7 s of probing for conflicts.
        zc.register_service(self._info, cooperating_responders=True)

    def update(self, payload: bytes) -> None:
        """Replace the advertised payload and announce it (a no-op before start)."""
        text = encode_txt(payload)
        with self._lock:
            self._text = text
            if self._zc is None:
                return
            self._info = self._service_info(text)
            self._zc.update_service(self._info)

    def close(self) -> None:
        """Stop browsing, send goodbyes, stop zeroconf's threads. Idempotent."""
        with self._lock:
            zc, browser = self._zc, self._browser
            self._zc = self._browser = self._info = None
        if browser is not None:
            browser.cancel()
        if zc is not None:
            zc.close()

    def __enter__(self) -> MdnsService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _service_info(self, text: bytes) -> ServiceInfo:
        return ServiceInfo(
            self._type,
            self._name,
            port=self._port,
            properties=text,
            server=self._server,
            parsed_addresses=list(self._interfaces),
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Runs on the browser's thread: never let anything escape into zeroconf.
        if state_change is ServiceStateChange.Removed or name.lower() == self._name.lower():
            return
        try:
            info = zeroconf.get_service_info(
                service_type, name, timeout=_INFO_TIMEOUT_MS, question_type=DNSQuestionType.QM
            )
        except Exception as e:  # zeroconf closing under us, or a record it could not parse
            log.debug("mDNS: no info for %s: %s", name, e)
            return
        payload = decode_txt(info.text) if info is not None else None
        if payload is None:
            log.debug("mDNS: ignoring %s: no or malformed TXT payload", name)
            return
        try:
            self._on_found(payload)
        except Exception:
            log.exception("mDNS: on_found raised for %s", name)
