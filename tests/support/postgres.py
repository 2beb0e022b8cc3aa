"""A throwaway PostgreSQL cluster in a temp dir, started with initdb/pg_ctl.

As root (CI), initdb refuses to run, so the cluster is created and started as the
`postgres` user through runuser."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Each test process (a pytest-xdist worker: PYTEST_XDIST_WORKER=gw0, gw1, ...) hands out
# ports from a range of its own, below Linux's ephemeral ports. A port the kernel picks
# (bind to port 0) is free only until the socket closes: two processes could both be
# handed it before either's server binds it, and a health check would then reach the
# other process's relay.
FIRST_PORT = 20_000
PORTS_PER_PROCESS = 1_000
_handed_out = itertools.count()


def this_process_ports() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = FIRST_PORT + (int(worker) if worker.isdigit() else 0) * PORTS_PER_PROCESS
    return range(base, base + PORTS_PER_PROCESS)


def free_port() -> int:
    """A port nothing listens on now, and that no other test process will hand out."""
    ports = this_process_ports()
    for _ in ports:
        port = ports[next(_handed_out) % len(ports)]
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or a closed connection's TIME_WAIT): the next one
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def _find(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{binary}"), reverse=True):
        return str(candidate)
    return None


def postgres_available() -> bool:
    return all(_find(b) for b in ("initdb", "pg_ctl", "postgres"))


@dataclass
class Cluster:
    root: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://pns@127.0.0.1:{self.port}"

    def database_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *args], check=check, capture_output=True, text=True, timeout=120
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            _find("pg_ctl") or "pg_ctl",
            "-D",
            str(self.root / "data"),
            "-m",
            mode,
            "-w",
            "stop",
            check=False,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=400 -c shared_buffers=64MB"
        )
        result = self._run(
            _find("pg_ctl") or "pg_ctl",
            "-D",
            str(self.root / "data"),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{log}")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="pns-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    os.chmod(root, 0o700)
    cluster = Cluster(root=root, port=free_port(), as_user=as_user)
    result = cluster._run(
        _find("initdb") or "initdb",
        "-D",
        str(root / "data"),
        "-U",
        "pns",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed: {result.stderr}")
    cluster.start()
    return cluster


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")
