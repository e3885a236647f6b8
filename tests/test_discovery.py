"""LAN discovery of the registry (flows 1 and 2), with real mDNS on a private loopback.

Every test runs in a network namespace of its own that holds nothing but
``lo``. Loopback multicast works on the host too, but zeroconf's listen
socket binds 0.0.0.0:5353 and answers unicast queries through it, so only a
namespace without other interfaces guarantees that no packet leaves the
machine (and that the host's port 5353 is left alone).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import hashlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator

import pytest
from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

from transmural import discovery
from transmural.discovery import SERVICE_TYPE, RegistryAdvertisement, find_registry
from transmural.errors import ConfigError, InvalidInput

LOOPBACK = ["127.0.0.1"]
FP_A = hashlib.sha256(b"network A CA").hexdigest()
FP_B = hashlib.sha256(b"network B CA").hexdigest()

_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_IFF_UP, _IFF_MULTICAST = 0x1, 0x1000


@pytest.fixture(autouse=True)
def private_loopback() -> Iterator[None]:
    """Run the test (its main thread, where the event loop runs) in a fresh netns with only lo.

    unshare() moves only the calling thread; the namespace vanishes with its
    last socket, so nothing is left behind even if the run is killed.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces need Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:
            reason = os.strerror(ctypes.get_errno())
            pytest.skip(f"cannot create a network namespace ({reason}); needs CAP_SYS_ADMIN")
        try:
            _bring_up_loopback()
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
            yield
        finally:
            if libc.setns(original, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
            assert os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(original).st_ino
    finally:
        os.close(original)


def _bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        (flags,) = struct.unpack_from("16xH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))
        flags |= _IFF_UP | _IFF_MULTICAST
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags))


def assert_no_tasks_left() -> None:
    left = asyncio.all_tasks() - {asyncio.current_task()}
    assert not left, f"discovery left tasks running: {left}"


async def test_advertised_registry_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "REQUEST_TIMEOUT_S", 0.5)
    registry = RegistryAdvertisement("127.0.0.1", 7443, FP_A, LOOPBACK, network_name="Test net")
    await registry.start()
    try:
        assert await find_registry(FP_A, LOOPBACK, timeout_s=3.0) == "127.0.0.1:7443"
        # Fingerprints are compared case-insensitively (people paste them).
        assert await find_registry(FP_A.upper(), LOOPBACK, timeout_s=3.0) == "127.0.0.1:7443"
    finally:
        await registry.stop()
    assert_no_tasks_left()


async def test_registry_of_another_network_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=discovery.__name__)
    # Distinct instance names: two responders on one host cannot detect a name
    # clash, since the probe's unicast answer reaches only one of the sockets
    # sharing 127.0.0.1:5353 (RFC 6762 section 15).
    ours = RegistryAdvertisement("127.0.0.1", 7001, FP_A, LOOPBACK, "Registry A")
    other = RegistryAdvertisement("127.0.0.1", 7002, FP_B, LOOPBACK, "Registry B")
    await asyncio.gather(ours.start(), other.start())
    try:
        unknown = hashlib.sha256(b"network C CA").hexdigest()
        assert await find_registry(unknown, LOOPBACK, timeout_s=0.5) is None
        logged = "\n".join(r.getMessage() for r in caplog.records)
        for name in (ours.name, other.name):
            assert f"ignoring {name!r}: another network" in logged

        found = await asyncio.gather(
            find_registry(FP_A, LOOPBACK, timeout_s=3.0),
            find_registry(FP_B, LOOPBACK, timeout_s=3.0),
        )
        assert found == ["127.0.0.1:7001", "127.0.0.1:7002"]
    finally:
        await asyncio.gather(ours.stop(), other.stop())


async def test_nothing_found_returns_none_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "BROWSE_TIMEOUT_S", 0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await find_registry(FP_A, LOOPBACK) is None
    assert 0.5 <= loop.time() - started < 1.5
    assert_no_tasks_left()


async def test_stop_withdraws_the_registry() -> None:
    registry = RegistryAdvertisement("127.0.0.1", 7443, FP_A, LOOPBACK)
    await registry.start()
    watcher = AsyncZeroconf(interfaces=LOOPBACK)
    events: asyncio.Queue[ServiceStateChange] = asyncio.Queue()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        events.put_nowait(state_change)

    browser = AsyncServiceBrowser(watcher.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        async with asyncio.timeout(3.0):
            assert await events.get() is ServiceStateChange.Added
        await registry.stop()
        await registry.stop()  # a second stop is a no-op
        # The goodbye (TTL 0) makes browsers drop it after 1 s, not at TTL expiry.
        async with asyncio.timeout(3.0):
            while await events.get() is not ServiceStateChange.Removed:
                pass
    finally:
        await browser.async_cancel()
        await watcher.async_close()
        await registry.stop()
    assert await find_registry(FP_A, LOOPBACK, timeout_s=0.5) is None


@pytest.mark.parametrize(
    ("host", "port", "fingerprint", "interfaces", "error"),
    [
        ("127.0.0.1", 7443, FP_A, [], ConfigError),  # no silent "all interfaces"
        ("127.0.0.1", 7443, FP_A, ["eth0"], ConfigError),
        ("127.0.0.1", 7443, FP_A, ["192.0.2.55"], ConfigError),  # not on this machine
        ("0.0.0.0", 7443, FP_A, LOOPBACK, ConfigError),
        ("registry.example", 7443, FP_A, LOOPBACK, ConfigError),
        ("127.0.0.1", 0, FP_A, LOOPBACK, ConfigError),
        ("127.0.0.1", 7443, FP_A, ["::1", "nonsense"], ConfigError),
        ("127.0.0.1", 7443, FP_A[:63], LOOPBACK, InvalidInput),
        ("127.0.0.1", 7443, "z" * 64, LOOPBACK, InvalidInput),
    ],
)
def test_bad_settings_are_refused(
    host: str, port: int, fingerprint: str, interfaces: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        RegistryAdvertisement(host, port, fingerprint, interfaces)


@pytest.mark.parametrize("instance_name", ["", "x" * 64])
def test_bad_instance_name_is_refused(instance_name: str) -> None:
    with pytest.raises(ConfigError):
        RegistryAdvertisement("127.0.0.1", 7443, FP_A, LOOPBACK, instance_name)


async def test_find_refuses_bad_input() -> None:
    with pytest.raises(ConfigError):
        await find_registry(FP_A, [])
    with pytest.raises(InvalidInput):
        await find_registry("not a fingerprint", LOOPBACK)
