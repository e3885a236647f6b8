"""A node's configuration: one TOML file, paths relative to it.

node_id = "node-1"
organisation_name = "Holyoke Medical Center"
organisation_id = "ura:12345678"
listen = "127.0.0.1:0"
registry = "127.0.0.1:7000"
database = "node.db"
network_key_file = "network.key"
national_system = "http://fhir.nl/fhir/NamingSystem/bsn"
peer_deadline_s = 3.0
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import const
from transmural.errors import ConfigError
from transmural.identifiers import BSN_SYSTEM, canonical_system

NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    organisation_name: str
    registry: str
    database: Path
    network_key_file: Path
    organisation_id: str = ""
    listen: str = "127.0.0.1:0"
    gateway_listen: str = "127.0.0.1:0"
    advertise: str = ""
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificate: Path | None = None
    national_system: str = BSN_SYSTEM
    peer_deadline_s: float = const.PEER_DEADLINE_S
    consent_default: str = "opt-in"
    break_the_glass: bool = False
    insecure_dev: bool = False

    def __post_init__(self) -> None:
        if not NODE_ID.match(self.node_id):
            raise ConfigError(
                f"node_id {self.node_id!r}: use 1-64 lowercase letters, digits and dashes"
            )
        if not self.organisation_name.strip():
            raise ConfigError("organisation_name is empty")
        if self.advertise and not _is_address(self.advertise):
            raise ConfigError(f"advertise {self.advertise!r} is not host:port")
        for name in ("listen", "gateway_listen", "registry"):
            if not _is_address(getattr(self, name)):
                raise ConfigError(f"{name} {getattr(self, name)!r} is not host:port")
        tls_files = (self.certificate, self.private_key, self.ca_certificate)
        if not self.insecure_dev and None in tls_files:
            raise ConfigError(
                "certificate, private_key and ca_certificate are required "
                "(run `transmural-admin join`), unless insecure_dev = true"
            )
        if self.consent_default not in ("opt-in", "opt-out"):
            raise ConfigError(
                f"consent_default must be opt-in or opt-out, not {self.consent_default!r}"
            )
        if not 0 < self.peer_deadline_s <= const.MAX_PEER_DEADLINE_S:
            raise ConfigError(f"peer_deadline_s must be in (0, {const.MAX_PEER_DEADLINE_S}]")

    def check_dialable(self) -> None:
        """ConfigError if peers would be told a wildcard address (0.0.0.0, [::]) to dial.

        Checked when the node serves, not when the config is written: join
        writes the listen address it was given, before anyone set advertise.
        """
        if self.advertise or self.insecure_dev or not _is_wildcard(self.listen):
            return
        port = self.listen.rpartition(":")[2]
        raise ConfigError(
            f"listen = {self.listen!r} takes every address of this machine, but peers need one "
            f'to dial: add advertise = "HOST:{port}" to node.toml (the name or address peers '
            "reach this machine at)"
        )

    @property
    def identity(self) -> tuple[str, str]:
        """(node id, organisation id): whose database this config may open (``NodeStore.bind``)."""
        return self.node_id, self.organisation_id

    @classmethod
    def load(cls, path: Path, insecure_dev: bool = False) -> NodeConfig:
        """Read and check a config file; ConfigError names what is wrong.

        ``insecure_dev`` (the --insecure-dev flag) turns TLS off whatever
        the file says.
        """
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as error:
            raise ConfigError(f"cannot read node config {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"node config {path} is not valid TOML: {error}") from None
        if insecure_dev:
            raw["insecure_dev"] = True
        return cls.from_dict(raw, base=path.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: Path) -> NodeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown node config keys: {', '.join(unknown)}")
        missing = [k for k in ("node_id", "organisation_name", "registry") if k not in raw]
        if missing:
            raise ConfigError(f"node config lacks: {', '.join(missing)}")
        for key, value in raw.items():
            _check_type(key, value)
        values = dict(raw)
        values["peer_deadline_s"] = float(raw.get("peer_deadline_s", const.PEER_DEADLINE_S))
        values["database"] = base / str(raw.get("database", "node.db"))
        values["network_key_file"] = base / str(raw.get("network_key_file", "network.key"))
        for name in ("certificate", "private_key", "ca_certificate"):
            if name in raw:
                values[name] = base / str(raw[name])
        if "national_system" in raw:
            values["national_system"] = canonical_system(str(raw["national_system"]))
        return cls(**values)

    def to_toml(self, base: Path) -> str:
        """The config as TOML, paths relative to ``base`` where possible."""
        lines = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None or value == "":
                continue
            if isinstance(value, Path):
                value = str(value.relative_to(base) if value.is_relative_to(base) else value)
            lines.append(f"{name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _check_type(key: str, value: object) -> None:
    """Config values are strings, but for the deadline (a number) and insecure_dev."""
    if key in ("insecure_dev", "break_the_glass"):
        if not isinstance(value, bool):
            raise ConfigError(f"node config: {key} must be true or false, not {value!r}")
    elif key == "peer_deadline_s":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"node config: {key} must be a number of seconds, not {value!r}")
    elif not isinstance(value, str):
        raise ConfigError(f"node config: {key} must be a string, not {value!r}")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float | int):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _is_address(value: object) -> bool:
    if not isinstance(value, str):
        return False
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) < 65536)


def _is_wildcard(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
