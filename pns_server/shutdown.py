"""Graceful shutdown: on SIGTERM answer every waiting long-poll at once, then stop.

Uvicorn runs the lifespan shutdown only after open connections close, and a long-poll keeps
its connection open for up to a minute. So the signal handler itself releases the waiters:
each long-poll returns its current status with a 200 (the client polls again, on another
replica), the outbox dispatcher finishes its round and stops, and uvicorn, which has
stopped accepting, sees the connections close well within PNS_SHUTDOWN_TIMEOUT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from pns_server.config import Settings

log = logging.getLogger("pns")


def release_waiters(app: FastAPI) -> None:
    runtime = getattr(app.state, "runtime", None)
    if runtime is None:
        return
    # `closing` also makes every long-poll that starts from now on answer at once.
    runtime.notifier.closing = True
    runtime.notifier.wake_all()


def freeze_startup_objects() -> None:
    """Leave what the relay built to start (modules, classes, settings, the runtime: a
    quarter of a million objects) out of every later garbage collection. A full
    collection walks every tracked object and stops the event loop while it does; these
    objects live as long as the process, so walking them only lengthens that pause, for
    every request in flight. What was garbage by then is collected first."""
    gc.collect()
    gc.freeze()
    log.debug("%d startup objects left out of garbage collection", gc.get_freeze_count())


# A young collection every 20,000 net allocations instead of CPython's 700. A relay's
# objects die young, with their request; collected that often, those still in flight are
# promoted to the old generation, whose growth is what starts a full collection (0.4 s,
# the event loop stopped, with 10,000 long-polls held). One young collection then walks at
# most 20,000 objects: half a millisecond.
YOUNG_COLLECTION_EVERY = 20_000


def collect_young_garbage_less_often() -> None:
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.pns_app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        freeze_startup_objects()
        collect_young_garbage_less_often()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike the base class we do not re-raise the signal after shutting down: a
        # graceful stop on SIGTERM is a success and exits 0, as orchestrators expect.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        log.info("signal %s: releasing long-polls and shutting down", signal.Signals(sig).name)
        if self._loop is not None and not self._loop.is_closed():
            # A signal handler runs between bytecodes: hand the work to the loop.
            self._loop.call_soon_threadsafe(release_waiters, self.pns_app)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for a relay process, alone (`serve`) or one of `--workers`."""
    return {
        "log_level": settings.log_level,
        "log_config": None,  # our root handler (JSON or text, redacted) takes uvicorn's lines
        "access_log": False,
        # create_app applies X-Forwarded-* itself, from PNS_FORWARDED_ALLOW_IPS only.
        "proxy_headers": False,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "timeout_keep_alive": settings.keep_alive_seconds,
        # Which server answers is nobody's business (and one header less per response).
        "server_header": False,
    }


def run_server(app: FastAPI, **config: Any) -> None:
    server = GracefulServer(uvicorn.Config(app, **config), app)
    server.run()
