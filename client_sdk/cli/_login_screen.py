"""The terminal side of `PnsClient.login` for `pns-client login`: the match code, a
countdown, the "Enter to use a code" escape hatch, the code prompt and the verdict."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime

from client_sdk._exceptions import PnsError
from client_sdk._models import Approval, ApprovalRequested, CodePrompt, LoginResult
from client_sdk.cli._common import Output
from client_sdk.cli._ticker import LineReader, Ticker

FALLBACK_SENTENCES = {
    "rejected": "The request was rejected on the phone.",
    "expired": "Nobody answered on the phone in time.",
    "cancelled": "The request was cancelled.",
    "user_choice": "You chose to type a one-time password.",
    "delivery_failed": "The push could not be delivered to any phone.",
    "push_unavailable": "Push approval is not available for this installation right now.",
    "timeout": "Stopped waiting for the phone.",
}


def seconds_left(until: datetime) -> int:
    return max(0, int((until - datetime.now(UTC)).total_seconds()))


class LoginScreen:
    """The terminal side of `PnsClient.login`: match code, countdown, code prompt."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.use_code = threading.Event()
        self.reader = LineReader(sys.stdin, self.use_code)
        self.ticker: Ticker | None = None
        self._skipped_interrupt = False

    def show_match_code(self, requested: ApprovalRequested) -> None:
        out = self.out
        out.say(f"Approval {requested.approval_id} sent to {requested.devices_notified} phone(s).")
        if requested.match_code:
            out.say(f"Match code: {requested.match_code}")
            out.say(f"Type {requested.match_code} on your phone to approve this login.")
        out.say("Press Enter to use a one-time password instead.")
        self.reader.start()
        expires = requested.expires_at

        def countdown(_tick: int) -> str:
            return f"Waiting for your phone... {seconds_left(expires)} s left"

        self.ticker = Ticker(self.out, countdown, interval=0.5).start()

    def on_progress(self, approval: Approval) -> None:
        if approval.delivery is not None and approval.delivery.all_failed:
            self.stop_countdown()
            error = approval.delivery.last_error or "no reason given"
            self.out.say(f"The push could not be delivered ({error}).")

    def stop_countdown(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()

    def ask_code(self, prompt: CodePrompt) -> str | None:
        self.stop_countdown()
        out = self.out
        if prompt.attempt == 1:
            out.say(FALLBACK_SENTENCES.get(prompt.reason, f"Push did not work ({prompt.reason})."))
        elif isinstance(prompt.error, PnsError):
            left = prompt.attempts_left
            more = f" ({left} attempts left)" if left is not None else ""
            out.say(f"That code was not accepted{more}.")
        out.say("One-time password from the app, or a recovery code (empty to give up):")
        line = self.reader.next_line()
        if line == "" and prompt.reason == "user_choice" and not self._skipped_interrupt:
            self._skipped_interrupt = True  # the Enter that interrupted the wait
            line = self.reader.next_line()
        return line


def login_outcome(result: LoginResult) -> str:
    if result.success:
        return "approved" if result.method == "push" else str(result.method)
    if result.approval is not None and result.approval.status != "pending":
        return result.approval.status
    return "refused"


def describe_login(result: LoginResult) -> str:
    approval = result.approval
    if result.success and result.method == "push":
        return "APPROVED on the phone. Login allowed."
    if result.success and result.method == "otp":
        return "One-time password accepted. Login allowed."
    if result.success:
        left = result.recovery_codes_remaining
        return f"Recovery code accepted ({left} left). Login allowed."
    if approval is not None and approval.status == "rejected":
        why = {
            "number_mismatch": " (the number typed on the phone did not match)",
            "fraud": " and reported as fraud: push logins are paused for a while",
        }.get(approval.reason or "", "")
        return f"REJECTED on the phone{why}. Login refused."
    if approval is not None and approval.status == "expired":
        return "EXPIRED: nobody answered in time. Login refused."
    return "No second factor was given. Login refused."
