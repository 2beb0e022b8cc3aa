"""`pns-server`: serve, migrate, admin, rotate-key, check-push."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pns_server import __version__
from pns_server.config import Settings, load_settings
from pns_server.observability import configure_logging

Command = Callable[[Settings, argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Command, Callable[[argparse.ArgumentParser], None]]] = {}


def command(
    name: str, help_text: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Command], Command]:
    def register(func: Command) -> Command:
        COMMANDS[name] = (help_text, func, arguments or (lambda _p: None))
        return func

    return register


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


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="relay processes on one port (default PNS_WORKERS, 1); more than one needs PostgreSQL",
    )


@command(
    "serve",
    "run the relay (migrates the database first unless PNS_MIGRATE_ON_START=false)",
    _serve_arguments,
)
def serve(settings: Settings, args: argparse.Namespace) -> int:
    from pns_server.workers import WorkersUnsupported, check_workers

    workers = settings.workers if getattr(args, "workers", None) is None else args.workers
    try:
        check_workers(settings, workers)
    except WorkersUnsupported as exc:
        sys.stderr.write(f"pns-server serve: {exc}\n")
        return 2
    print(describe_startup(settings), flush=True)
    if (warning := settings.public_url_warning()) is not None:
        logging.getLogger("pns").warning(warning)
    if workers > 1:
        return serve_workers(settings, workers)
    from pns_server.app import create_app
    from pns_server.shutdown import run_server, server_options

    run_server(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        **server_options(settings),
    )
    return 0


def serve_workers(settings: Settings, workers: int) -> int:
    from pns_server.migrate import upgrade_to_head
    from pns_server.runtime import secret_keys
    from pns_server.workers import Supervisor

    if settings.migrate_on_start:
        # Once, before any worker starts (the data migrations need the secret keys).
        upgrade_to_head(settings.sqlalchemy_url, secret_keys(settings))
    print(f"{workers} relay processes share the port (PostgreSQL wakes and shares)", flush=True)
    return Supervisor(settings, workers).run()


@command("migrate", "upgrade the database schema to the latest revision")
def migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from pns_server.migrate import upgrade_to_head
    from pns_server.runtime import secret_keys

    if settings.is_embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.sqlalchemy_url, secret_keys(settings))
    print("database schema is at the latest revision")
    return 0


T = TypeVar("T")


def run_in_session(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Operator commands talk to the database directly, through the same services."""
    from pns_server.db import Database, create_engine

    async def go() -> T:
        db = Database(create_engine(settings.sqlalchemy_url, pool_size=2))
        try:
            async with db.session() as session:
                return await work(session)
        finally:
            await db.dispose()

    return asyncio.run(go())


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("clients", parents=[common], help="list clients")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--cursor", help="next_cursor of the previous page")
    for name, help_text in (
        ("client", "show a client, its devices and recent audit events"),
        ("unlock", "clear a client's fraud push lock and OTP lock"),
        ("delete", "delete a client and all its data"),
        ("revoke-device", "remove a device"),
    ):
        action = actions.add_parser(name, parents=[common], help=help_text)
        action.add_argument("id")
        if name == "delete":
            action.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    audit = actions.add_parser("audit", parents=[common], help="show the audit trail")
    audit.add_argument("--client-id")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--cursor", type=int)


def _print_result(args: argparse.Namespace, result: Any) -> None:
    data: dict[str, Any] = (
        result.model_dump(mode="json") if result is not None else {"result": "ok"}
    )
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.action == "clients":
        for c in data["clients"]:
            locked = " LOCKED" if c["locked_until"] or c["otp_locked_until"] else ""
            print(
                f"{c['client_id']}  {c['name']:<24} {c['edition']:<6} "
                f"devices={c['devices']} push={c['push_devices']}{locked}"
            )
        if data["next_cursor"]:
            print(f"more: --cursor {data['next_cursor']}")
    elif args.action == "audit":
        for e in data["events"]:
            print(f"{e['at']}  {e['event']:<22} {e['actor']:<7} client={e['client_id']}")
        if data["next_cursor"]:
            print(f"more: --cursor {data['next_cursor']}")
    else:
        for key, value in data.items():
            if isinstance(value, list):
                print(f"{key}:")
                for item in value:
                    print("  " + json.dumps(item))
            else:
                print(f"{key}: {value}")


def _confirmed(args: argparse.Namespace) -> bool:
    if args.action != "delete" or args.yes:
        return True
    if not sys.stdin.isatty():
        sys.stderr.write("refusing to delete without --yes (no terminal to ask on)\n")
        return False
    answer = input(f"Delete client {args.id} and all its devices and data? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


@command("admin", "inspect and manage clients and devices", _admin_arguments)
def admin(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from pns_server.admin import service
    from pns_server.errors import PnsError

    via = "cli"
    work: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "clients": lambda s: service.list_clients(s, args.limit, args.cursor),
        "client": lambda s: service.describe_client(s, args.id),
        "unlock": lambda s: service.unlock_client(s, args.id, via=via),
        "delete": lambda s: service.delete_client(s, args.id, via=via),
        "revoke-device": lambda s: service.revoke_device(s, args.id, via=via),
        "audit": lambda s: service.audit_trail(s, args.client_id, args.limit, args.cursor),
    }
    if not _confirmed(args):
        return 1
    if (path := settings.sqlite_path) is not None and not path.exists():
        sys.stderr.write(f"error: no database at {path}; run `pns-server migrate` first\n")
        return 1
    try:
        result = run_in_session(settings, work[args.action])
    except PnsError as exc:
        sys.stderr.write(f"error: {exc.detail}\n")
        return 1
    except SQLAlchemyError as exc:
        sys.stderr.write(f"error: the database failed: {type(exc).__name__}: {exc}\n")
        return 1
    _print_result(args, result)
    return 0


@command(
    "rotate-key",
    "re-seal every TOTP secret under PNS_SECRET_KEY (old keys in PNS_OLD_SECRET_KEYS)",
)
def rotate_key(settings: Settings, _args: argparse.Namespace) -> int:
    from pns_server.admin.keys import rotate_secrets
    from pns_server.db import Database, create_engine
    from pns_server.runtime import secret_keys
    from pns_server.security import SecretBox

    if settings.secret_key is None:
        sys.stderr.write("set PNS_SECRET_KEY to the new key and PNS_OLD_SECRET_KEYS to the old\n")
        return 2
    box = SecretBox(secret_keys(settings))

    async def go() -> int:
        db = Database(create_engine(settings.sqlalchemy_url, pool_size=2))
        try:
            report = await rotate_secrets(db, box)
        except ValueError as exc:
            sys.stderr.write(
                f"error: {exc}; add the key that sealed it to PNS_OLD_SECRET_KEYS and rerun\n"
            )
            return 1
        finally:
            await db.dispose()
        print(
            f"re-encrypted {report.devices} device and {report.pairings} pairing secrets "
            f"under key {box.primary_key_id}"
        )
        if report.recovery_codes_on_old_keys:
            print(
                f"{report.recovery_codes_on_old_keys} unused recovery codes are keyed with an "
                "old key: keep it in PNS_OLD_SECRET_KEYS until their clients create new codes "
                "(POST /v1/recovery-codes); removing it invalidates those codes"
            )
        else:
            print("PNS_OLD_SECRET_KEYS can now be removed")
        return 0

    return asyncio.run(go())


def _check_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="ID", help="also send a test push to this device")


@command(
    "check-push",
    "validate the APNs/FCM configuration and optionally send a test push",
    _check_push_arguments,
)
def check_push(settings: Settings, args: argparse.Namespace) -> int:
    from pns_server.push.factory import PushConfigError, build_senders

    try:
        senders = build_senders(settings)
    except PushConfigError as exc:
        sys.stderr.write(f"push configuration is invalid: {exc}\n")
        return 2
    providers = sorted(name for name in senders if name not in ("log", "webpush"))
    print("push providers configured: " + (", ".join(providers) or "none (log sender only)"))
    if "webpush" in senders:
        print("web push: on (VAPID; see GET /v1/webpush for the public key)")
    if not args.device:
        return asyncio.run(_close_senders(senders, 0))
    return asyncio.run(_send_test_push(settings, senders, args.device))


async def _close_senders(senders: dict[str, Any], code: int) -> int:
    for sender in senders.values():
        await sender.close()
    return code


async def _send_test_push(settings: Settings, senders: dict[str, Any], device_id: str) -> int:
    from datetime import UTC, datetime, timedelta

    from pns_server.db import Database, create_engine
    from pns_server.models import Device
    from pns_server.push.base import PushMessage
    from pns_server.security import new_id

    db = Database(create_engine(settings.sqlalchemy_url, pool_size=1))
    try:
        async with db.session() as session:
            device = await session.get(Device, device_id)
    finally:
        await db.dispose()
    if device is None or not device.push_service or not device.push_token:
        sys.stderr.write(f"error: no device {device_id} with a push token\n")
        return await _close_senders(senders, 1)
    sender = senders.get(device.push_service)
    if sender is None:
        sys.stderr.write(f"error: the device uses {device.push_service}, which is not configured\n")
        return await _close_senders(senders, 1)
    message = PushMessage(
        approval_id="test-" + new_id(),
        device_id=device.id,
        service=device.push_service,
        token=device.push_token,
        environment=device.push_environment or "production",
        title="PNS test",
        body="Push notifications reach this device.",
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
        data={"type": "test"},
    )
    result = await sender.send(message)
    print(f"test push to {device.id} via {device.push_service}: {result.outcome.value}", end="")
    print(f" ({result.reason})" if result.reason else "")
    return await _close_senders(senders, 0 if result.ok else 1)


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
    configure_logging(settings)
    _help, func, _arguments = COMMANDS[args.command]
    return func(settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
