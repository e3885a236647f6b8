"""Find a network's registry on the LAN with mDNS/DNS-SD (DESIGN.md flows 1 and 2).

The registry advertises its Join address as a ``_transmural._tcp.local.``
service. The TXT record carries ``fp`` (SHA-256 of the network CA
certificate, 64 lowercase hex), ``v`` (this record's format) and optionally
``name`` (the network's name), so that a joining node holding an invite picks
*its* network's registry when several networks share one LAN.

mDNS is unauthenticated: anyone on the LAN can advertise any fingerprint. A
match here only selects an address to dial; ``join`` still checks the
registry's certificate against the fingerprint pinned in the invite
(``pki.bootstrap_ca``). Nothing found here is trusted.

Interfaces are always explicit: python-zeroconf's default answers on every
interface, and a registry should only be visible where its operator chose.
Note that even then zeroconf's shared listen socket binds 0.0.0.0:5353
(multicast group joined on the chosen interfaces only); the tests therefore
run in a private network namespace holding nothing but ``lo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket

from zeroconf import DNSQuestionType, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from transmural.errors import ConfigError, InvalidInput, Unavailable

log = logging.getLogger(__name__)

SERVICE_TYPE = "_transmural._tcp.local."
#: Version of the TXT record layout; a finder ignores records of another version.
TXT_VERSION = "1"
DEFAULT_INSTANCE_NAME = "Transmural registry"

# Timing: module-level so that tests can shrink them. Read at call time.
#: How long ``find_registry`` browses by default.
BROWSE_TIMEOUT_S = 5.0
#: How long to wait for one seen service's SRV/TXT/A records.
REQUEST_TIMEOUT_S = 1.0
#: Bound on probing for a unique instance name (zeroconf takes ~1.2 s).
REGISTER_TIMEOUT_S = 10.0
#: Bound on the goodbye broadcasts when an advertisement stops (~0.25 s).
UNREGISTER_TIMEOUT_S = 2.0

#: Ask for multicast answers: a unicast answer to a node on the registry's own
#: machine reaches only one of the sockets sharing port 5353 (RFC 6762 s15),
#: often not the asker's.
_ASK = DNSQuestionType.QM
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
#: A TXT string holds at most 255 bytes, "name=" included.
_MAX_NETWORK_NAME_BYTES = 200


class RegistryAdvertisement:
    """Advertises one registry's Join address on the given interfaces until stopped."""

    def __init__(
        self,
        host: str,
        port: int,
        ca_fingerprint: str,
        interfaces: list[str],
        instance_name: str = DEFAULT_INSTANCE_NAME,
        network_name: str | None = None,
    ) -> None:
        self._interfaces = _check_interfaces(interfaces)
        fingerprint = _check_fingerprint(ca_fingerprint)
        address = _check_host(host)
        if not 0 < len(instance_name.encode()) <= 63:
            raise ConfigError("an mDNS instance name is 1-63 bytes")
        if not 0 < port < 65536:
            raise ConfigError(f"advertised port must be 1-65535, got {port}")
        properties = {"fp": fingerprint, "v": TXT_VERSION}
        if network_name is not None:
            if len(network_name.encode()) > _MAX_NETWORK_NAME_BYTES:
                raise ConfigError("network name is too long for an mDNS TXT record")
            properties["name"] = network_name
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance_name}.{SERVICE_TYPE}",
            port=port,
            parsed_addresses=[address],
            properties=properties,
            # Unique per network and port: a shared host name would let two
            # registries' address records overwrite each other.
            server=f"transmural-{fingerprint[:16]}-{port}.local.",
        )
        self._zc: AsyncZeroconf | None = None
        self._announcing: asyncio.Future[object] | None = None

    @property
    def name(self) -> str:
        """The advertised service name; gets a ``-2`` suffix if another host holds it.

        Two registries on one machine cannot detect a clash (the probe's unicast
        answer reaches only one socket on port 5353): give them distinct names.
        """
        return self._info.name

    async def start(self) -> None:
        """Claim a unique name and answer queries; announcements finish in the background."""
        if self._zc is not None:
            return
        zc = _open(self._interfaces)
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT_S):
                announce = await zc.async_register_service(self._info, allow_name_change=True)
        except TimeoutError:
            await zc.async_close()
            raise Unavailable(f"could not claim an mDNS name in {REGISTER_TIMEOUT_S} s") from None
        except BaseException:
            await zc.async_close()
            raise
        self._zc = zc
        self._announcing = asyncio.ensure_future(announce)
        log.info(
            "advertising registry %s:%d as %r on %s",
            self._info.parsed_addresses()[0],
            self._info.port,
            self._info.name,
            ", ".join(self._interfaces),
        )

    async def stop(self) -> None:
        """Send goodbyes so browsers drop the registry now, not at TTL expiry; then close."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._announcing is not None:
            # An announcement sent after the goodbye would bring the record back.
            self._announcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcing
            self._announcing = None
        try:
            async with asyncio.timeout(UNREGISTER_TIMEOUT_S):
                await (await zc.async_unregister_service(self._info))
        except TimeoutError:
            log.warning("registry advertisement %r: goodbye not sent in time", self._info.name)
        finally:
            await zc.async_close()
        log.info("stopped advertising registry %r", self._info.name)


async def find_registry(
    ca_fingerprint: str, interfaces: list[str], timeout_s: float | None = None
) -> str | None:
    """The "host:port" of the first registry advertising this CA fingerprint, or None.

    Registries of other networks (another ``fp``) or another record version
    are skipped. Returns None when no match answers within ``timeout_s``
    (default ``BROWSE_TIMEOUT_S``, read at call time so tests can shrink it).
    """
    if timeout_s is None:
        timeout_s = BROWSE_TIMEOUT_S
    wanted = _check_fingerprint(ca_fingerprint)
    checked = _check_interfaces(interfaces)
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()
    resolving: set[asyncio.Task[None]] = set()
    zc = _open(checked)

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zc.zeroconf, int(REQUEST_TIMEOUT_S * 1000), _ASK):
            log.debug("registry %r did not answer with its address in time", name)
            return
        txt = info.decoded_properties
        addresses = info.parsed_addresses()
        if txt.get("v") != TXT_VERSION:
            log.debug("ignoring %r: TXT record version %r", name, txt.get("v"))
        elif txt.get("fp") != wanted:
            log.debug("ignoring %r: another network (fp=%s)", name, txt.get("fp"))
        elif not addresses or info.port is None:
            log.debug("ignoring %r: no address", name)
        elif not found.done():
            found.set_result(_join_address(addresses[0], info.port))

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            task = loop.create_task(resolve(name))
            resolving.add(task)
            task.add_done_callback(resolving.discard)

    browser = AsyncServiceBrowser(
        zc.zeroconf, SERVICE_TYPE, handlers=[on_change], question_type=_ASK
    )
    try:
        async with asyncio.timeout(timeout_s):
            address = await found
    except TimeoutError:
        log.info("no registry for CA %s… found in %.1f s", wanted[:16], timeout_s)
        return None
    finally:
        await browser.async_cancel()
        for task in resolving:
            task.cancel()
        await asyncio.gather(*resolving, return_exceptions=True)
        await zc.async_close()
    log.info("found registry for CA %s… at %s", wanted[:16], address)
    return address


def _open(interfaces: list[str]) -> AsyncZeroconf:
    try:
        return AsyncZeroconf(interfaces=list(interfaces))
    except OSError as exc:
        raise Unavailable(f"cannot open mDNS sockets on {', '.join(interfaces)}: {exc}") from exc


def _check_interfaces(interfaces: list[str]) -> list[str]:
    """IP addresses of this machine; an unknown one would make zeroconf silently deaf."""
    if not interfaces:
        raise ConfigError("name at least one interface address for mDNS (e.g. 192.168.1.10)")
    for interface in interfaces:
        try:
            version = ipaddress.ip_address(interface).version
        except ValueError:
            raise ConfigError(f"mDNS interface must be an IP address, got {interface!r}") from None
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        # Binding a throwaway UDP socket sends nothing; it only asks the kernel.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((interface, 0))
            except OSError:
                raise ConfigError(f"{interface} is not an address of this machine") from None
    return list(interfaces)


def _check_fingerprint(value: str) -> str:
    fingerprint = value.strip().lower()
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise InvalidInput("a CA fingerprint is 64 hex digits (SHA-256)")
    return fingerprint


def _check_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"advertised host must be an IP address, got {host!r}") from None
    if address.is_unspecified:
        raise ConfigError(f"advertise an address nodes can dial, not {host}")
    return str(address)


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
