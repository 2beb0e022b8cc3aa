"""`pns-server serve --workers N`: N relay processes sharing one listening socket.

A relay process is one event loop, so it uses at most one core. Relays keep no state of
their own beside PostgreSQL: LISTEN/NOTIFY wakes a long-poll in whichever process holds it,
the outbox is shared with `FOR UPDATE SKIP LOCKED`, every decision is one conditional UPDATE.
So N processes on one host scale like N replicas, and the database becomes the limit.

Each worker listens on the port with SO_REUSEPORT, so the kernel spreads new connections
evenly over the workers (one shared socket would let whichever worker wakes first take a
whole burst). The supervisor (this process) migrates the schema once, checks the port is
free, starts the workers (spawned, so each imports a clean interpreter), forwards
SIGTERM/SIGINT to them for their graceful stop, and replaces a worker that dies while the
relay is running."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from pns_server.config import Settings

log = logging.getLogger("pns")

RESTART_DELAY_SECONDS = 1.0
WORKER_ENV = "PNS_WORKER_INDEX"


class WorkersUnsupported(ValueError):
    """N > 1 asked on a database that cannot wake long-polls across processes."""


def check_workers(settings: Settings, workers: int) -> None:
    if workers < 1:
        raise WorkersUnsupported("--workers must be at least 1")
    if workers > 1 and settings.is_sqlite:
        raise WorkersUnsupported(
            f"{workers} workers need PostgreSQL. On SQLite a decision wakes the long-polls "
            "of its own process only, so a client waiting in another worker would not hear "
            "of it. Run one worker on SQLite (PNS_WORKERS=1), or point PNS_DATABASE_URL at "
            "PostgreSQL to run several."
        )


# A worker that cannot listen or start (its lifespan failed: bad push credentials, no
# database) stops the whole relay instead of being restarted forever.
EXIT_CANNOT_START = 3


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def run_worker(index: int) -> None:
    """One worker: the same relay `serve` runs, on the supervisor's socket."""
    import uvicorn

    from pns_server.app import create_app
    from pns_server.config import load_settings
    from pns_server.observability import configure_logging
    from pns_server.shutdown import GracefulServer, server_options

    # The supervisor migrated already; N workers racing alembic would only fail.
    settings = load_settings().model_copy(update={"migrate_on_start": False})
    configure_logging(settings)
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        log.critical(
            "worker %d cannot listen on %s:%s: %s", index, settings.host, settings.port, exc
        )
        raise SystemExit(EXIT_CANNOT_START) from None
    app = create_app(settings)
    config = uvicorn.Config(app, **server_options(settings))
    log.info("worker %d (pid %d) serving", index, multiprocessing.current_process().pid)
    server = GracefulServer(config, app)
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(EXIT_CANNOT_START)


class Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.count = workers
        self.context = multiprocessing.get_context("spawn")
        self.processes: dict[int, BaseProcess] = {}
        self.stopping = False

    def _start(self, index: int) -> None:
        process = self.context.Process(target=run_worker, args=(index,), name=f"pns-worker-{index}")
        process.start()
        self.processes[index] = process

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for process in self.processes.values():
            if process.is_alive() and process.pid is not None:
                # Each worker answers its waiting long-polls and finishes in-flight pushes.
                os.kill(process.pid, signal.SIGTERM)

    def run(self) -> int:
        # Fail here, once, if the port is taken; the workers bind their own sockets.
        bind_socket(self.settings.host, self.settings.port).close()
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for index in range(self.count):
                self._start(index)
            while not self.stopping:
                time.sleep(0.2)
                for index, process in list(self.processes.items()):
                    if process.is_alive() or self.stopping:
                        continue
                    if process.exitcode == EXIT_CANNOT_START:
                        log.critical("worker %d could not start; stopping the relay", index)
                        self._on_signal(signal.SIGTERM, None)
                        break
                    log.error(
                        "worker %d exited with %s; starting a new one", index, process.exitcode
                    )
                    time.sleep(RESTART_DELAY_SECONDS)
                    if not self.stopping:
                        self._start(index)
            deadline = time.monotonic() + self.settings.shutdown_timeout + 10
            for process in self.processes.values():
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # -SIGTERM: a worker still starting when the stop came had no handler yet; that is
        # a clean stop too.
        clean = (0, None, -signal.SIGTERM)
        failed = [p.exitcode for p in self.processes.values() if p.exitcode not in clean]
        return 1 if failed else 0
