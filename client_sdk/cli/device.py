"""`pns-device`: a phone simulator on `DeviceClient`, the reference for mobile developers.

    pns-device pair 'pns://pair?server=...&token=...#k=...'
    pns-device pending
    pns-device approve APPROVAL_ID --code 417
    pns-device reject APPROVAL_ID --fraud
    pns-device otp
    pns-device watch                       # polls and asks what to do with each request

The device's key, token and TOTP secret live in `$XDG_CONFIG_HOME/pns/device.json`
(mode 0600; `--config FILE` to simulate several phones)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client_sdk._device import DeviceClient
from client_sdk._exceptions import AlreadyDecided, ApiError, PnsError
from client_sdk._models import DeviceApproval, DeviceDecision
from client_sdk.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    Output,
    common_options,
    config_dir,
    load_state,
    save_state,
)

__all__ = ["main"]


@dataclass
class Context:
    args: argparse.Namespace
    out: Output
    config: Path

    def device(self) -> DeviceClient:
        state = load_state(self.config)
        if not state.get("device_token"):
            raise CliError(f"no paired device in {self.config}: run `pns-device pair QR_PAYLOAD`")
        saved: dict[str, Any] = dict(state["device"])
        server = getattr(self.args, "server", None)
        if server:
            saved["server_url"] = server
        return DeviceClient.from_state(saved)


Handler = Callable[[Context], int]


def describe(approval: DeviceApproval) -> str:
    ctx = approval.context
    who = ctx.get("username") or "someone"
    where = ctx.get("hostname") or approval.client_name or "a backup client"
    source = f" from {ctx['ip']}" if ctx.get("ip") else ""
    note = f" — {ctx['message']}" if ctx.get("message") else ""
    return f"{ctx.get('action', 'login')} by {who} on {where}{source}{note}"


def cmd_pair(ctx: Context) -> int:
    args, out = ctx.args, ctx.out
    if load_state(ctx.config).get("device_token") and not args.force:
        raise CliError(f"{ctx.config} already holds a paired device; pass --force to replace it")
    push = None
    if args.push_token:
        push = {"service": args.push_service, "token": args.push_token}
        if args.push_service == "apns":
            push["environment"] = args.push_environment
    device = DeviceClient.pair(
        args.qr_payload,
        name=args.name,
        platform=args.platform,
        os_version=args.os_version,
        app_version=args.app_version,
        push=push,
        server_url=getattr(args, "server", None),
    )
    with device:
        state = device.to_state()
        save_state(ctx.config, {"device": state, "device_token": state["device_token"]})
        out.result({"device_id": device.device_id, "server": device.server_url})
        out.say(f"Paired as {args.name!r} (device {device.device_id}) with {device.server_url}.")
        out.say(f"Key, token and TOTP secret saved in {ctx.config} (readable only by you).")
    return EXIT_OK


def cmd_pending(ctx: Context) -> int:
    out = ctx.out
    with ctx.device() as device:
        approvals = device.pending()
    out.result({"approvals": approvals})
    if not approvals:
        out.say("No pending requests.")
    for approval in approvals:
        expires = f"{approval.expires_at:%H:%M:%S}"
        out.say(f"{approval.approval_id}  {describe(approval)}  (expires {expires} UTC)")
    return EXIT_OK


def report_decision(out: Output, decision: DeviceDecision, wanted: str) -> int:
    out.result(decision)
    if decision.status == "approved":
        out.say(f"Approved {decision.approval_id}.")
    elif wanted == "approve":
        out.say(f"The server recorded {decision.status!r}: the code did not match the screen.")
    else:
        out.say(f"Rejected {decision.approval_id}.")
    expected = "approved" if wanted == "approve" else "rejected"
    return EXIT_OK if decision.status == expected else EXIT_FAILED


def cmd_approve(ctx: Context) -> int:
    with ctx.device() as device:
        decision = device.approve(ctx.args.approval_id, ctx.args.code)
    return report_decision(ctx.out, decision, "approve")


def cmd_reject(ctx: Context) -> int:
    with ctx.device() as device:
        decision = device.reject(ctx.args.approval_id, fraud=ctx.args.fraud)
    if ctx.args.fraud:
        ctx.out.say("Reported as fraud: push approvals for that backup client pause for a while.")
    return report_decision(ctx.out, decision, "reject")


def cmd_otp(ctx: Context) -> int:
    with ctx.device() as device:
        code = device.current_otp()
        period = device.totp.period if device.totp else 30
    left = period - int(time.time()) % period
    ctx.out.result({"code": code, "valid_for": left})
    ctx.out.say(f"{code}  (changes in {left} s)")
    return EXIT_OK


def cmd_push_token(ctx: Context) -> int:
    with ctx.device() as device:
        device.update_push_token(ctx.args.service, ctx.args.token)
    ctx.out.result({"updated": True})
    ctx.out.say("Push token updated.")
    return EXIT_OK


def cmd_remove(ctx: Context) -> int:
    with ctx.device() as device:
        device.remove()
    ctx.config.unlink(missing_ok=True)
    ctx.out.result({"removed": True})
    ctx.out.say("This phone is unpaired; its key and token are deleted.")
    return EXIT_OK


def cmd_watch(ctx: Context) -> int:
    """Poll like a phone whose push never arrives, and ask the user about each request."""
    out, args = ctx.out, ctx.args
    seen: set[str] = set()
    decided = 0
    out.say("Watching for requests (Ctrl-C to stop)...")
    with ctx.device() as device:
        while args.count is None or decided < args.count:
            for approval in device.pending():
                if approval.approval_id in seen:
                    continue
                seen.add(approval.approval_id)
                answer = ask(out, approval)
                if answer is None:
                    return EXIT_OK
                decided += 1
                try:
                    # Signed over the request exactly as it was shown above.
                    decision = answer(device, approval)
                except AlreadyDecided:
                    out.say("Too late: the request was already decided, expired or cancelled.")
                    continue
                out.say(f"-> {decision.status}")
            time.sleep(args.interval)
    return EXIT_OK


Answer = Callable[[DeviceClient, DeviceApproval], DeviceDecision]


def ask(out: Output, approval: DeviceApproval) -> Answer | None:
    out.say(f"New request: {describe(approval)}")
    if approval.number_matching:
        out.say("Type the number shown on the login screen to approve,")
    else:
        out.say("Type 'a' to approve,")
    out.say("'r' to reject, 'f' to reject and report fraud (end of input stops):")
    line = sys.stdin.readline()
    if not line:
        return None
    text = line.strip().lower()
    if text == "r":
        return lambda d, shown: d.reject(shown)
    if text == "f":
        return lambda d, shown: d.reject(shown, fraud=True)
    code = None if text == "a" else text
    return lambda d, shown: d.approve(shown, code)


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="pns-device", description="A simulated phone for a PNS relay.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    p = add("pair", cmd_pair, "pair with the text of a pns://pair QR code")
    p.add_argument("qr_payload")
    p.add_argument("--name", default="Simulated phone")
    p.add_argument("--platform", choices=["ios", "android"], default="android")
    p.add_argument("--os-version", default="14")
    p.add_argument("--app-version", default="1.0.0")
    p.add_argument("--push-service", choices=["apns", "fcm"], default="fcm")
    p.add_argument("--push-token", help="register for push (omit: poll only)")
    p.add_argument("--push-environment", choices=["production", "sandbox"], default="production")
    p.add_argument("--force", action="store_true", help="replace a paired device")

    add("pending", cmd_pending, "list requests waiting for this phone")

    p = add("approve", cmd_approve, "approve a request with the number on the login screen")
    p.add_argument("approval_id")
    p.add_argument("--code", help="the number shown on the login screen")

    p = add("reject", cmd_reject, "reject a request")
    p.add_argument("approval_id")
    p.add_argument("--fraud", action="store_true", help="I did not try to log in")

    add("otp", cmd_otp, "show the current one-time password")

    p = add("push-token", cmd_push_token, "rotate the push token")
    p.add_argument("service", choices=["apns", "fcm"])
    p.add_argument("token")

    add("remove", cmd_remove, "unpair this phone")

    p = add("watch", cmd_watch, "poll for requests and ask about each")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--count", type=int, help="stop after this many decisions")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(as_json=getattr(args, "json", False))
    config = Path(getattr(args, "config", None) or config_dir() / "device.json").expanduser()
    handler: Handler = args.handler
    try:
        return handler(Context(args, out, config))
    except CliError as exc:
        out.error(str(exc), code="usage")
        return exc.exit_code
    except ValueError as exc:  # a QR payload that is not a pairing code
        out.error(str(exc), code="invalid_input")
        return EXIT_FAILED
    except ApiError as exc:
        out.error(exc.detail or str(exc), code=exc.code, status=exc.status)
        return EXIT_FAILED
    except PnsError as exc:
        out.error(str(exc), code=type(exc).__name__)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
