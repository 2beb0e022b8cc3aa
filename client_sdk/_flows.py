"""Every multi-step exchange of the SDK, written once and without I/O.

A flow is a generator, in the manner of httpx's `Auth.auth_flow`: it yields a `Step` and
receives that step's result, or has the step's exception raised where it yielded.

    Step          what the driver does                           what the flow receives
    ApiRequest    sends it once                                  the `Reply`
    Call          sends it through `exchange` (retries)          what `Call.parse` returns
    Sleep         sleeps (blocking, or awaiting)                 None
    Invoke        calls a caller's callback (and awaits a        its return value
                  coroutine it returns, in the async driver)
    Watch         until `Unwatch` (or the end of the flow),      None
                  runs `on_set` once the caller's `use_code`
                  event is set
    Unwatch       stops watching                                 whether the event was set

`client_sdk._http` holds the two drivers: `SyncSender.run` for `PnsClient` and
`DeviceClient`, `AsyncSender.run` for their asyncio twins. Only the waiting mechanics
differ between them (a thread or a task, `threading.Event` or `asyncio.Event`, `time.sleep`
or `asyncio.sleep`); the rules below exist once, and tests drive them with canned replies."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from client_sdk._core import ClientCore, fallback_reason, is_otp_shaped, normalise_otp
from client_sdk._exceptions import (
    AlreadyDecided,
    KeyProofError,
    NotFound,
    OtpInvalid,
    OtpReplayed,
    PnsError,
    PushUnavailable,
    RecoveryCodeInvalid,
)
from client_sdk._models import (
    Approval,
    ApprovalRequested,
    CodePrompt,
    LoginResult,
    Pairing,
    WaitUntil,
)
from client_sdk._wire import (
    ApiRequest,
    Call,
    Reply,
    backoff,
    retry_after_unavailable,
    should_retry,
    transport_error,
)

T = TypeVar("T")

RETRYABLE_CODE_ERRORS = (OtpInvalid, OtpReplayed, RecoveryCodeInvalid)


@dataclass(frozen=True)
class Sleep:
    """Wait before trying again (a retry's backoff, a short `Retry-After`)."""

    seconds: float


@dataclass(frozen=True)
class Invoke:
    """Call one of the caller's callbacks (`show_match_code`, `on_progress`, `ask_code`)."""

    callback: Callable[[Any], Any]
    argument: Any


@dataclass(frozen=True)
class Watch:
    """While the flow waits, let the caller cut the wait short: once its `use_code` event is
    set, run `on_set` (beside the flow, so that it can wake the wait)."""

    on_set: Flow[None]


@dataclass(frozen=True)
class Unwatch:
    """End the `Watch`; the result says whether the caller's event was set."""


Step = ApiRequest | Call[Any] | Sleep | Invoke | Watch | Unwatch
Flow = Generator[Step, Any, T]


def send(call: Call[T]) -> Flow[T]:
    """One call as a flow: `result = yield from send(call)` keeps the result's type."""
    result: T = yield call
    return result


def drive(flow: Flow[T], perform: Callable[[Step], Any]) -> T:
    """Run `flow` to its end, performing each step with `perform` (blocking). The async
    driver is the same loop with `await perform(step)`."""
    result: Any = None
    error: Exception | None = None
    while True:
        try:
            step = flow.send(result) if error is None else flow.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        try:
            result, error = perform(step), None
        except Exception as exc:  # the flow decides what a failed step means
            result, error = None, exc


# --- sending one call ---------------------------------------------------------------


def exchange(call: Call[T], retries: int) -> Flow[T]:
    """Send `call`: a transport failure is retried (with backoff) as `should_retry` allows,
    and a `503` with a short `Retry-After` once, for calls that are safe to repeat."""
    request = call.request
    attempt = 0
    retried_unavailable = False
    while True:
        try:
            reply: Reply = yield request
        except httpx.TransportError as exc:
            if not should_retry(request, exc, attempt, retries):
                raise transport_error(exc) from exc
            yield Sleep(backoff(attempt))
            attempt += 1
            continue
        delay = None if retried_unavailable else retry_after_unavailable(request, reply.response)
        if delay is None:
            return call.parse(reply)
        retried_unavailable = True
        yield Sleep(delay)


# --- the backup client's flows --------------------------------------------------------


def _done(approval: Approval, stop_early: bool) -> bool:
    if approval.is_final:
        return True
    return stop_early and fallback_reason(approval) is not None


def wake_for(progress: bool, stop_early: bool) -> WaitUntil | None:
    """What the long-poll should wake for. Someone watching progress sees every delivery
    change (the relay's default); otherwise only what ends the wait, so the relay holds
    the poll through "push sent" instead of answering it and being asked again."""
    if progress:
        return None
    return "final_or_failed" if stop_early else "final"


def _after_wait_reason(approval: Approval, user_chose: bool) -> str:
    reason = fallback_reason(approval) or "timeout"
    if reason == "cancelled" and user_chose:
        return "user_choice"
    return reason


class ClientFlows:
    """The backup client's multi-step operations over a `ClientCore`. `clock` is monotonic
    seconds (tests pass their own)."""

    def __init__(
        self,
        core: ClientCore,
        long_poll_seconds: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.long_poll_seconds = long_poll_seconds
        self._clock = clock

    # -- long-polls --

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else self._clock() + timeout

    def _next_wait(self, deadline: float | None, chunk: int) -> int:
        """The next long-poll's `wait`: a chunk, or what is left until the deadline."""
        if deadline is None:
            return chunk
        return max(0, min(chunk, math.ceil(deadline - self._clock())))

    def wait_for_pairing(self, pairing_id: str, timeout: float | None) -> Flow[Pairing]:
        deadline = self._deadline(timeout)
        while True:
            wait = self._next_wait(deadline, self.long_poll_seconds)
            pairing = yield from send(self.core.get_pairing(pairing_id, wait))
            if not pairing.is_pending or self._next_wait(deadline, 1) == 0:
                return pairing

    def finish_pairings(self) -> Flow[list[Pairing]]:
        key_store = self.core.key_store
        done: list[Pairing] = []
        for pairing_id in key_store.pending_pairings():
            try:
                done.append((yield from send(self.core.get_pairing(pairing_id, 0))))
            except NotFound:
                key_store.forget_pairing(pairing_id)
            except KeyProofError:
                key_store.forget_pairing(pairing_id)  # completed: asking again cannot help
                raise
        return done

    def get_approval(
        self,
        approval_id: str,
        wait: float = 0,
        match_code: str | None = None,
        until: WaitUntil | None = None,
    ) -> Flow[Approval]:
        approval = yield from send(self.core.get_approval(approval_id, wait, until))
        return self.core.check_approval(approval, approval_id, match_code=match_code)

    def wait_for_approval(
        self,
        approval_id: str,
        timeout: float | None,
        on_progress: Callable[[Approval], Any] | None,
        match_code: str | None,
        *,
        stop_early: bool = False,
    ) -> Flow[Approval]:
        """Long-poll until a final status or `timeout`; with `stop_early`, also as soon as
        the push can no longer succeed (all deliveries failed)."""
        deadline = self._deadline(timeout)
        last: Approval | None = None
        until = wake_for(on_progress is not None, stop_early)
        while True:
            wait = self._next_wait(deadline, self.long_poll_seconds)
            approval = yield from self.get_approval(approval_id, wait, match_code, until)
            if on_progress is not None and approval != last:
                yield Invoke(on_progress, approval)
            last = approval
            if _done(approval, stop_early) or self._next_wait(deadline, 1) == 0:
                return approval

    def cancel_quietly(self, approval_id: str) -> Flow[None]:
        with contextlib.suppress(PnsError):
            yield from send(self.core.cancel_approval(approval_id))

    # -- login --

    def login(
        self,
        request: Call[ApprovalRequested],
        *,
        ask_code: Callable[[CodePrompt], Any],
        show_match_code: Callable[[ApprovalRequested], Any] | None,
        on_progress: Callable[[Approval], Any] | None,
        max_code_attempts: int,
    ) -> Flow[LoginResult]:
        """Push first (`request` creates the approval); on anything but a verified
        approval, the code prompt."""
        approval: Approval | None = None
        try:
            requested = yield from send(request)
        except PushUnavailable:
            reason = "push_unavailable"
        else:
            if show_match_code is not None:
                yield Invoke(show_match_code, requested)
            approval, reason = yield from self._push_phase(requested, on_progress)
            # get_approval raised already for an "approved" that does not verify.
            if approval.approved and approval.verified:
                return LoginResult(True, "push", approval, approval.device_id)
        return (yield from self._code_phase(ask_code, reason, approval, max_code_attempts))

    def _push_phase(
        self, requested: ApprovalRequested, on_progress: Callable[[Approval], Any] | None
    ) -> Flow[tuple[Approval, str]]:
        # Cancelling wakes the long-poll at once, which then falls back to the code.
        yield Watch(self.cancel_quietly(requested.approval_id))
        approval = yield from self.wait_for_approval(
            requested.approval_id, None, on_progress, requested.match_code, stop_early=True
        )
        user_chose: bool = yield Unwatch()
        reason = _after_wait_reason(approval, user_chose)
        if not approval.is_final:
            approval = yield from self._cancel_or_refresh(approval, requested.match_code)
        return approval, reason

    def _cancel_or_refresh(self, approval: Approval, match_code: str | None) -> Flow[Approval]:
        """Cancel a push we give up on; if the phone answered first, keep its answer."""
        try:
            return (yield from send(self.core.cancel_approval(approval.approval_id)))
        except AlreadyDecided:
            return (yield from self.get_approval(approval.approval_id, 0, match_code))
        except PnsError:
            return approval

    def _code_phase(
        self,
        ask_code: Callable[[CodePrompt], Any],
        reason: str,
        approval: Approval | None,
        attempts: int,
    ) -> Flow[LoginResult]:
        error: Exception | None = None
        for attempt in range(1, attempts + 1):
            answer: str | None = yield Invoke(ask_code, CodePrompt(reason, attempt, error))
            code = (answer or "").strip()
            if not code:
                break
            try:
                if is_otp_shaped(code):
                    otp = yield from send(self.core.verify_otp(normalise_otp(code)))
                    return LoginResult(True, "otp", approval, otp.device_id, reason)
                used = yield from send(self.core.verify_recovery_code(code))
                return LoginResult(True, "recovery_code", approval, None, reason, used.remaining)
            except RETRYABLE_CODE_ERRORS as exc:
                error = exc
        return LoginResult(False, None, approval, None, reason)
