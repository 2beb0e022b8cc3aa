"""`pns-server`: serve, migrate (admin subcommands join here)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from pns_server import __version__
from pns_server.config import Settings

Command = Callable[[Settings, argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Command, Callable[[argparse.ArgumentParser], None]]] = {}


def command(
    name: str, help_text: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Command], Command]:
    def register(func: Command) -> Command:
        COMMANDS[name] = (help_text, func, arguments or (lambda _p: None))
        return func

    return register


def load_settings() -> Settings:
    """Settings from the environment; a bad value exits with a message naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = ["PNS configuration is invalid:"]
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            var = "PNS_" + loc[0].upper() if loc else "configuration"
            lines.append(f"  {var}: {err['msg']}")
        sys.stderr.write("\n".join(lines) + "\n")
        raise SystemExit(2) from None


def describe_startup(settings: Settings) -> str:
    where = (
        f"embedded SQLite database in {settings.data_dir.resolve()}"
        if settings.is_embedded
        else f"database {settings.sqlalchemy_url.split('@')[-1]}"
    )
    return (
        f"PNS relay {__version__}: {where}; "
        f"listening on http://{settings.host}:{settings.port}; "
        f"phones are pointed to {settings.public_url}"
    )


@command("serve", "run the relay (migrates the database first unless PNS_MIGRATE_ON_START=false)")
def serve(settings: Settings, _args: argparse.Namespace) -> int:
    import uvicorn

    from pns_server.app import create_app

    print(describe_startup(settings), flush=True)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=int(settings.shutdown_timeout) or None,
    )
    return 0


@command("migrate", "upgrade the database schema to the latest revision")
def migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from pns_server.migrate import upgrade_to_head

    if settings.is_embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.sqlalchemy_url)
    print("database schema is at the latest revision")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pns-server", description="PNS push-approval relay")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _func, arguments) in COMMANDS.items():
        arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    _help, func, _arguments = COMMANDS[args.command]
    return func(settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
