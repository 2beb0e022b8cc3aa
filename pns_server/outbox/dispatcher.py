"""The outbox worker: claims due deliveries with a lease, sends them, records the outcome.

Every server process runs one. Claims are one UPDATE over a `FOR UPDATE SKIP LOCKED`
sub-select on PostgreSQL (SQLite serialises writers), so no delivery is sent twice while
its lease holds; a process that dies mid-send leaves a lease that expires and is reclaimed.
Its transactions are units on the driver connection (`Database.unit`): the claim, which
also finishes the deliveries with nothing to send, and the records of the sends' outcomes.

A login's pushes skip the claim: the transaction that creates them leases them to this
process at birth when its dispatcher has room (`lease_at_birth`), and hands them over as
it commits. A process that dies before sending them leaves the same lease to expire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pns_server.db import publish_after_commit
from pns_server.outbox.repository import DeliveryRepository
from pns_server.push.base import Outcome, PushMessage, PushResult
from pns_server.realtime.base import Subscription
from pns_server.rows import ClaimedRow
from pns_server.runtime import BirthLease, Runtime
from pns_server.states import ApprovalStatus, DeliveryStatus
from pns_server.topics import (
    OUTBOX_TOPIC,
    PUSH_FAILED,
    PUSH_RETRY,
    PUSH_SENT,
    approval_topic,
    now_utc,
)

log = logging.getLogger("pns.push")


@dataclass(frozen=True)
class Claimed:
    delivery_id: str
    approval_id: str
    lease_until: datetime
    attempts: int
    message: PushMessage | None  # None: nothing to send, `skip` says why
    skip: tuple[DeliveryStatus, str | None] | None = None  # (final status, last_error)
    # A skip that long-polls may be waiting for: a push given up while its approval is live.
    skip_wakes: bool = False


@dataclass(frozen=True)
class Sent:
    job: Claimed
    result: PushResult


def push_text(
    client_name: str, username: str | None, hostname: str | None, action: str
) -> tuple[str, str]:
    """A short human text: who asks and for what; never a code, token or secret."""
    who = username or "Someone"
    where = hostname or client_name
    return (
        f"{client_name}: approve {action}?",
        f"{who} wants to {action} on {where}. Open the app to answer.",
    )


# What to check when a provider refuses our own configuration (credentials, topic, key).
CONFIG_HINTS = {
    "apns": "check PNS_APNS_KEY_FILE/KEY_ID/TEAM_ID/TOPIC or PNS_APNS_CERT_FILE",
    "fcm": "check PNS_FCM_CREDENTIALS_FILE and the Firebase project's settings",
    "webpush": "check PNS_WEBPUSH_VAPID_KEY_FILE and PNS_WEBPUSH_SUBJECT",
}


def log_outcome(message: PushMessage, result: PushResult) -> None:
    """The one log line of a push that did not go out; providers only classify. Names the
    approval, the device and the token's last characters, never the whole token."""
    if result.outcome is Outcome.DELIVERED:
        return
    service = message.service
    cause = f"{result.status_code or '-'} {result.reason or result.outcome.value}"
    tail = "…" + message.token[-6:]
    who = f"approval {message.approval_id} device {message.device_id} token {tail}"
    if result.outcome is Outcome.CONFIG_ERROR:
        hint = CONFIG_HINTS.get(service, "check the provider's credentials")
        log.error(
            "PUSH CONFIGURATION ERROR via %s (%s) for %s: %s; pushes through this provider "
            "will keep failing",
            service,
            cause,
            who,
            hint,
        )
    elif result.outcome is Outcome.RETRY:
        log.warning("push via %s will be retried (%s): %s", service, cause, who)
    else:
        log.info(
            "push via %s: token dead (%s), the device's push is retired: %s", service, cause, who
        )


class Dispatcher:
    def __init__(
        self,
        runtime: Runtime,
        *,
        batch_size: int = 200,
        concurrency: int = 200,
        poll_interval: float = 1.0,
        retry_base: float = 1.0,
        retry_max: float = 60.0,
    ) -> None:
        self.runtime = runtime
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.concurrency = concurrency
        self._limit = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._subscription: Subscription | None = None
        self._pipeline: _Pipeline | None = None
        self._task: asyncio.Task[None] | None = None
        self._metric_children: dict[tuple[str, Outcome], tuple[Any, Any]] = {}

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="pns-dispatcher")
        return self._task

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the sends in flight (up to `timeout`), then stop."""
        self._stopping.set()
        if self._subscription is not None:
            self._subscription.wake()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except (TimeoutError, Exception):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _should_run(self) -> bool:
        return not self._stopping.is_set() and not self.runtime.notifier.closing

    def lease_at_birth(self, count: int, now: datetime) -> BirthLease | None:
        """Room for `count` sends among those in flight, held for deliveries created at
        `now` already leased to this process; None when this dispatcher is not running
        its pipeline, is stopping or has no room for all of them (they are then queued
        for a claim, as before)."""
        pipeline = self._pipeline
        if pipeline is None or not self._should_run() or pipeline.room() < count:
            return None
        lease = now + timedelta(seconds=self.runtime.settings.push_lease_seconds)
        return _BirthLease(pipeline, count, now, lease)

    async def _run(self) -> None:
        """A pipeline: claim whenever there is room for more sends in flight, and record
        each outcome as it completes. A slow or hung push holds one place of `concurrency`,
        never the pushes claimed after it (a round-by-round loop would wait for the slowest
        push of a batch before claiming the next)."""
        async with self.runtime.notifier.subscribe(OUTBOX_TOPIC) as subscription:
            self._subscription = subscription
            pipeline = self._pipeline = _Pipeline(self, subscription)
            try:
                while self._should_run():
                    try:
                        more_due = await pipeline.claim_and_start()
                    except Exception:
                        log.exception("push dispatcher round failed; retrying shortly")
                        more_due = False
                    if not more_due and self._should_run():
                        await subscription.wait(self.poll_interval)
                await pipeline.drain()  # stopping: finish what is in flight
            finally:
                self._pipeline = None
                pipeline.abandon()  # cancelled: unrecorded sends keep their lease

    # --- one round -----------------------------------------------------------------------

    async def run_once(self, now: datetime | None = None) -> int:
        """Claim a batch, send it, record it; returns deliveries handled."""
        jobs = await self._claim(now or now_utc())
        await self._send_and_record([job for job in jobs if job.message is not None])
        return len(jobs)

    async def _send_and_record(self, jobs: Sequence[Claimed]) -> None:
        """Send concurrently and record each outcome as soon as it is known, so a crash
        re-sends at most what was still in flight. Outcomes that complete while a record
        transaction runs are recorded together in the next one: one transaction per push
        when pushes trickle in, a few per batch when a provider answers them all at once."""
        if not jobs:
            return
        done: asyncio.Queue[Sent] = asyncio.Queue()

        async def send(job: Claimed) -> None:
            done.put_nowait(await self._send(job))

        sends = [asyncio.create_task(send(job)) for job in jobs]
        try:
            left = len(sends)
            while left:
                finished = [await done.get()]
                while not done.empty():
                    finished.append(done.get_nowait())
                left -= len(finished)
                await self._record(finished)
        finally:
            # Only when recording failed or we are cancelled: unrecorded sends keep their
            # lease and are claimed again once it expires.
            for task in sends:
                task.cancel()

    async def _claim(self, now: datetime, limit: int | None = None) -> list[Claimed]:
        """Lease due deliveries; those with nothing to send (approval decided or expired,
        token gone) are finished in the same transaction, so only sends leave it open."""
        lease = now + timedelta(seconds=self.runtime.settings.push_lease_seconds)
        async with self.runtime.db.unit() as unit:
            deliveries = DeliveryRepository(unit)
            rows = await deliveries.claim(now, lease, limit or self.batch_size)
            jobs = [self._prepare(now, lease, row) for row in rows]
            await self._finish_skipped(deliveries, [job for job in jobs if job.message is None])
        return jobs

    @staticmethod
    def _prepare(now: datetime, lease: datetime, row: ClaimedRow) -> Claimed:
        """A claimed row (repository.CLAIMED_COLUMNS) as a message, or why it is skipped."""

        def skip(status: DeliveryStatus, error: str | None, wakes: bool = False) -> Claimed:
            return Claimed(
                row.delivery_id, row.approval_id, lease, row.attempts, None, (status, error), wakes
            )

        if row.approval_status != ApprovalStatus.PENDING:
            return skip(DeliveryStatus.DROPPED, None)
        if row.expires_at <= now:
            return skip(DeliveryStatus.FAILED, "the approval expired before the push went out")
        if row.push_status != "ok" or not row.push_token:
            # The approval may have no push left: `final_or_failed` waits must hear it (an
            # expired one, above, is read again at its expiry anyway).
            return skip(DeliveryStatus.FAILED, "the device has no valid push token", wakes=True)
        title, body = push_text(row.client_name, row.username, row.hostname, row.action)
        message = PushMessage(
            approval_id=row.approval_id,
            device_id=row.device_id,
            service=row.service,
            token=row.push_token,
            environment=row.push_environment or "production",
            title=title,
            body=body,
            expires_at=row.expires_at,
            data={"approval_id": row.approval_id, "type": "approval"},
            webpush_keys=(
                (row.push_p256dh, row.push_auth) if row.push_p256dh and row.push_auth else None
            ),
        )
        return Claimed(row.delivery_id, row.approval_id, lease, row.attempts, message)

    async def _send(self, job: Claimed) -> Sent:
        message = job.message
        assert message is not None
        sender = self.runtime.sender_for(message.service)
        # The sender has its own timeout; this one only guards against a sender that forgets.
        # (asyncio.timeout, not wait_for: no extra task per push.)
        guard = self.runtime.settings.push_timeout_seconds * 2
        async with self._limit:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(guard):
                    result = await sender.send(message)
            except TimeoutError:
                result = PushResult(Outcome.RETRY, reason="timed out")
            except Exception as exc:
                result = PushResult(Outcome.RETRY, reason=f"sender error: {type(exc).__name__}")
            elapsed = time.perf_counter() - started
        sends, seconds = self._metrics(message.service, result.outcome)
        sends.inc()
        seconds.observe(elapsed)
        log_outcome(message, result)
        return Sent(job, result)

    def _metrics(self, service: str, outcome: Outcome) -> tuple[Any, Any]:
        """The labelled counter and histogram of a (service, outcome), looked up once."""
        key = (service, outcome)
        children = self._metric_children.get(key)
        if children is None:
            metrics = self.runtime.metrics
            children = self._metric_children[key] = (
                metrics.push_sends.labels(service=service, outcome=outcome.value),
                metrics.push_send_seconds.labels(service=service),
            )
        return children

    # --- recording -----------------------------------------------------------------------

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        exponential = min(self.retry_max, self.retry_base * 2.0 ** max(0, attempts - 1))
        jittered = exponential * random.uniform(0.5, 1.0)
        return max(jittered, retry_after or 0.0)

    async def _record(self, sent: Sequence[Sent]) -> None:
        delivered = [item.job for item in sent if item.result.outcome is Outcome.DELIVERED]
        if len(delivered) == len(sent) and self.runtime.db.dialect == "postgresql":
            await self._record_delivered_alone(delivered)
            return
        retried = {
            item.job.message.approval_id
            for item in sent
            if item.result.outcome is Outcome.RETRY and item.job.message is not None
        }
        async with self.runtime.db.unit() as unit:
            deliveries = DeliveryRepository(unit)
            await self._finish_delivered(deliveries, delivered)
            # Whether a retry is still worth it: one read for all of them (a provider outage
            # fails a whole batch at once), not one per push.
            statuses = await deliveries.approval_statuses(retried) if retried else {}
            for outcome in sent:
                if outcome.result.outcome is not Outcome.DELIVERED:
                    await self._apply(deliveries, statuses, outcome)

    @staticmethod
    async def _finish_skipped(deliveries: DeliveryRepository, jobs: Sequence[Claimed]) -> None:
        """Deliveries with nothing to send (approval decided or expired, token gone): one
        UPDATE per (lease, outcome), e.g. all the phones of an approval answered meanwhile.
        A push given up for its token may leave its pending approval with no push at all:
        the long-polls waiting for that (`final_or_failed`) are woken."""
        groups: dict[tuple[datetime, DeliveryStatus, str | None], list[str]] = defaultdict(list)
        for job in jobs:
            assert job.skip is not None
            groups[(job.lease_until, *job.skip)].append(job.delivery_id)
            if job.skip_wakes:
                publish_after_commit(deliveries.unit, approval_topic(job.approval_id, PUSH_FAILED))
        for (lease, status, error), ids in groups.items():
            await deliveries.finish_all(ids, lease, status, error)

    async def _record_delivered_alone(self, jobs: Sequence[Claimed]) -> None:
        """PostgreSQL, when every push went out (the common case): each lease's finish is
        one statement that NOTIFYs with its own commit, without a transaction around it.
        Each is whole by itself, conditional on its lease like `_finish_delivered`'s."""
        async with self.runtime.db.unit_alone() as unit:
            deliveries = DeliveryRepository(unit)
            for lease, ids in _by_lease(jobs).items():
                for approval_id in await deliveries.finish_sent_notifying(ids, lease, now_utc()):
                    publish_after_commit(unit, approval_topic(approval_id, PUSH_SENT))

    @staticmethod
    async def _finish_delivered(deliveries: DeliveryRepository, jobs: Sequence[Claimed]) -> None:
        """The common outcome in one UPDATE per lease instead of one per delivery; like
        `_finish`, conditional on our lease."""
        for lease, ids in _by_lease(jobs).items():
            for approval_id in await deliveries.finish_sent(ids, lease, now_utc()):
                publish_after_commit(deliveries.unit, approval_topic(approval_id, PUSH_SENT))

    @staticmethod
    async def _finish(
        deliveries: DeliveryRepository,
        job: Claimed,
        status: DeliveryStatus,
        error: str | None,
        next_attempt_at: datetime | None = None,
    ) -> bool:
        """Conditional on our lease: a reclaimed delivery belongs to its new owner."""
        changed = await deliveries.finish(
            job.delivery_id, job.lease_until, status, error, next_attempt_at=next_attempt_at
        )
        if changed:
            kind = PUSH_FAILED if status is DeliveryStatus.FAILED else PUSH_RETRY
            publish_after_commit(deliveries.unit, approval_topic(job.approval_id, kind))
        return changed

    async def _apply(
        self, deliveries: DeliveryRepository, approval_statuses: dict[str, str], sent: Sent
    ) -> None:
        """Record a send that did not deliver (deliveries are finished in bulk)."""
        job, result = sent.job, sent.result
        assert result.outcome is not Outcome.DELIVERED
        message = job.message
        assert message is not None
        reason = result.reason or result.outcome.value
        if result.outcome is Outcome.INVALID_TOKEN:
            if await self._finish(
                deliveries, job, DeliveryStatus.FAILED, f"invalid push token: {reason}"
            ):
                await deliveries.retire_token(message.device_id, message.token)
        elif result.outcome is Outcome.CONFIG_ERROR:
            await self._finish(
                deliveries, job, DeliveryStatus.FAILED, f"push configuration error: {reason}"
            )
        else:
            approval = approval_statuses.get(message.approval_id)
            await self._retry_or_give_up(deliveries, approval, job, reason, result.retry_after)

    async def _retry_or_give_up(
        self,
        deliveries: DeliveryRepository,
        approval: str | None,
        job: Claimed,
        reason: str,
        retry_after: float | None,
    ) -> None:
        message = job.message
        assert message is not None
        next_at = now_utc() + timedelta(seconds=self.backoff(job.attempts, retry_after))
        if approval != ApprovalStatus.PENDING:
            await self._finish(
                deliveries, job, DeliveryStatus.FAILED, f"{reason}; gave up: approval {approval}"
            )
        elif next_at >= message.expires_at:
            await self._finish(
                deliveries,
                job,
                DeliveryStatus.FAILED,
                f"{reason}; gave up: the approval expires first",
            )
        else:
            await self._finish(deliveries, job, DeliveryStatus.QUEUED, reason, next_at)


def _by_lease(jobs: Sequence[Claimed]) -> dict[datetime, list[str]]:
    """The deliveries' ids by the lease they were sent under."""
    by_lease: dict[datetime, list[str]] = defaultdict(list)
    for job in jobs:
        by_lease[job.lease_until].append(job.delivery_id)
    return by_lease


class _Pipeline:
    """The running dispatcher's sends in flight and the recorder of their outcomes."""

    def __init__(self, dispatcher: Dispatcher, subscription: Subscription) -> None:
        self.dispatcher = dispatcher
        self.subscription = subscription
        self.in_flight: set[asyncio.Task[None]] = set()
        self.reserved = 0  # places held for deliveries leased at birth, not yet handed over
        self.closed = False
        self.done: asyncio.Queue[Sent] = asyncio.Queue()
        self.waiting_for_room = False
        self.recorder = asyncio.create_task(self._record_forever(), name="pns-outbox-recorder")

    def room(self) -> int:
        return self.dispatcher.concurrency - len(self.in_flight) - self.reserved

    async def claim_and_start(self) -> bool:
        """Claim as many due deliveries as there is room for and start sending them; True
        when more may be due right away (a full claim), False when it is time to wait."""
        room = min(self.dispatcher.batch_size, self.room())
        if room <= 0:
            self.waiting_for_room = True  # the recorder wakes us when sends complete
            return False
        jobs = await self.dispatcher._claim(now_utc(), room)
        for job in jobs:
            if job.message is not None:
                self.start(job)
        return len(jobs) == room

    def start(self, job: Claimed) -> None:
        task = asyncio.create_task(self._send(job))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    def room_freed(self) -> None:
        if self.waiting_for_room:
            self.waiting_for_room = False
            self.subscription.wake()

    async def _send(self, job: Claimed) -> None:
        self.done.put_nowait(await self.dispatcher._send(job))

    async def _record_forever(self) -> None:
        """Outcomes that complete while a record transaction runs go together in the next."""
        dispatcher = self.dispatcher
        while True:
            finished = [await self.done.get()]
            while not self.done.empty():
                finished.append(self.done.get_nowait())
            try:
                await dispatcher._record(finished)
            except Exception:
                # Unrecorded, they keep their lease and are sent again once it expires.
                log.exception("recording %d push outcomes failed", len(finished))
            for _ in finished:
                self.done.task_done()
            self.room_freed()

    async def drain(self) -> None:
        """Let the sends in flight finish and their outcomes be recorded (stop() bounds
        this with its timeout)."""
        while self.in_flight:
            await asyncio.wait(set(self.in_flight))
        await self.done.join()

    def abandon(self) -> None:
        self.closed = True
        for task in self.in_flight:
            task.cancel()
        self.recorder.cancel()


class _BirthLease:
    """`runtime.BirthLease`: places held in a running pipeline until the creating
    transaction ends. Handed over, its deliveries start sending at once; released (the
    transaction rolled back, or its commit's outcome is unknown), nothing is sent, and
    any row that did commit waits for its lease to expire, like a send lost in a crash."""

    def __init__(self, pipeline: _Pipeline, count: int, now: datetime, lease: datetime) -> None:
        self.pipeline = pipeline
        self.count = count
        self.now = now
        self.lease_until = lease
        pipeline.reserved += count

    def send(self, rows: Sequence[ClaimedRow]) -> None:
        if not self._give_back():
            return
        pipeline = self.pipeline
        if pipeline.closed:
            return  # stopped meanwhile: the lease expires and a dispatcher claims them
        for row in rows:
            job = Dispatcher._prepare(self.now, self.lease_until, row)
            if job.message is not None:
                pipeline.start(job)

    def release(self) -> None:
        if self._give_back():
            self.pipeline.room_freed()

    def _give_back(self) -> bool:
        """The held places back to the pipeline, once; False when already done."""
        if self.count == 0:
            return False
        self.pipeline.reserved -= self.count
        self.count = 0
        return True


def start_dispatcher(runtime: Runtime) -> Dispatcher:
    dispatcher = Dispatcher(runtime)
    runtime.tasks.append(dispatcher.start())
    runtime.dispatcher = dispatcher
    return dispatcher
