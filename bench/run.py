"""`python -m bench.run [--full] [--only NAME ...] [--db sqlite postgres]`

Runs each scenario on each database, prints its table and writes bench/results/<name>.json."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import RESULTS, Databases, raise_open_files_limit, table, write_result
from bench.layers import db_layers
from bench.scenarios import FULL, QUICK
from bench.scenarios import SCENARIOS as RELAY_SCENARIOS

SCENARIOS = {**RELAY_SCENARIOS, "db_layers": db_layers}


def keep_relay_logs(tmp: Path, label: str) -> str:
    """A failed scenario's relay logs outlive the temp dir: the server-side exception, if
    any, is in them (their tracebacks are also printed)."""
    target = RESULTS / "logs" / label
    target.mkdir(parents=True, exist_ok=True)
    for log in tmp.glob("*.log"):
        shutil.copy(log, target / log.name)
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            print(f"-- {log.name}: server-side errors\n{text[-4000:]}", flush=True)
    return str(target)


def quiet_fake_teardown(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The fake providers' connections are cancelled on shutdown; that is not a failure."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def main(args: argparse.Namespace) -> int:
    asyncio.get_running_loop().set_exception_handler(quiet_fake_teardown)
    size = FULL if args.full else QUICK
    harness.PROFILE_DIR = args.profile
    harness.COMPARE_WITH = args.compare.resolve() if args.compare else None
    open_files = raise_open_files_limit()
    dbs = Databases()
    failures = 0
    try:
        kinds = dbs.kinds(args.db)
        for name in args.only or list(SCENARIOS):
            rows = []
            started = time.monotonic()
            for kind in kinds:
                tmp = dbs.tmp / f"{name}-{kind}"
                tmp.mkdir(parents=True, exist_ok=True)
                try:
                    rows += await SCENARIOS[name](dbs, kind, tmp, size)
                except Exception as exc:  # one broken scenario must not hide the others
                    failures += 1
                    kept = keep_relay_logs(tmp, f"{name}-{kind}")
                    error = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append({"database": kind, "error": error, "relay_logs": kept})
            parameters = {"run": "full" if args.full else "quick", **size.__dict__}
            parameters["open_files_limit"] = open_files
            path = write_result(name, parameters, rows)
            took = time.monotonic() - started
            print(table(f"{name} ({parameters['run']}, {took:.0f} s) -> {path}", rows), flush=True)
    finally:
        dbs.close()
        shutil.rmtree(dbs.tmp, ignore_errors=True)
    return 1 if failures else 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the long run (10,000 waits, ...)")
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run")
    parser.add_argument("--db", nargs="*", default=["sqlite", "postgres"])
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the first relay; stacks into DIR"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="route_cost, otp, push_dispatch: also run the relay of another checkout (e.g. "
        "`git worktree add DIR main`), alternating phases with this one",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
