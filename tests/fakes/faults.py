"""Fault harnesses: a private PostgreSQL or Redis to stop, freeze and start again, and a model whose forward
passes fail on demand; plus the request the fault tests send, their timing slack and how they report timings.

Time bounds are generous (shared, slow machines); the measured values are printed (``-s``) for the reliability notes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.db_fixtures import skip_or_fail
from tests.live import free_port

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "fake", "messages": MSGS}
MARGIN_S = 3.0  # scheduling slack on a shared 2-core machine


def report(what: str, seconds: float) -> None:
    print(f"\n[faults] {what}: {seconds:.3f}s")


# ---- a private PostgreSQL -------------------------------------------------------------------------------------


def _pg_tool(name: str) -> str | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # newest version first
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return shutil.which(name)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port (trust auth), stopped, frozen and started at will."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
        if initdb is None or pg_ctl is None:
            skip_or_fail("the PostgreSQL fault tests need initdb and pg_ctl (e.g. apt-get install postgresql)")
        assert initdb is not None and pg_ctl is not None
        self._pg_ctl = pg_ctl
        self._as: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="llm-faults-pg-"))  # short: it holds the Unix socket
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
            runuser = shutil.which("runuser")
            try:
                shutil.chown(self.root, "postgres")
            except LookupError:
                runuser = None
            if runuser is None:
                shutil.rmtree(self.root)
                skip_or_fail("running as root, the PostgreSQL fault tests need a 'postgres' user and runuser")
            self._as = [str(runuser), "-u", "postgres", "--"]
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        self.frozen: list[int] = []
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(self._pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self._pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def _pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for status in glob.glob("/proc/[0-9]*/status"):
            with contextlib.suppress(OSError):
                fields = dict(line.split(":\t", 1) for line in Path(status).read_text().splitlines() if ":\t" in line)
                if int(fields.get("PPid", "0")) == postmaster:
                    children.append(int(status.split("/")[2]))
        return [postmaster, *children]

    def freeze(self) -> None:
        """SIGSTOP every process of the cluster: connections stay open but nothing answers (a partition).

        The postmaster stops first, so it forks no backend after the children are listed (a backend forked
        between a listing and the stop would go on answering); then the children are listed until none is new.
        """
        pids = self._pids()
        os.kill(pids[0], signal.SIGSTOP)
        self.frozen = [pids[0]]
        while True:
            new = [pid for pid in self._pids()[1:] if pid not in self.frozen]
            if not new:
                break
            for pid in new:
                os.kill(pid, signal.SIGSTOP)
            self.frozen += new

    def thaw(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def destroy(self) -> None:
        self.thaw()
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# ---- a private Redis ------------------------------------------------------------------------------------------


class PrivateRedis:
    """A throw-away redis-server on a free port, killed, frozen and started again at will."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            skip_or_fail("the Redis fault tests need redis-server")
        self._binary = str(binary)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)


# ---- a model that fails on demand -------------------------------------------------------------------------------


class Killed(BaseException):
    """Something no ``except Exception`` catches: it would end the worker thread."""


class FlakyModel:
    """Wraps the engine's model: after ``ok`` more forward passes, the next ``failures`` ones raise ``error``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.ok = 0
        self.failures = 0
        self.error: BaseException = RuntimeError("injected forward failure")

    def arm(self, failures: int, *, after: int = 0, error: BaseException | None = None) -> None:
        self.ok = after
        self.error = error or RuntimeError("injected forward failure")
        self.failures = failures

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            if self.ok > 0:
                self.ok -= 1
            else:
                self.failures -= 1
                raise self.error
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
