"""`python -m bench.profile_top FILE [N]`: where the CPU goes in a py-spy `--format raw` profile.

Prints, as a share of busy samples (idle frames excluded):
- by library: the library of the innermost frame (self time), so ORM, SQL compilation,
  driver, framework, validation, crypto and our own code add up to 100%;
- by operation: samples with a known step of ours anywhere on the stack (inclusive), e.g.
  connection check at checkout, commit, token lookup, dispatcher;
- the top N functions by self and by inclusive samples."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

# Innermost frames that mean "waiting", not working: the loop in epoll (uvloop's run loop is
# C, so py-spy shows it as Runner.run), an aiosqlite thread waiting for work, a lock wait.
IDLE = (
    re.compile(r"^select \(selectors\.py"),
    re.compile(r"^Runner\.run \(asyncio/runners\.py"),
    re.compile(r"^_run_once \(asyncio/base_events\.py"),
    re.compile(r"^_connection_worker_thread \(aiosqlite/core\.py:59\)"),
    re.compile(r"^(Condition|Event)\.wait \(threading\.py"),
    re.compile(r"^process \d+"),
)

LIBRARIES = (
    ("SQLite engine (C, aiosqlite thread)", "_connection_worker_thread (aiosqlite"),
    ("aiosqlite thread hand-off", "aiosqlite/"),
    ("asyncpg driver", "asyncpg/"),
    ("SQLAlchemy ORM", "sqlalchemy/orm/"),
    ("SQLAlchemy pool", "sqlalchemy/pool/"),
    ("SQLAlchemy SQL compile / cache keys", "sqlalchemy/sql/"),
    ("SQLAlchemy engine / results", "sqlalchemy/engine/"),
    ("SQLAlchemy other", "sqlalchemy/"),
    ("pydantic", "pydantic"),
    ("FastAPI / Starlette", "fastapi/"),
    ("FastAPI / Starlette", "starlette/"),
    ("uvicorn / httptools", "uvicorn/"),
    ("cryptography / hashing", "cryptography/"),
    ("cryptography / hashing", "hashlib"),
    ("cryptography / hashing", "hmac"),
    ("HTTP/2 client (push)", "httpx/"),
    ("HTTP/2 client (push)", "httpcore/"),
    ("HTTP/2 client (push)", "h2/"),
    ("HTTP/2 client (push)", "hpack/"),
    ("logging / metrics", "logging/"),
    ("logging / metrics", "prometheus_client/"),
    ("json", "json/"),
    ("our code (pns_server)", "pns_server/"),
    ("asyncio / threads", "asyncio/"),
    ("asyncio / threads", "threading.py"),
    ("asyncio / threads", "concurrent/"),
)

OPERATIONS = (
    (
        "connection check at checkout (probe or pre-ping)",
        ("_probe_on_checkout", "_async_ping", "do_ping", "_do_ping"),
    ),
    ("pool checkout / return", ("_ConnectionFairy._checkout", "_ConnectionRecord.checkin")),
    ("commit", ("AsyncSession.commit", "Session.commit")),
    ("token -> client / device lookup", ("_client_by_token", "_device_by_token")),
    ("long-poll (wait + woken read)", ("long_poll (pns_server",)),
    ("push dispatcher rounds", ("pns_server/outbox/dispatcher",)),
    ("push senders (APNs/FCM)", ("pns_server/push/apns", "pns_server/push/fcm")),
    ("notifier publish / wake", ("pns_server/realtime",)),
    ("rate limits", ("pns_server/ratelimit",)),
    ("audit rows", ("pns_server/audit",)),
    ("ECDSA signature check", ("verify_signature",)),
    ("response validation / serialisation", ("serialize_response", "_prepare_response_content")),
    ("request body validation", ("request_body_to_args", "_validate_value")),
    ("dependency solving", ("solve_dependencies",)),
    ("access log / metrics middleware", ("RequestObserver.__call__",)),
)


def parse(path: Path) -> tuple[Counter[str], Counter[str], Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    operations: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if any(pattern.match(frames[-1]) for pattern in IDLE):
            continue
        count = int(count_text)
        total += count
        names = [f.split(":")[0] for f in frames]
        own[names[-1]] += count
        for name in set(names):
            anywhere[name] += count
        libraries[library_of(frames)] += count
        for operation, needles in OPERATIONS:
            if any(needle in frame for frame in frames for needle in needles):
                operations[operation] += count
    return own, anywhere, libraries, operations, total


def library_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needle in LIBRARIES:
            if needle in frame:
                return name
    return "other (C extensions, interpreter)"


def main(argv: list[str]) -> None:
    own, anywhere, libraries, operations, total = parse(Path(argv[0]))
    limit = int(argv[1]) if len(argv) > 1 else 20
    print(f"{total} busy samples")
    for title, counter, count in (
        ("by library (self)", libraries, 100),
        ("by operation (inclusive)", operations, 100),
        (f"top {limit} by self", own, limit),
        (f"top {limit} by inclusive", anywhere, limit),
    ):
        print(f"\n-- {title}")
        for frame, samples in counter.most_common(count):
            print(f"{100 * samples / max(total, 1):5.1f}%  {frame}")


if __name__ == "__main__":
    main(sys.argv[1:])
