"""A small wide-area network for tests: one Linux network namespace per host.

    with wan.create(["registry", "node-1", "node-2"], tmp_path) as net:
        net.address("node-1")                      # 10.213.77.2
        net.popen("node-1", [sys.executable, ...])  # runs inside node-1's namespace
        net.connect_rtt_ms("node-1", "node-2")     # measured round trips

Each host gets its own namespace (``tmwan<pid>x<n>-<host>``: the pid and a
counter keep parallel runs apart) with loopback up and one interface,
``wan0``, holding ``10.213.77.<i>/24``. The namespaces reach each other
only through the impaired links below and nothing else: no interface is
added to, and no packet sent through, the namespace the tests run in, so
the addresses cannot clash with anything outside.

The impairment, in every direction between any two hosts, is **20 ms one-way
delay and 1 % random loss per packet** (a round trip takes >= 40 ms), made
one of two ways, chosen when the network is built (``Wan.kind``):

``netem``
    Each ``wan0`` is one end of a veth pair whose other end sits on a bridge
    in a separate switch namespace; ``tc qdisc add dev wan0 root netem delay
    20ms loss 1%`` on every host's ``wan0`` delays and drops what that host
    sends (so a packet is impaired once, on its sender's side). As ever with
    netem, a TSO/GSO super-packet counts as one packet for the loss.
``tun-relay``
    Used when the kernel has no ``sch_netem`` ("Specified qdisc kind is
    unknown"). Each ``wan0`` is a TUN device (``IFF_TUN | IFF_NO_PI``); one
    relay process (this file's ``relay`` command) enters each namespace
    with ``setns(2)`` to open that namespace's TUN device, returns to its own
    namespace, and then moves raw IPv4 packets between the devices by
    destination address: each packet is dropped with probability 1 % and
    otherwise written to the destination's device 20 ms after it was read.
    That is one hop per packet, as with netem: 20 ms one way, 40 ms a round
    trip. TCP sees real delay and real loss and retransmits as on a WAN.
    Anything that is not IPv4 to another host's address is discarded. The
    relay exits when the process that started it does; its TUN devices go
    with it.

``TRANSMURAL_WAN_IMPAIRMENT=netem`` or ``=tun-relay`` forces one (a forced
``netem`` that the kernel lacks is an error, not a fallback); unset or
``auto`` tries netem first. ``Wan.describe()`` says which was used, and
``Wan.counters()`` how many packets were sent and dropped.

``create`` raises ``WanUnavailable`` only when namespaces cannot be made at
all (not root, no ``ip``, ``ip netns add`` refused): the test skips on that
alone. ``close`` (also run when ``create`` fails half-way) stops the relay
and every process started with ``popen`` and deletes every namespace made.
While the network is up, SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C
does, so a terminated test run still gets to ``close`` (the default action
would kill it on the spot, leaving the namespaces and servers behind);
``close`` puts the previous handler back. Every process started here also
gets SIGTERM from the kernel should the test process die without cleaning
up (SIGKILL): only its namespaces would be left then.

Run as a script, this file is also the relay and the probes that run inside
the namespaces (``relay``, ``rtt``, ``udp-send``, ``udp-receive``); they use
the standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import ipaddress
import itertools
import json
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tools.supervise import ServerProcess

#: The hosts' /24; .1 is the first host, .2 the second, and so on.
SUBNET = "10.213.77"
PREFIX_LENGTH = 24
#: One-way delay added to every packet, and the share of packets dropped.
DELAY_MS = 20
LOSS = 0.01
#: The impaired interface in every host namespace.
INTERFACE = "wan0"
#: Environment variable forcing one impairment: netem, tun-relay (or auto).
MODE_VARIABLE = "TRANSMURAL_WAN_IMPAIRMENT"
NETEM = "netem"
TUN_RELAY = "tun-relay"

#: A port nothing listens on: a TCP connect there is answered by a RST,
#: which makes one connect attempt exactly one round trip.
CLOSED_PORT = 9
#: The UDP port of the loss probe's receiver (inside a test namespace).
PROBE_PORT = 47_000

_SELF = Path(__file__).resolve()
_counter = itertools.count(1)

# Linux constants (include/uapi/linux/if_tun.h, sched.h, prctl.h).
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
_IFREQ_SIZE = 40


class WanUnavailable(Exception):
    """Network namespaces cannot be created here (the only reason to skip)."""


class WanError(Exception):
    """Namespaces work, but building or probing the network failed."""


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    namespace: str
    address: str


@dataclass
class Wan:
    hosts: dict[str, Host]
    kind: str = ""
    #: Why netem was not used (empty when it was).
    fallback_reason: str = ""
    switch_namespace: str = ""
    workdir: Path | None = None
    relay: subprocess.Popen[bytes] | None = None
    relay_seed: int = 0
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    #: SIGTERM's handler before ``build`` made it an interrupt (None: not taken).
    sigterm_before: Any = None

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def namespace(self, host: str) -> str:
        return self.hosts[host].namespace

    def exec_prefix(self, host: str) -> list[str]:
        """Prefix a command with this to run it inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``'s namespace; ``close`` kills it if still running.

        ``ip netns exec`` replaces itself with ``argv``: the process is ``argv``'s own,
        and dies with the test process (``transmural.process.dying_with_parent``).
        """
        from transmural.process import dying_with_parent  # not at the top: this is a script too

        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process: subprocess.Popen[Any] = subprocess.Popen(
            dying_with_parent([*self.exec_prefix(host), *argv]), **kwargs
        )
        self.processes.append(process)
        return process

    def start_server(
        self, host: str, name: str, module: str, args: list[str], folder: Path
    ) -> ServerProcess:
        """``python -m module serve ARGS`` in ``host``'s namespace, as devnet starts one."""
        from tools.supervise import start_server

        server = start_server(name, module, args, folder, prefix=self.exec_prefix(host))
        self.processes.append(server.process)
        return server

    def run(
        self, host: str, argv: Sequence[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace to the end; its output as text."""
        return subprocess.run(
            [*self.exec_prefix(host), *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def describe(self) -> str:
        """Which impairment this network uses, in one line."""
        what = f"{DELAY_MS} ms one-way delay and {LOSS:.0%} loss per packet, each direction"
        if self.kind == NETEM:
            return f"netem on veth pairs to a bridge namespace ({what})"
        return (
            f"userspace TUN relay, seed {self.relay_seed} ({what}; netem not used: "
            f"{self.fallback_reason})"
        )

    def counters(self) -> dict[str, int]:
        """Packets sent over the WAN and dropped by the impairment, so far.

        The relay writes its figures every 0.25 s: they may lag by that much.
        """
        if self.kind == NETEM:
            sent = dropped = 0
            for host in self.hosts.values():
                shown = _ip_json(["tc", "-n", host.namespace, "-s", "-j", "qdisc", "show",
                                  "dev", INTERFACE])  # fmt: skip
                for qdisc in shown:
                    if qdisc.get("kind") == "netem":
                        sent += int(qdisc.get("packets", 0))
                        dropped += int(qdisc.get("drops", 0))
            return {"sent": sent + dropped, "dropped": dropped}
        assert self.workdir is not None
        stats_file = self.workdir / "relay-stats.json"
        try:
            stats: dict[str, int] = json.loads(stats_file.read_text())
        except (OSError, ValueError):
            return {"sent": 0, "dropped": 0}
        return {"sent": stats["forwarded"] + stats["dropped"], "dropped": stats["dropped"]}

    # --- probes: measurements across the impaired links ---

    def connect_rtt_ms(self, source: str, target: str, attempts: int = 5) -> list[float]:
        """Times of TCP connects from ``source`` to a closed port of ``target`` (ms).

        Each attempt is a SYN answered by a RST: one round trip, unless the
        loss hits it (then the kernel retries after a second).
        """
        done = self.run(source, _script("rtt", self.address(target), CLOSED_PORT, attempts))
        if done.returncode != 0:
            raise WanError(f"rtt probe {source} -> {target} failed:\n{done.stderr}")
        times: list[float] = json.loads(done.stdout)
        return times

    def udp_delivered(self, source: str, target: str, count: int = 2000) -> int:
        """How many of ``count`` UDP datagrams from ``source`` reach ``target``."""
        receiver = self.popen(
            target,
            _script("udp-receive", self.address(target), PROBE_PORT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "ready":
            receiver.kill()
            _, err = receiver.communicate()
            raise WanError(f"udp receiver in {target} did not start:\n{err}")
        sent = self.run(source, _script("udp-send", self.address(target), PROBE_PORT, count))
        if sent.returncode != 0:
            receiver.kill()
            raise WanError(f"udp sender in {source} failed:\n{sent.stderr}")
        out, err = receiver.communicate(timeout=30)
        if receiver.returncode != 0:
            raise WanError(f"udp receiver in {target} failed:\n{err}")
        received: int = json.loads(out)["received"]
        return received

    # --- teardown ---

    def close(self) -> None:
        """Stop every process started here, the relay, and delete the namespaces.

        A SIGTERM meanwhile waits until all is gone (a second one must not cut
        the cleanup short), then goes to the handler from before ``build``.
        """
        then, self.sigterm_before = self.sigterm_before, None
        with _sigterm_held(then):
            for process in [*self.processes, *([self.relay] if self.relay else [])]:
                _stop(process)
            self.processes.clear()
            self.relay = None
            for namespace in reversed(self.namespaces):
                subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
            self.namespaces.clear()


@contextmanager
def create(hosts: Sequence[str], workdir: Path, mode: str | None = None) -> Iterator[Wan]:
    """The network of ``hosts``, deleted again when the block ends (whatever happens)."""
    wan = build(hosts, workdir, mode)
    try:
        yield wan
    finally:
        wan.close()


def build(hosts: Sequence[str], workdir: Path, mode: str | None = None) -> Wan:
    """Build the network; the caller must ``close`` it. Undone by itself if it fails."""
    mode = (mode or os.environ.get(MODE_VARIABLE) or "auto").strip().lower()
    if mode not in ("auto", NETEM, TUN_RELAY):
        raise WanError(f"{MODE_VARIABLE}={mode!r}: use {NETEM}, {TUN_RELAY} or auto")
    if not 0 < len(hosts) < 250:
        raise WanError("a WAN of 1 to 249 hosts")
    _check_namespaces_possible()
    tag = f"tmwan{os.getpid()}x{next(_counter)}"
    wan = Wan(
        {
            name: Host(name, f"{tag}-{name}", f"{SUBNET}.{index + 1}")
            for index, name in enumerate(hosts)
        },
        workdir=workdir,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        wan.sigterm_before = _interrupt_on_sigterm()
        for host in wan.hosts.values():
            _add_namespace(wan, host.namespace)
            _ip(["ip", "-n", host.namespace, "link", "set", "lo", "up"])
        if mode in ("auto", NETEM):
            reason = _try_netem(wan, f"{tag}-switch")
            if not reason:
                wan.kind = NETEM
                return wan
            if mode == NETEM:
                raise WanError(f"{MODE_VARIABLE}=netem, but netem cannot be used here: {reason}")
            wan.fallback_reason = reason
        else:
            wan.fallback_reason = f"{MODE_VARIABLE}={TUN_RELAY}"
        _start_relay(wan)
        wan.kind = TUN_RELAY
        return wan
    except BaseException:
        wan.close()
        raise


def _in_main_thread() -> bool:
    """Only the main thread may set signal handlers."""
    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupt_on_sigterm() -> Any:
    """SIGTERM raises KeyboardInterrupt from now on; the handler it had (None: unchanged).

    KeyboardInterrupt, not an exception of our own: pytest treats it as Ctrl-C
    (stop the run, tear every fixture down), where any other exception would
    fail this one test and go on with the next.
    """
    if not _in_main_thread():
        return None
    before = signal.signal(signal.SIGTERM, _interrupt)
    return signal.SIG_DFL if before is None else before  # None: a handler set outside Python


@contextmanager
def _sigterm_held(then: Any) -> Iterator[None]:
    """SIGTERM only noted in the block; then ``then`` (None: the handler before) gets it."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        restored = then if then is not None else before
        signal.signal(signal.SIGTERM, signal.SIG_DFL if restored is None else restored)
        if received:
            signal.raise_signal(signal.SIGTERM)


def _script(*args: object) -> list[str]:
    """This file run as a script: isolated (-I), so nothing beside it shadows the stdlib."""
    return [sys.executable, "-I", str(_SELF), *map(str, args)]


def _check_namespaces_possible() -> None:
    if shutil.which("ip") is None:
        raise WanUnavailable("the `ip` command (iproute2) is not installed")


def _add_namespace(wan: Wan, namespace: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "add", namespace], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise WanUnavailable(
            f"`ip netns add` failed as uid {os.geteuid()} (namespaces need root): "
            f"{done.stderr.strip()}"
        )
    wan.namespaces.append(namespace)


def _try_netem(wan: Wan, switch: str) -> str:
    """Veth pairs to a bridge, netem on every host's side; why not, or "" when done."""
    if shutil.which("tc") is None:
        return "the `tc` command is not installed"
    _add_namespace(wan, switch)
    wan.switch_namespace = switch
    try:
        _ip(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        _ip(["ip", "-n", switch, "link", "set", "br0", "up"])
        for index, host in enumerate(wan.hosts.values()):
            port = f"p{index}"
            _ip(["ip", "-n", switch, "link", "add", port, "type", "veth",
                 "peer", "name", INTERFACE, "netns", host.namespace])  # fmt: skip
            _ip(["ip", "-n", switch, "link", "set", port, "master", "br0"])
            _ip(["ip", "-n", switch, "link", "set", port, "up"])
            # Impairment first: no packet leaves before it is in place.
            _ip(["tc", "-n", host.namespace, "qdisc", "add", "dev", INTERFACE, "root", "netem",
                 "delay", f"{DELAY_MS}ms", "loss", f"{LOSS * 100:g}%"])  # fmt: skip
            _configure_interface(host)
    except WanError as error:
        # Delete the hosts' ends now: a deleted namespace's devices go later, in
        # the background, and a lingering wan0 would block the TUN device's name.
        for host in wan.hosts.values():
            subprocess.run(["ip", "-n", host.namespace, "link", "del", INTERFACE],
                           capture_output=True, check=False)  # fmt: skip
        subprocess.run(["ip", "netns", "del", switch], capture_output=True, check=False)
        wan.namespaces.remove(switch)
        wan.switch_namespace = ""
        return str(error)
    return ""


def _start_relay(wan: Wan) -> None:
    assert wan.workdir is not None
    if not os.path.exists("/dev/net/tun"):
        raise WanError("neither netem nor /dev/net/tun is available: cannot impair the WAN")
    wan.relay_seed = random.SystemRandom().randrange(2**32)
    log = (wan.workdir / "relay.log").open("wb")
    with log:
        wan.relay = subprocess.Popen(
            _script("relay", "--seed", wan.relay_seed, "--stats", wan.workdir / "relay-stats.json",
                    *(f"{h.namespace}={h.address}" for h in wan.hosts.values())),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
    assert wan.relay.stdout is not None
    line = wan.relay.stdout.readline()
    if line.strip() != b"ready":
        wan.relay.wait(5)
        raise WanError(
            f"the TUN relay did not start: {(wan.workdir / 'relay.log').read_text()[-2000:]}"
        )
    for host in wan.hosts.values():
        _configure_interface(host)


def _configure_interface(host: Host) -> None:
    _ip(["ip", "-n", host.namespace, "addr", "add", f"{host.address}/{PREFIX_LENGTH}",
         "dev", INTERFACE])  # fmt: skip
    _ip(["ip", "-n", host.namespace, "link", "set", INTERFACE, "up"])


def _ip(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise WanError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")


def _ip_json(argv: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise WanError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    shown: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return shown


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


# --- the relay (runs as its own process, in the tests' namespace) ---


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _open_tun_in(namespace: str) -> int:
    """A new TUN device ``wan0`` in ``namespace``, opened non-blocking; it dies with the fd."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            request = struct.pack("16sH", INTERFACE.encode(), _IFF_TUN | _IFF_NO_PI)
            fcntl.ioctl(tun, _TUNSETIFF, request.ljust(_IFREQ_SIZE, b"\0"))
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
    return tun


class _Stop(Exception):
    """SIGTERM or SIGINT: the relay stops at once (no select timeout to wait out)."""


def _stop_relay(signum: int, frame: object) -> None:
    raise _Stop


def _relay(ports: list[str], seed: int, stats_file: Path) -> int:
    parent = os.getppid()
    rng = random.Random(seed)
    by_address: dict[bytes, int] = {}
    for spec in ports:
        namespace, _, address = spec.partition("=")
        by_address[ipaddress.IPv4Address(address).packed] = _open_tun_in(namespace)
    selector = selectors.DefaultSelector()
    for fd in by_address.values():
        selector.register(fd, selectors.EVENT_READ)
    delay = DELAY_MS / 1000
    stats = {"forwarded": 0, "dropped": 0, "discarded": 0}
    written = dict(stats)
    queue: list[tuple[float, int, int, bytes]] = []  # (due, sequence, out fd, packet)
    sequence = itertools.count()
    next_check = time.monotonic()
    signal.signal(signal.SIGTERM, _stop_relay)
    signal.signal(signal.SIGINT, _stop_relay)
    print("ready", flush=True)
    try:
        while True:
            timeout = queue[0][0] - time.monotonic() if queue else 0.25
            for key, _ in selector.select(min(max(timeout, 0.0), 0.25)):
                for _ in range(64):
                    try:
                        packet = os.read(key.fd, 65_536)
                    except (BlockingIOError, InterruptedError):
                        break
                    ipv4 = packet[:1] and packet[0] >> 4 == 4
                    out = by_address.get(packet[16:20]) if ipv4 else None
                    if out is None or out == key.fd:
                        stats["discarded"] += 1  # not IPv4 to another host (IPv6, multicast)
                    elif rng.random() < LOSS:
                        stats["dropped"] += 1
                    else:
                        due = time.monotonic() + delay
                        heapq.heappush(queue, (due, next(sequence), out, packet))
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, _, out, packet = heapq.heappop(queue)
                try:
                    os.write(out, packet)
                    stats["forwarded"] += 1
                except OSError:  # the interface is down or being deleted
                    stats["discarded"] += 1
            if now >= next_check:
                next_check = now + 0.25
                if os.getppid() != parent:
                    break  # whoever started us is gone: so are we, and the TUN devices with us
                if stats != written:
                    _write_stats(stats_file, stats)
                    written = dict(stats)
    except _Stop:
        pass
    _write_stats(stats_file, stats)
    return 0


def _write_stats(path: Path, stats: dict[str, int]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(stats))
    temporary.replace(path)


# --- probes (run inside a namespace) ---


def _rtt(address: str, port: int, attempts: int) -> int:
    times = []
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(10)
            started = time.perf_counter()
            try:
                probe.connect((address, port))
            except ConnectionRefusedError:
                times.append((time.perf_counter() - started) * 1000)
            else:
                raise SystemExit(f"something listens on {address}:{port}: no RST to time")
    print(json.dumps(times))
    return 0


def _udp_send(address: str, port: int, count: int) -> int:
    burst = 100  # paced well below netem's default queue of 1000 packets
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for number in range(count):
            sender.sendto(number.to_bytes(4, "big"), (address, port))
            if number % burst == burst - 1:
                time.sleep(0.01)
        time.sleep(3 * DELAY_MS / 1000)
        for _ in range(20):  # the receiver stops at the first that arrives
            sender.sendto(b"end", (address, port))
            time.sleep(0.005)
    return 0


def _udp_receive(address: str, port: int) -> int:
    seen: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        receiver.bind((address, port))
        receiver.settimeout(10)
        print("ready", flush=True)
        try:
            while (data := receiver.recv(64)) != b"end":
                seen.add(int.from_bytes(data, "big"))
        except TimeoutError:
            pass
    print(json.dumps({"received": len(seen)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wan.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="move packets between TUN devices, impaired")
    relay.add_argument("--seed", type=int, required=True)
    relay.add_argument("--stats", type=Path, required=True)
    relay.add_argument("ports", nargs="+", metavar="NAMESPACE=ADDRESS")
    rtt = sub.add_parser("rtt", help="time TCP connects to a closed port")
    rtt.add_argument("address")
    rtt.add_argument("port", type=int)
    rtt.add_argument("attempts", type=int)
    for name in ("udp-send", "udp-receive"):
        udp = sub.add_parser(name)
        udp.add_argument("address")
        udp.add_argument("port", type=int)
        if name == "udp-send":
            udp.add_argument("count", type=int)
    args = parser.parse_args(argv)
    if args.command == "relay":
        return _relay(args.ports, args.seed, args.stats)
    if args.command == "rtt":
        return _rtt(args.address, args.port, args.attempts)
    if args.command == "udp-send":
        return _udp_send(args.address, args.port, args.count)
    return _udp_receive(args.address, args.port)


if __name__ == "__main__":
    sys.exit(main())
