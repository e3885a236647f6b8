"""Server processes started by devnet: start, wait for ready, stop.

Each server is started on port 0 with a ready file; it writes its real
address there once serving. A server that dies before that is reported
with the end of its log; one that dies later is noticed by ``watch``.
On Linux every server also dies with the process that started it
(``PR_SET_PDEATHSIG``), so a supervisor killed outright (SIGKILL, OOM)
leaves no orphan servers holding ports and databases.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transmural.process import dying_with_parent

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
#: How often ``watch`` looks whether a server is still running.
WATCH_INTERVAL_S = 1.0


class ProcessError(Exception):
    pass


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    address: str = ""
    ready: dict[str, object] = field(default_factory=dict)  # all the ready file says

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.ready = json.loads(self.ready_file.read_text())
                self.address = str(self.ready["address"])
                return self.address
            if self.process.poll() is not None:
                raise ProcessError(
                    f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise ProcessError(f"{self.name} was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def exit_description(self) -> str:
        """``<name> exited with code N; its log: <path>``, naming a killing signal too."""
        code = self.process.returncode
        how = f"code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):  # a signal number Python has no name for
                how += f" ({signal.Signals(-code).name})"
        return f"{self.name} exited with {how}; its log: {self.log_file}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_server(
    name: str, module: str, args: list[str], folder: Path, prefix: Sequence[str] = ()
) -> ServerProcess:
    """Start ``python -m module serve ARGS`` logging into ``folder``.

    ``prefix`` goes before the command (the WAN test's ``ip netns exec NS``,
    which execs the command, so the process is still the server's own).
    Call this from a thread that outlives the server: Linux sends the
    parent-death signal when the *thread* that started the child ends.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ready = folder / "ready.json"
    ready.unlink(missing_ok=True)
    log = folder / "server.log"
    command = dying_with_parent(
        [
            *prefix,
            sys.executable,
            "-m",
            module,
            "serve",
            *args,
            "--ready-file",
            str(ready),
            "--log-file",
            str(log),
        ]
    )
    with (folder / "stderr.log").open("ab") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return ServerProcess(name, process, ready, log)


def watch(
    servers: Sequence[ServerProcess], interval_s: float = WATCH_INTERVAL_S
) -> ServerProcess | None:
    """Block until SIGINT/SIGTERM (None) or until a server exits (that server).

    Polling is what notices a dead child: a supervisor that only waited for
    a signal would keep advertising a network that no longer answers. The
    handlers stay installed, so a second Ctrl-C cannot cut the stop short.
    """
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: received.append(s))
    while not received:
        for server in servers:
            if server.process.poll() is not None:
                return server
        time.sleep(interval_s)
    return None
