"""`pns-client`: the reference backup client.

    pns-client --server https://pns.example.com register --name FILESRV01
    pns-client pair --kind app            # QR in the terminal; waits for the phone
    pns-client login --username admin     # push with a match code, OTP as fallback
    pns-client diagnose                   # what blocks the way to the relay

Credentials live in `$XDG_CONFIG_HOME/pns/client.json` (mode 0600; `--config FILE` to
choose another). Every command takes `--json` for scripts: stdout then carries one JSON
document and the sentences meant for people go to stderr.

One function per subcommand, then the parser; the login screen is in `_login_screen`."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client_sdk._client import PnsClient
from client_sdk._exceptions import (
    ApiError,
    KeyProofError,
    OtpInvalid,
    PnsError,
    RelayCompromisedError,
    TransportError,
)
from client_sdk._keys import KeyStore
from client_sdk._models import Device
from client_sdk.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    SPINNER,
    CliError,
    Output,
    add_version,
    common_options,
    config_dir,
    exit_code_for,
    load_state,
    save_state,
)
from client_sdk.cli._diagnose import run_checks
from client_sdk.cli._login_screen import LoginScreen, describe_login, login_outcome, seconds_left
from client_sdk.cli._ticker import Ticker
from client_sdk.qr import qr_text, save_png, save_svg

__all__ = ["main"]

SERVER_ENV = "PNS_SERVER"
TOKEN_ENV = "PNS_CLIENT_TOKEN"  # wins over the state file: for containers and CI secrets


@dataclass
class Context:
    args: argparse.Namespace
    out: Output
    config: Path

    @property
    def keys_path(self) -> Path:
        return self.config.with_name(self.config.stem + "-keys.json")

    def state(self) -> dict[str, Any]:
        return load_state(self.config)

    def server(self) -> str:
        server = getattr(self.args, "server", None) or os.environ.get(SERVER_ENV)
        server = server or self.state().get("server")
        if not server:
            raise CliError(
                f"no relay URL: pass --server URL (or set {SERVER_ENV}), e.g. "
                f"--server https://pns.example.com"
            )
        return str(server).rstrip("/")

    def token(self) -> str | None:
        token = os.environ.get(TOKEN_ENV) or self.state().get("client_token")
        return str(token).strip() if token else None

    def client(self) -> PnsClient:
        token = self.token()
        if token is None:
            raise CliError(
                f"not registered yet ({self.config} has no credentials and {TOKEN_ENV} is "
                f"unset): run `pns-client register --name <this machine>` first"
            )
        return PnsClient(self.server(), token=token, key_store=KeyStore(self.keys_path))


Handler = Callable[[Context], int]


# -- register ---------------------------------------------------------------------------


def cmd_register(ctx: Context) -> int:
    args, out = ctx.args, ctx.out
    existing = ctx.state()
    if existing.get("client_token") and not args.force:
        raise CliError(
            f"{ctx.config} already holds credentials for {existing.get('server')}; pass "
            f"--force to replace them (the old installation keeps its devices on the relay)"
        )
    server = ctx.server()
    registration = PnsClient.register(
        server,
        name=args.name,
        edition=args.edition,
        hostname=args.hostname or socket.getfqdn(),
        registration_key=args.registration_key or os.environ.get("PNS_REGISTRATION_KEY"),
    )
    save_state(
        ctx.config,
        {
            "server": server,
            "client_id": registration.client_id,
            "client_token": registration.client_token,
            "edition": registration.edition,
            "name": args.name,
        },
    )
    ctx.keys_path.unlink(missing_ok=True)  # pins belong to the previous installation
    out.say(f"Registered {args.name!r} ({registration.edition}) with {server}.")
    out.say(f"Credentials saved in {ctx.config} (readable only by you).")
    out.say("Next: pair a phone with `pns-client pair`.")
    out.result(
        {
            "client_id": registration.client_id,
            "edition": registration.edition,
            "server": server,
            "config": str(ctx.config),
        }
    )
    return EXIT_OK


# -- pairing and devices ----------------------------------------------------------------


def describe_device(device: Device) -> str:
    what = "authenticator app" if device.kind == "app" else "TOTP app"
    platform = f", {device.platform} {device.os_version or ''}".rstrip() if device.platform else ""
    return f"{device.name!r} ({what}{platform})"


def finish_open_pairings(ctx: Context, client: PnsClient) -> None:
    """Pin the phones that joined pairings this machine started with `pair --no-wait`."""
    try:
        for pairing in client.finish_pairings():
            if pairing.pinned and pairing.device is not None:
                ctx.out.say(f"{describe_device(pairing.device)} joined; its key is pinned.")
    except KeyProofError as exc:
        ctx.out.say(f"warning: {exc}")


def cmd_pair(ctx: Context) -> int:
    args, out = ctx.args, ctx.out
    with ctx.client() as client:
        pairing = client.start_pairing(args.kind, args.label)
        payload = pairing.qr or ""
        if args.qr_png:
            save_png(payload, args.qr_png)
            out.say(f"QR code written to {args.qr_png}")
        if args.qr_svg:
            save_svg(payload, args.qr_svg)
            out.say(f"QR code written to {args.qr_svg}")
        if not out.as_json and not args.no_qr:
            out.say(qr_text(payload))
        if args.kind == "app":
            out.say("Scan this with the authenticator app, or enter the pairing code:")
        else:
            out.say(f"Scan this with {args.label or 'your authenticator app'}, or enter:")
        out.say(f"  {payload}")
        if args.no_wait:
            out.result(pairing)
            if args.kind == "app":
                out.say(
                    "The pairing stays open; `pns-client devices` (or the next login) "
                    "pins the phone's key once it has joined."
                )
            return EXIT_OK
        if args.kind == "totp":
            return confirm_totp(ctx, client, pairing.pairing_id, args.code)
        expires = pairing.expires_at

        def spin(tick: int) -> str:
            left = seconds_left(expires)
            clock = f"{left // 60}:{left % 60:02d}"
            return f"{SPINNER[tick % 4]} Waiting for the phone to join ({clock} left)"

        with Ticker(out, spin):
            pairing = client.wait_for_pairing(pairing.pairing_id, timeout=args.timeout)
    out.result(pairing)
    if pairing.status == "completed" and pairing.device is not None:
        out.say(f"{describe_device(pairing.device)} joined as device {pairing.device.device_id}.")
        return EXIT_OK
    if pairing.status == "expired":
        out.say("The pairing expired before a phone joined; run `pns-client pair` again.")
    else:
        out.say("No phone joined yet; the pairing stays open until it expires.")
    return EXIT_FAILED


def confirm_totp(ctx: Context, client: PnsClient, pairing_id: str, code: str | None) -> int:
    out = ctx.out
    if code is None:
        if not sys.stdin.isatty():
            raise CliError(
                f"pass the app's first code with --code, or confirm later with "
                f"`pns-client confirm {pairing_id} CODE`"
            )
        code = input("Type the 6-digit code the app shows now: ").strip()
    device = client.confirm_totp_pairing(pairing_id, code)
    out.result({"device": device})
    out.say(f"{describe_device(device)} joined as device {device.device_id}.")
    return EXIT_OK


def cmd_confirm(ctx: Context) -> int:
    with ctx.client() as client:
        return confirm_totp(ctx, client, ctx.args.pairing_id, ctx.args.code)


def cmd_devices(ctx: Context) -> int:
    out = ctx.out
    with ctx.client() as client:
        finish_open_pairings(ctx, client)
        devices = client.list_devices()
        pinned = client.key_store.as_dict()
    out.result({"devices": devices})
    if not devices:
        out.say("No devices yet: pair one with `pns-client pair`.")
        return EXIT_OK
    for device in devices:
        push = "codes only" if device.kind != "app" else device.push or "poll only"
        if device.push_status == "invalid_token":
            push += " (push token invalid: open the app once to renew it)"
        used = device.last_used_at.strftime("%Y-%m-%d %H:%M") if device.last_used_at else "never"
        trust = "" if device.kind != "app" or device.device_id in pinned else "  (key not pinned)"
        out.say(
            f"{device.device_id}  {describe_device(device)}  push: {push}  last used: {used}{trust}"
        )
    return EXIT_OK


def cmd_remove(ctx: Context) -> int:
    with ctx.client() as client:
        client.remove_device(ctx.args.device_id)
        client.key_store.forget(ctx.args.device_id)
    ctx.out.result({"removed": ctx.args.device_id})
    ctx.out.say(f"Device {ctx.args.device_id} removed; it can no longer approve logins.")
    return EXIT_OK


# -- login and codes --------------------------------------------------------------------


def cmd_login(ctx: Context) -> int:
    args, out = ctx.args, ctx.out
    screen = LoginScreen(out)
    try:
        with ctx.client() as client:
            finish_open_pairings(ctx, client)
            result = client.login(
                username=args.username,
                hostname=args.hostname or socket.gethostname(),
                ip=args.ip,
                message=args.message,
                ttl_seconds=args.ttl,
                show_match_code=screen.show_match_code,
                on_progress=screen.on_progress,
                ask_code=screen.ask_code,
                use_code=screen.use_code,
            )
    finally:
        screen.stop_countdown()
    out.result(
        {
            "success": result.success,
            "outcome": login_outcome(result),
            "method": result.method,
            "fallback_reason": result.fallback_reason,
            "device_id": result.device_id,
            "approval": result.approval,
        }
    )
    out.say(describe_login(result))
    return EXIT_OK if result.success else EXIT_FAILED


def cmd_otp(ctx: Context) -> int:
    out = ctx.out
    try:
        with ctx.client() as client:
            result = client.verify_otp(ctx.args.code)
    except OtpInvalid as exc:
        out.result({"result": "refused", "code": exc.code, "attempts_left": exc.attempts_left})
        out.say(f"Code refused: {exc.detail}")
        return EXIT_FAILED
    out.result(result)
    out.say(f"Code accepted (device {result.device_id}).")
    return EXIT_OK


def cmd_recovery_codes(ctx: Context) -> int:
    out = ctx.out
    with ctx.client() as client:
        codes = client.create_recovery_codes()
    out.result({"codes": list(codes.codes)})
    out.say("Your recovery codes (each works once; earlier codes no longer work).")
    out.say("Store them somewhere safe and offline:")
    for code in codes.codes:
        out.say(f"  {code}")
    return EXIT_OK


# -- diagnose ---------------------------------------------------------------------------


def cmd_diagnose(ctx: Context) -> int:
    out = ctx.out
    server = ctx.server()
    checks = run_checks(server, ctx.token(), timeout=ctx.args.timeout)
    out.say(f"Checking the way from this machine to {server}:")
    for check in checks:
        out.say(f"  [{check.status.upper():^4}] {check.name}: {check.detail}")
        if check.fix and check.status != "ok":
            out.say(f"         fix: {check.fix}")
    healthy = all(check.ok for check in checks)
    out.say("Everything works." if healthy else "Fix the first failing check, then run again.")
    out.result({"server": server, "ok": healthy, "checks": checks})
    return EXIT_OK if healthy else EXIT_FAILED


# -- the parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="pns-client",
        description="The reference backup client for a PNS relay.",
        parents=[common],
        epilog="Exit codes: 0 done; 1 refused (rejected, wrong code, a failed check); "
        "2 usage error or missing credentials; 3 relay unreachable or unavailable. "
        f"Environment: {SERVER_ENV}, {TOKEN_ENV}.",
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    p = add("register", cmd_register, "register this installation with the relay")
    p.add_argument("--name", required=True, help="how the phone names this machine")
    p.add_argument("--edition", default="pro", help="product edition (default: pro)")
    p.add_argument("--hostname", help="this machine's host name (default: its FQDN)")
    p.add_argument("--registration-key", help="the relay's PNS_REGISTRATION_KEY, if it has one")
    p.add_argument("--force", action="store_true", help="replace stored credentials")

    p = add("pair", cmd_pair, "pair a phone: shows a QR code and waits for it")
    p.add_argument("--kind", choices=["app", "totp"], default="app")
    p.add_argument("--label", help="the TOTP app's name (kind totp)")
    p.add_argument("--qr-png", metavar="FILE", help="also write the QR code as PNG")
    p.add_argument("--qr-svg", metavar="FILE", help="also write the QR code as SVG")
    p.add_argument("--no-qr", action="store_true", help="do not draw the QR code")
    p.add_argument("--no-wait", action="store_true", help="print the pairing and exit")
    p.add_argument("--timeout", type=float, help="stop waiting after this many seconds")
    p.add_argument("--code", help="kind totp: the app's first code")

    p = add("confirm", cmd_confirm, "activate a TOTP pairing with the app's first code")
    p.add_argument("pairing_id")
    p.add_argument("code")

    add("devices", cmd_devices, "list the paired devices")

    p = add("remove", cmd_remove, "remove a paired device")
    p.add_argument("device_id")

    p = add("login", cmd_login, "ask for a second factor: push first, then a code")
    p.add_argument("--username", default=getpass.getuser(), help="who is logging in")
    p.add_argument("--hostname", help="where (default: this machine)")
    p.add_argument("--ip", help="from which address")
    p.add_argument("--message", help="extra text shown on the phone")
    p.add_argument("--ttl", type=int, default=60, help="seconds the phone has (10..300)")

    p = add("otp", cmd_otp, "check a one-time password")
    p.add_argument("code")

    add("recovery-codes", cmd_recovery_codes, "create ten new recovery codes")

    p = add("diagnose", cmd_diagnose, "check DNS, TCP, TLS, the relay, the clock, credentials")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    return parser


def report_error(out: Output, exc: PnsError, server: str | None) -> None:
    if isinstance(exc, RelayCompromisedError):
        out.error(
            f"REFUSED: {exc} Do not trust this relay until it is checked.",
            code=type(exc).__name__,
        )
    elif isinstance(exc, ApiError):
        out.error(exc.detail or str(exc), code=exc.code, status=exc.status)
    elif isinstance(exc, TransportError):
        where = f" {server}" if server else " the relay"
        out.error(
            f"cannot reach{where} ({exc}); run `pns-client diagnose` to see why",
            code=type(exc).__name__,
        )
    else:
        out.error(str(exc), code=type(exc).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(as_json=getattr(args, "json", False))
    config = Path(getattr(args, "config", None) or config_dir() / "client.json").expanduser()
    ctx = Context(args, out, config)
    handler: Handler = args.handler
    try:
        return handler(ctx)
    except CliError as exc:
        out.error(str(exc), code="usage")
        return exc.exit_code
    except PnsError as exc:
        report_error(out, exc, getattr(args, "server", None))
        return exit_code_for(exc)
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
