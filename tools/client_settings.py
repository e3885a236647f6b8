"""Where the clinician's client finds its node, its token and the network CA.

In order of precedence: command-line flags, environment variables
(``TRANSMURAL_NODE``, ``TRANSMURAL_TOKEN``, ``TRANSMURAL_CA``,
``TRANSMURAL_NODE_ID``), then the client file (``--config``,
``TRANSMURAL_CONFIG`` or ``~/.config/transmural/client.json``):

    {"node": "127.0.0.1:7101", "node_id": "node-1",
     "ca_certificate": "/path/to/ca.crt", "token": "tmu1_..."}

The file holds a bearer token, so it must be readable by its owner only.
``transmural login`` writes it (``login_settings`` + ``write_settings``)
from flags and environment only: a login replaces the old file, it does not
inherit from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.gateway_client import (
    MAX_TOKEN_CHARS,
    ClientError,
    GatewayClient,
    NodeAccess,
    split_address,
)

DEFAULT_FILE = Path("~/.config/transmural/client.json")
KEYS = ("node", "node_id", "ca_certificate", "token")
ENVIRONMENT = {
    "node": "TRANSMURAL_NODE",
    "token": "TRANSMURAL_TOKEN",
    "ca_certificate": "TRANSMURAL_CA",
    "node_id": "TRANSMURAL_NODE_ID",
}


@dataclass(frozen=True)
class Overrides:
    """What the command line said (None: not given; "" given empty)."""

    config: str | None = None
    node: str | None = None
    token: str | None = None
    ca_certificate: str | None = None
    node_id: str | None = None
    insecure_dev: bool = False


def node_access(given: Overrides) -> NodeAccess:
    """Merge file, environment and flags; ClientError (exit 2) naming what is missing."""
    values = {**_read_file(_config(given)), **_environment(), **_flags(given)}
    return _access(values, given.insecure_dev)


def login_settings(given: Overrides) -> tuple[dict[str, str], NodeAccess]:
    """What ``transmural login`` writes (flags over environment) and how to check it.

    The CA is read (it must be a PEM certificate) and stored as an absolute
    path, so the file works from any folder.
    """
    values = {**_environment(), **_flags(given)}
    access = _access(values, given.insecure_dev)
    if any(c.isspace() or not c.isprintable() for c in access.token):
        raise ClientError(
            "the token has spaces or control characters in it: copy it whole, as "
            "`transmural-admin user add` printed it", 2,
        )  # fmt: skip
    if values.get("ca_certificate"):
        values["ca_certificate"] = str(Path(values["ca_certificate"]).expanduser().resolve())
    return {k: values[k] for k in KEYS if values.get(k)}, access


async def login(given: Overrides, check: bool = True) -> str:
    """``transmural login``: check the node answers as itself, then write the file.

    The check (``GatewayClient.check``) proves address, CA and node id; the
    token is not checked here (only an audited call would), so the message
    says so. Returns what to tell the clinician.
    """
    settings, access = login_settings(given)
    target = settings_path(_config(given))
    if check:
        client = GatewayClient(access)
        try:
            await client.check()
        finally:
            await client.close()
    try:
        write_settings(target, settings)
    except OSError as error:
        raise ClientError(f"cannot write {target}: {error.strerror or error}", 2) from None
    if not check:
        return f"saved {target} (mode 0600); the node was not asked (--no-check)"
    verified = ", its certificate verified against your CA" if access.ca_pem else ""
    return (
        f"saved {target} (mode 0600); node {access.node_id or '(insecure-dev)'} answers at "
        f"{access.address}{verified}. Your token is checked by your first search or report."
    )


def settings_path(explicit: Path | None) -> Path:
    """The client file: ``--config``, else ``$TRANSMURAL_CONFIG``, else the default."""
    named = explicit or _named_by_environment()
    return (named or DEFAULT_FILE).expanduser()


def _config(given: Overrides) -> Path | None:
    """``--config`` as a path; an empty one is an error (``Path("")`` is the current folder)."""
    if given.config is None:
        return None
    if not given.config.strip():
        raise ClientError("--config is empty: give a file or leave the option out", 2)
    return Path(given.config)


def _environment() -> dict[str, str]:
    return {key: os.environ[var] for key, var in ENVIRONMENT.items() if os.environ.get(var)}


#: The option that sets each key, for errors.
_OPTIONS = {"node": "--node", "node_id": "--node-id", "ca_certificate": "--ca", "token": "--token"}


def _flags(given: Overrides) -> dict[str, str]:
    """The options given; an empty (or blank) one is an error, not a quiet fall-back to
    the file.

    (``--token "$TOKEN"`` with TOKEN unset must not send the file's token instead.)
    """
    for key in KEYS:
        value = getattr(given, key)
        if value is not None and not value.strip():
            empty = "empty" if value == "" else "blank"
            raise ClientError(
                f"{_OPTIONS[key]} is {empty}: give a value or leave the option out", 2
            )
    values = {key: getattr(given, key) for key in KEYS if getattr(given, key)}
    if values.get("token") == "-":  # not on the command line, where `ps` shows it to others
        values["token"] = _token_from_stdin()
    return values


def _token_from_stdin() -> str:
    line = sys.stdin.readline()
    if not line.strip():
        raise ClientError("--token -: no token on standard input (its first line is read)", 2)
    return line.strip()


def _named_by_environment() -> Path | None:
    return Path(os.environ["TRANSMURAL_CONFIG"]) if os.environ.get("TRANSMURAL_CONFIG") else None


def _access(values: dict[str, str], insecure_dev: bool) -> NodeAccess:
    if not values.get("node"):
        raise ClientError("no node given: use --node HOST:PORT, TRANSMURAL_NODE or --config", 2)
    split_address(values["node"])  # bad input (exit 2), not an unreachable node
    token = values.get("token", "")
    if len(token) > MAX_TOKEN_CHARS:
        # Sent as is, grpc would refuse the header with its own text (exit 1).
        raise ClientError(
            f"the token is too long to be a clinician token ({len(token)} characters; one from "
            "`transmural-admin user add` has 48): is it the right value, copied once?", 2,
        )  # fmt: skip
    if token and (not token.isascii() or not token.isprintable() or " " in token):
        raise ClientError("the clinician token has spaces or other characters a token never has", 2)
    if not values.get("token"):
        raise ClientError(
            "no clinician token: use --token, TRANSMURAL_TOKEN or --config "
            "(a node admin issues one with `transmural-admin user add`)", 2,
        )  # fmt: skip
    ca_pem = None
    if not insecure_dev:
        if not values.get("ca_certificate"):
            raise ClientError("no network CA: use --ca FILE, TRANSMURAL_CA or --config", 2)
        if not values.get("node_id"):
            # Without it any member of the network would pass the TLS check,
            # and the token would go to whichever node answers at that address.
            raise ClientError(
                "no node id: use --node-id, TRANSMURAL_NODE_ID or --config, so the client can "
                "check it talks to your own node before it sends your token", 2,
            )  # fmt: skip
        ca_pem = _read_ca(Path(values["ca_certificate"]).expanduser())
    return NodeAccess(values["node"], values["token"], ca_pem, values.get("node_id", ""))


def write_settings(path: Path, settings: dict[str, str]) -> None:
    """Write a client file, owner-only from the first byte (it holds a token).

    An existing file keeps its mode through ``O_CREAT``, so it is made
    owner-only before the token is written into it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({k: v for k, v in settings.items() if k in KEYS}, handle, indent=2)
        handle.write("\n")


def _read_file(explicit: Path | None) -> dict[str, str]:
    path = settings_path(explicit)
    if not path.exists():
        if (explicit or _named_by_environment()) is not None:
            raise ClientError(f"client file {path} does not exist", 2)
        return {}
    if path.stat().st_mode & 0o077:
        raise ClientError(f"client file {path} is readable by others: chmod 600 {path}", 2)
    try:
        raw: Any = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ClientError(f"cannot read client file {path}: {error}", 2) from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k, ""), str) for k in KEYS):
        raise ClientError(f"client file {path}: expected a JSON object of strings", 2)
    return {k: raw[k] for k in KEYS if raw.get(k)}


def _read_ca(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ClientError(f"cannot read the network CA {path}: {error.strerror}", 2) from None
    if b"BEGIN CERTIFICATE" not in data:
        raise ClientError(f"{path} is not a PEM certificate", 2)
    return data


def add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The flags of this module's settings; without ``defaults`` they default to SUPPRESS."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--config",
        default=default(None),
        metavar="FILE",
        help="client file with node, node_id, ca_certificate and token "
        "(default: $TRANSMURAL_CONFIG or ~/.config/transmural/client.json)",
    )
    parser.add_argument(
        "--node",
        default=default(None),
        metavar="HOST:PORT",
        help="your node's gateway (default: $TRANSMURAL_NODE or the client file)",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        help="your clinician token; - reads it from standard input, unseen by `ps` "
        "(default: $TRANSMURAL_TOKEN or the client file)",
    )
    parser.add_argument(
        "--ca",
        dest="ca_certificate",
        default=default(None),
        metavar="FILE",
        help="the network CA certificate (default: $TRANSMURAL_CA or the client file)",
    )
    parser.add_argument(
        "--node-id",
        default=default(None),
        help="your node's id, checked against its certificate (default: $TRANSMURAL_NODE_ID)",
    )
    parser.add_argument(
        "--insecure-dev",
        action="store_true",
        default=default(False),
        help="talk plain gRPC to a node run with --insecure-dev (development only)",
    )
