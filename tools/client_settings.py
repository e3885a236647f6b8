"""Where the clinician's client finds its node, its token and the network CA.

In order of precedence: command-line flags, environment variables
(``TRANSMURAL_NODE``, ``TRANSMURAL_TOKEN``, ``TRANSMURAL_CA``,
``TRANSMURAL_NODE_ID``), then the client file (``--config``,
``TRANSMURAL_CONFIG`` or ``~/.config/transmural/client.json``):

    {"node": "127.0.0.1:7101", "node_id": "node-1",
     "ca_certificate": "/path/to/ca.crt", "token": "tmu1_..."}

The file holds a bearer token, so it must be readable by its owner only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.gateway_client import ClientError, NodeAccess

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
    """What the command line said (None: not given)."""

    config: Path | None = None
    node: str | None = None
    token: str | None = None
    ca_certificate: str | None = None
    node_id: str | None = None
    insecure_dev: bool = False


def node_access(given: Overrides) -> NodeAccess:
    """Merge file, environment and flags; ClientError (exit 2) naming what is missing."""
    values: dict[str, str] = dict(_read_file(given.config))
    for key, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            values[key] = os.environ[variable]
    for key in KEYS:
        if getattr(given, key):
            values[key] = getattr(given, key)
    if not values.get("node"):
        raise ClientError("no node given: use --node HOST:PORT, TRANSMURAL_NODE or --config", 2)
    if not values.get("token"):
        raise ClientError(
            "no clinician token: use --token, TRANSMURAL_TOKEN or --config "
            "(a node admin issues one with `transmural-admin user add`)", 2,
        )  # fmt: skip
    ca_pem = None
    if not given.insecure_dev:
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
    """Write a client file, owner-only from the first byte (it holds a token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({k: v for k, v in settings.items() if k in KEYS}, handle, indent=2)
        handle.write("\n")


def _read_file(explicit: Path | None) -> dict[str, str]:
    named = explicit or (Path(os.environ["TRANSMURAL_CONFIG"]) if os.environ.get(
        "TRANSMURAL_CONFIG") else None)  # fmt: skip
    path = (named or DEFAULT_FILE).expanduser()
    if not path.exists():
        if named is not None:
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
