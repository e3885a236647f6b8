"""Channel and server credentials, in one place.

This version speaks plain gRPC on loopback; the trust work swaps in mutual
TLS here, and nowhere else. Both servers also get the standard health and
reflection services, so grpcurl and grpc-health-probe work against them.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from transmural.const import MAX_MESSAGE_BYTES
from transmural.errors import ConfigError

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
]
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


def open_channel(target: str) -> grpc.aio.Channel:
    """A long-lived channel to a registry or node at ``host:port``."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS)


def bind(server: grpc.aio.Server, address: str) -> str:
    """Bind ``address`` (port 0 picks a free one); returns the real ``host:port``.

    ConfigError when the address is taken or not this machine's.
    """
    host, _, _ = address.rpartition(":")
    try:
        port = server.add_insecure_port(address)
    except (OSError, RuntimeError):
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot listen on {address}: the address is in use or not this machine's"
        )
    return f"{host}:{port}"


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: list[str]
) -> health.HealthServicer:
    """Standard health (all SERVING once started) and reflection services."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return health_servicer


async def mark_serving(health_servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
