"""The SDK's flows driven directly, with canned replies and no network: every branch of
`login` (approved, rejected, expired, failed delivery, the user's choice, a phone faster
than the cancel, push unavailable, wrong codes, a compromised relay), the waits and their
deadlines, `finish_pairings`, and the retries of one call. Both clients run exactly these
flows (tests/client_sdk/test_live.py and test_approvals_live.py run them over a relay)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from client_sdk import (
    ApprovalSignatureError,
    CodePrompt,
    ConnectError,
    KeyProofMissing,
    KeyStore,
    LoginResult,
    OtpInvalid,
    OtpLocked,
    PinsNotPersistedWarning,
    RelayCompromisedError,
    Unavailable,
)
from client_sdk._core import ClientCore, ping_call
from client_sdk._flows import (
    ClientFlows,
    Flow,
    Invoke,
    Sleep,
    Step,
    Unwatch,
    Watch,
    drive,
    exchange,
)
from client_sdk._keys import context_sha256, key_proof, public_key_b64, sign_approval
from client_sdk._wire import ApiRequest, Call, Reply
from tests.client_sdk.mock_relay import problem
from tests.support.factories import new_key

APPROVAL = "appr1"
Answer = dict[str, Any] | Callable[[], dict[str, Any]] | httpx.Response | Exception


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(autouse=True)
def _quiet_in_memory_pins() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PinsNotPersistedWarning)
        yield


class Canned:
    """Performs a flow's steps as a driver would, from canned answers per "METHOD /path":
    a JSON body (200) or a function building it when asked, an
    `httpx.Response`, or an exception to raise. The last answer of a route repeats.
    Records every step. `user_chooses_code` plays a user who sets `use_code` at once."""

    def __init__(self, user_chooses_code: bool = False) -> None:
        self.answers: dict[str, list[Answer]] = {}
        self.sent: list[str] = []
        self.queries: dict[str, list[dict[str, Any]]] = {}
        self.steps: list[Step] = []
        self.bodies: dict[str, Any] = {}
        self.user_chooses_code = user_chooses_code
        self.watching = False

    def on(self, route: str, *answers: Answer) -> Canned:
        self.answers.setdefault(route, []).extend(answers)
        return self

    def run(self, flow: Flow[Any]) -> Any:
        return drive(flow, self.perform)

    def perform(self, step: Step) -> Any:
        self.steps.append(step)
        match step:
            case Call():
                return step.parse(self.reply(step.request))
            case Invoke(callback=callback, argument=argument):
                return callback(argument)
            case Watch(on_set=on_set):
                self.watching = True
                if self.user_chooses_code:
                    self.run(on_set)  # the watcher fires before the next long-poll
                else:
                    on_set.close()
            case Unwatch():
                self.watching = False
                return self.user_chooses_code
            case Sleep():
                return None
        return None

    def reply(self, request: ApiRequest) -> Reply:
        route = f"{request.method} {request.path}"
        self.sent.append(route)
        self.queries.setdefault(route, []).append(dict(request.params or {}))
        assert len(self.sent) < 50, "the flow does not stop"
        self.bodies[route] = request.json
        queue = self.answers.get(route)
        assert queue, f"unexpected {route}"
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            answer = answer()
        if isinstance(answer, dict):
            answer = httpx.Response(200, json=answer)
        now = datetime.now(UTC).timestamp()
        return Reply(answer, now, now)


class Phone:
    """The paired phone: its key is pinned in the core's `KeyStore`; `answer` builds the
    relay's status body for what it signed."""

    def __init__(self, core: ClientCore) -> None:
        self.key = new_key()
        self.core = core
        core.key_store.pin("dev1", public_key_b64(self.key))

    def answer(
        self,
        canned: Canned,
        *,
        status: str = "approved",
        decision: str = "approve",
        key: Any = None,
        nonce: str | None = None,
    ) -> Callable[[], dict[str, Any]]:
        """A body built when asked, so that it signs the nonce the flow drew."""

        def body() -> dict[str, Any]:
            sent = canned.bodies["POST /v1/approvals"]
            context = {n: sent.get(n) for n in ("username", "hostname", "ip", "message")}
            context["action"] = sent["action"]
            signed_at = stamp(datetime.now(UTC))
            signing_key = key or self.key
            signature = sign_approval(
                signing_key,
                APPROVAL,
                decision,
                "417" if decision == "approve" else None,
                signed_at,
                nonce or sent["client_nonce"],
                context_sha256(context),
            )
            response = {
                "decision": decision,
                "match_code": "417" if decision == "approve" else None,
                "timestamp": signed_at,
                "signature": signature,
                "public_key": public_key_b64(signing_key),
                "version": "pns-approval-v2",
            }
            return approval(status, device_id="dev1", response=response)

        return body


def approval(status: str = "pending", **fields: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "approval_id": APPROVAL,
        "status": status,
        "reason": None,
        "created_at": stamp(now),
        "expires_at": stamp(now + timedelta(seconds=60)),
        "decided_at": None,
        "device_id": None,
        "response": None,
        "delivery": {"queued": 0, "sent": 1, "failed": 0, "last_error": None},
        **fields,
    }


CREATED = {
    "approval_id": APPROVAL,
    "status": "pending",
    "expires_at": stamp(datetime.now(UTC) + timedelta(hours=1)),
    "match_code": "417",
    "devices_notified": 1,
}
FAILED = {"queued": 0, "sent": 0, "failed": 1, "last_error": "410 Unregistered"}
GET = f"GET /v1/approvals/{APPROVAL}"
DELETE = f"DELETE /v1/approvals/{APPROVAL}"


class Login:
    """One login run through `ClientFlows.login` against canned answers."""

    def __init__(
        self,
        canned: Canned,
        codes: list[str | None] | None = None,
        created: Answer = httpx.Response(201, json=CREATED),
        *,
        watch_progress: bool = True,
    ) -> None:
        self.core = ClientCore("tok", KeyStore())
        self.phone = Phone(self.core)
        self.flows = ClientFlows(self.core, long_poll_seconds=25)
        self.canned = canned.on("POST /v1/approvals", created)
        self.codes = list(codes or [])
        self.prompts: list[CodePrompt] = []
        self.shown: list[str | None] = []
        self.progress: list[str] = []
        self.watch_progress = watch_progress

    def on_progress(self, approval: Any) -> None:
        self.progress.append(approval.status)

    def ask_code(self, prompt: CodePrompt) -> str | None:
        self.prompts.append(prompt)
        return self.codes.pop(0) if self.codes else None

    def run(self) -> LoginResult:
        request = self.core.request_approval(
            username="admin",
            hostname="FILESRV01",
            ip=None,
            action="login",
            message=None,
            ttl_seconds=60,
            number_matching=True,
            idempotency_key=None,
        )
        result: LoginResult = self.canned.run(
            self.flows.login(
                request,
                ask_code=self.ask_code,
                show_match_code=lambda req: self.shown.append(req.match_code),
                on_progress=self.on_progress if self.watch_progress else None,
                max_code_attempts=3,
            )
        )
        return result


class TestLogin:
    def test_verified_approval_ends_the_login_without_a_code(self) -> None:
        canned = Canned()
        login = Login(canned)
        canned.on(GET, login.phone.answer(canned))
        result = login.run()
        assert (result.success, result.method, result.device_id) == (True, "push", "dev1")
        assert result.approval is not None and result.approval.verified
        assert login.shown == ["417"] and login.progress == ["approved"]
        assert login.prompts == [] and DELETE not in canned.sent
        assert not canned.watching  # the watch ended with the wait

    def test_rejection_falls_back_to_the_code(self) -> None:
        canned = Canned().on("POST /v1/otp/verify", {"result": "accepted", "device_id": "dev2"})
        login = Login(canned, codes=["123 456"])
        canned.on(GET, login.phone.answer(canned, status="rejected", decision="reject"))
        result = login.run()
        assert (result.success, result.method, result.fallback_reason) == (True, "otp", "rejected")
        assert result.device_id == "dev2"
        assert canned.bodies["POST /v1/otp/verify"] == {"code": "123456"}
        assert [p.reason for p in login.prompts] == ["rejected"]
        assert DELETE not in canned.sent  # a final approval is not cancelled

    def test_expired_push_and_a_user_who_gives_up(self) -> None:
        canned = Canned().on(GET, approval("expired"))
        login = Login(canned, codes=[""])
        result = login.run()
        assert (result.success, result.method, result.fallback_reason) == (False, None, "expired")
        assert canned.sent == ["POST /v1/approvals", GET]

    def test_failed_delivery_cancels_the_push_and_asks_for_a_code(self) -> None:
        canned = (
            Canned()
            .on(GET, approval(), approval(delivery=FAILED))
            .on(DELETE, approval("cancelled", delivery=FAILED))
            .on("POST /v1/recovery-codes/verify", {"result": "accepted", "remaining": 7})
        )
        login = Login(canned, codes=["abcd-efgh-ij"])
        result = login.run()
        assert (result.success, result.method) == (True, "recovery_code")
        assert (result.fallback_reason, result.recovery_codes_remaining) == ("delivery_failed", 7)
        assert result.approval is not None and result.approval.status == "cancelled"
        assert login.progress == ["pending", "pending"]  # each new state, delivery included
        assert canned.sent == [
            "POST /v1/approvals",
            GET,
            GET,
            DELETE,
            "POST /v1/recovery-codes/verify",
        ]

    def test_progress_watchers_are_woken_by_every_delivery_change(self) -> None:
        canned = Canned().on(GET, approval(), approval(delivery=FAILED))
        canned.on(DELETE, approval("cancelled", delivery=FAILED))
        Login(canned, codes=[None]).run()
        assert [q.get("until") for q in canned.queries[GET]] == [None, None]

    def test_without_progress_one_long_poll_waits_for_what_ends_the_push(self) -> None:
        canned = Canned()
        login = Login(canned, watch_progress=False)
        canned.on(GET, login.phone.answer(canned))
        result = login.run()
        assert (result.success, result.method) == (True, "push")
        assert canned.sent == ["POST /v1/approvals", GET]
        assert canned.queries[GET] == [{"wait": 25, "until": "final_or_failed"}]

    def test_without_progress_a_failed_delivery_still_falls_back_to_the_code(self) -> None:
        # What the relay answers for `final_or_failed` once every push failed; an older
        # relay that ignores `until` answers earlier states too, and the flow polls again.
        canned = (
            Canned()
            .on(GET, approval(delivery={**FAILED, "failed": 0, "sent": 1}))
            .on(GET, approval(delivery=FAILED))
            .on(DELETE, approval("cancelled", delivery=FAILED))
        )
        login = Login(canned, codes=[None], watch_progress=False)
        result = login.run()
        assert result.fallback_reason == "delivery_failed" and login.progress == []
        assert canned.sent == ["POST /v1/approvals", GET, GET, DELETE]
        assert {q["until"] for q in canned.queries[GET]} == {"final_or_failed"}

    def test_the_user_choosing_a_code_cancels_the_push(self) -> None:
        canned = Canned(user_chooses_code=True).on(DELETE, approval("cancelled"))
        canned.on(GET, approval("cancelled"))
        login = Login(canned, codes=[None])
        result = login.run()
        assert result.fallback_reason == "user_choice" and not result.success
        assert canned.sent == ["POST /v1/approvals", DELETE, GET]
        assert [type(s).__name__ for s in canned.steps if isinstance(s, Watch | Unwatch)] == [
            "Watch",
            "Unwatch",
        ]

    def test_a_cancel_from_elsewhere_is_reported_as_cancelled(self) -> None:
        canned = Canned().on(GET, approval("cancelled"))
        login = Login(canned)
        assert login.run().fallback_reason == "cancelled"

    def test_a_phone_faster_than_the_cancel_still_logs_in(self) -> None:
        canned = Canned()
        login = Login(canned)
        decided = login.phone.answer(canned)
        canned.on(GET, approval(delivery=FAILED), decided)
        canned.on(DELETE, problem(409, "already_decided", approval_status="approved"))
        result = login.run()
        assert (result.success, result.method) == (True, "push")
        assert canned.sent == ["POST /v1/approvals", GET, DELETE, GET]

    def test_a_failed_cancel_keeps_the_last_state(self) -> None:
        canned = Canned().on(GET, approval(delivery=FAILED)).on(DELETE, problem(503, "unavailable"))
        login = Login(canned)
        result = login.run()
        assert result.fallback_reason == "delivery_failed"
        assert result.approval is not None and result.approval.status == "pending"

    def test_push_unavailable_goes_straight_to_the_code(self) -> None:
        canned = Canned()
        login = Login(canned, codes=[None], created=problem(409, "no_app_devices"))
        result = login.run()
        assert (result.fallback_reason, result.approval) == ("push_unavailable", None)
        assert login.shown == [] and [p.reason for p in login.prompts] == ["push_unavailable"]

    def test_wrong_codes_are_asked_again_up_to_the_limit(self) -> None:
        wrong = problem(401, "otp_invalid", attempts_left=2)
        canned = Canned().on(GET, approval("expired")).on("POST /v1/otp/verify", wrong)
        login = Login(canned, codes=["111111", "222222", "333333", "444444"])
        result = login.run()
        assert not result.success
        assert [p.attempt for p in login.prompts] == [1, 2, 3]
        assert login.prompts[0].error is None
        assert isinstance(login.prompts[1].error, OtpInvalid)
        assert login.prompts[1].attempts_left == 2

    def test_a_locked_otp_propagates(self) -> None:
        locked = problem(429, "otp_locked", locked_until=stamp(datetime.now(UTC)))
        canned = Canned().on(GET, approval("expired")).on("POST /v1/otp/verify", locked)
        with pytest.raises(OtpLocked):
            Login(canned, codes=["123456"]).run()

    @pytest.mark.parametrize("forgery", ["another_key", "another_nonce"])
    def test_a_relay_forged_approval_never_logs_in(
        self, forgery: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        canned = Canned()
        login = Login(canned, codes=["123456"])
        bent: dict[str, Any] = (
            {"key": new_key()} if forgery == "another_key" else {"nonce": "A" * 43}
        )
        canned.on(GET, login.phone.answer(canned, **bent))
        with pytest.raises(ApprovalSignatureError) as refused:
            login.run()
        assert isinstance(refused.value, RelayCompromisedError)
        assert refused.value.check in ("key", "signature")
        assert login.prompts == []  # no fallback hides the attack
        assert "relay may be compromised" in caplog.text


class TestWaits:
    def flows(self, clock: list[float]) -> ClientFlows:
        core = ClientCore("tok", KeyStore())
        return ClientFlows(core, long_poll_seconds=25, clock=lambda: clock[0])

    def test_wait_for_approval_cuts_its_long_polls_to_the_deadline(self) -> None:
        clock = [100.0]
        waits: list[Any] = []

        def pending_after_the_wait(step: Step) -> Any:
            assert isinstance(step, Call)
            waits.append(step.request.params["wait"] if step.request.params else None)
            clock[0] += step.request.wait
            return step.parse(Reply(httpx.Response(200, json=approval()), 0, 0))

        result = drive(
            self.flows(clock).wait_for_approval(APPROVAL, 30, None, None), pending_after_the_wait
        )
        assert result.status == "pending" and waits == [25, 5]

    def test_wait_for_approval_stops_at_a_final_state(self) -> None:
        canned = Canned().on(GET, approval(), approval("expired"))
        flows = ClientFlows(ClientCore("tok", KeyStore()), long_poll_seconds=25)
        assert canned.run(flows.wait_for_approval(APPROVAL, None, None, None)).status == "expired"
        assert canned.sent == [GET, GET]

    def test_without_stop_early_a_failed_delivery_keeps_waiting(self) -> None:
        canned = Canned().on(GET, approval(delivery=FAILED), approval("expired"))
        flows = ClientFlows(ClientCore("tok", KeyStore()), long_poll_seconds=25)
        canned.run(flows.wait_for_approval(APPROVAL, None, None, None))
        assert canned.sent == [GET, GET]

    @pytest.mark.parametrize(
        ("progress", "stop_early", "until"),
        [
            (False, False, "final"),
            (False, True, "final_or_failed"),
            (True, False, None),
            (True, True, None),
        ],
    )
    def test_a_wait_asks_to_be_woken_only_for_what_it_needs(
        self, progress: bool, stop_early: bool, until: str | None
    ) -> None:
        canned = Canned().on(GET, approval("expired"))
        flows = ClientFlows(ClientCore("tok", KeyStore()), long_poll_seconds=25)
        seen: list[Any] = []
        wait = flows.wait_for_approval(
            APPROVAL, None, seen.append if progress else None, None, stop_early=stop_early
        )
        assert canned.run(wait).status == "expired"
        assert [q.get("until") for q in canned.queries[GET]] == [until]
        assert len(seen) == (1 if progress else 0)

    def test_wait_for_pairing_until_completed(self) -> None:
        core = ClientCore("tok", KeyStore())
        secret = bytes(range(32))
        expires = datetime.now(UTC) + timedelta(minutes=5)
        core.key_store.remember_pairing("pair1", secret, expires)
        key = new_key()
        device = device_body(key, key_proof(secret, public_key_b64(key)))
        canned = Canned().on(
            "GET /v1/pairings/pair1",
            pairing("pending"),
            pairing("completed", device=device),
        )
        done = canned.run(ClientFlows(core, 25).wait_for_pairing("pair1", None))
        assert done.status == "completed" and done.pinned
        assert core.key_store.get("dev1") == public_key_b64(key)

    def test_finish_pairings_forgets_gone_and_unpinnable_pairings(self) -> None:
        core = ClientCore("tok", KeyStore())
        expires = datetime.now(UTC) + timedelta(minutes=5)
        for pairing_id in ("gone", "open", "noproof"):
            core.key_store.remember_pairing(pairing_id, bytes(32), expires)
        canned = (
            Canned()
            .on("GET /v1/pairings/gone", problem(404, "not_found"))
            .on("GET /v1/pairings/open", pairing("pending", "open"))
            .on(
                "GET /v1/pairings/noproof",
                pairing("completed", "noproof", device=device_body(new_key(), None)),
            )
        )
        with pytest.raises(KeyProofMissing):
            canned.run(ClientFlows(core, 25).finish_pairings())
        assert core.key_store.pending_pairings() == ["open"]


def pairing(status: str, pairing_id: str = "pair1", device: Any = None) -> dict[str, Any]:
    return {
        "pairing_id": pairing_id,
        "kind": "app",
        "status": status,
        "expires_at": stamp(datetime.now(UTC) + timedelta(minutes=5)),
        "device": device,
    }


def device_body(key: Any, proof: str | None) -> dict[str, Any]:
    return {
        "device_id": "dev1",
        "kind": "app",
        "name": "Ann's iPhone",
        "public_key": public_key_b64(key),
        "key_proof": proof,
        "created_at": stamp(datetime.now(UTC)),
    }


class TestExchange:
    """One call's retries, as steps: what is sent, and how long the driver sleeps."""

    def run(self, call: Call[Any], *answers: httpx.Response | Exception) -> tuple[Any, list[Step]]:
        queue = list(answers)
        steps: list[Step] = []

        def perform(step: Step) -> Any:
            steps.append(step)
            if isinstance(step, Sleep):
                return None
            answer = queue.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return Reply(answer, 0, 0)

        try:
            return drive(exchange(call, retries=2), perform), steps
        finally:
            assert not queue, "every canned answer is used"

    def ping(self) -> httpx.Response:
        return httpx.Response(200, json={"time": "2026-11-30T09:00:00Z", "version": "1"})

    def test_a_read_is_retried_after_connect_errors_with_backoff(self) -> None:
        refused = httpx.ConnectError("refused")
        ping, steps = self.run(ping_call(), refused, refused, self.ping())
        assert ping.version == "1"
        assert [type(s).__name__ for s in steps] == [
            "ApiRequest",
            "Sleep",
            "ApiRequest",
            "Sleep",
            "ApiRequest",
        ]

    def test_retries_are_bounded_and_mapped(self) -> None:
        refused = httpx.ConnectError("refused")
        with pytest.raises(ConnectError):
            self.run(ping_call(), refused, refused, refused)

    def test_a_read_timeout_on_a_read_is_not_retried(self) -> None:
        # Something may have reached the server: only an Idempotency-Key makes that safe.
        with pytest.raises(Exception, match="timed out"):
            self.run(ping_call(), httpx.ReadTimeout("slow"))

    def test_a_short_503_is_retried_once_after_its_retry_after(self) -> None:
        busy = problem(503, "unavailable")
        busy.headers["retry-after"] = "2"
        ping, steps = self.run(ping_call(), busy, self.ping())
        assert ping.version == "1" and Sleep(2.0) in steps

    def test_a_second_503_is_raised(self) -> None:
        busy = problem(503, "unavailable")
        busy.headers["retry-after"] = "1"
        with pytest.raises(Unavailable):
            self.run(ping_call(), busy, busy)


def test_drive_throws_a_failed_step_into_the_flow() -> None:
    def flow() -> Flow[str]:
        try:
            yield Sleep(1)
        except KeyError:
            return "handled"
        return "not reached"

    def fail(step: Step) -> Any:
        raise KeyError("step")

    assert drive(flow(), fail) == "handled"
