"""The zero-configuration sender: writes each push to the log instead of sending it."""

from __future__ import annotations

import logging

from pns_server.push.base import Outcome, PushMessage, PushResult

log = logging.getLogger("pns.push")


class LogPushSender:
    service = "log"

    def __init__(self) -> None:
        self.sent: list[PushMessage] = []

    async def send(self, message: PushMessage) -> PushResult:
        # The push token is a device identifier: log only its tail.
        log.info(
            "push (log sender) to device %s via %s token …%s: %s — %s [approval %s]",
            message.device_id,
            message.service,
            message.token[-6:],
            message.title,
            message.body,
            message.approval_id,
        )
        self.sent.append(message)
        del self.sent[:-1000]  # keep memory bounded on a long-running embedded relay
        return PushResult(Outcome.DELIVERED)

    async def close(self) -> None:
        return None
