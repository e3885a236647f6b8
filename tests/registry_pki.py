"""Test PKI for registry tests: networks and node certificates minted at test time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import grpc
import pytest

from registry.network import NetworkFiles
from transmural import pki, transport


class OffsetClock:
    """The system clock moved by ``offset`` seconds; tests move it further with ``advance``."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def mint_node(
    network: NetworkFiles,
    node_id: str,
    organisation_id: str | None = None,
    organisation_name: str | None = None,
    *,
    now: datetime | None = None,
    days: int = pki.NODE_DAYS,
) -> transport.TlsFiles:
    """A node certificate signed by ``network``'s CA directly (no invite, no registry)."""
    key = pki.new_private_key()
    cert = pki.issue_node_certificate(
        network.ca_key,
        network.ca_cert,
        pki.make_csr(key, node_id),
        node_id,
        organisation_id or f"URA-{node_id}",
        organisation_name or f"Facility {node_id}",
        now=now,
        days=days,
    )
    return transport.TlsFiles(pki.pem(network.ca_cert), pki.pem(cert), pki.key_pem(key))


def registry_channel(
    address: str, tls: transport.TlsFiles | None, trust: NetworkFiles | None = None
) -> grpc.aio.Channel:
    """A channel to a registry's mutual-TLS port presenting ``tls``'s certificate.

    ``trust`` replaces the CA the channel trusts (to present a foreign
    certificate to this network's registry).
    """
    if tls is not None and trust is not None:
        tls = transport.TlsFiles(pki.pem(trust.ca_cert), tls.cert_pem, tls.key_pem)
    return transport.open_channel(address, tls, pki.REGISTRY_DNS_NAME)


async def wait_for(predicate: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> float:
    """Poll ``predicate`` until true; the seconds it took. Fails the test after ``seconds``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            while True:  # a change in another process has no event to await
                if await predicate():
                    break
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"condition not met within {seconds} s")
    return time.monotonic() - started
