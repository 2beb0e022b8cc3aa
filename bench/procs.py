"""The benchmark's helper processes: the fake APNs, the fake FCM and the simulated phones
each run in a process of their own (`python -m bench.procs ROLE DIR`), with their own event
loop, so none of them shares a core's time slice or a loop with the load generator or a relay.

Each helper is driven over its stdin/stdout with one JSON object per line: it prints
`{"ready": ...}` once, then answers every request that carries an `"id"` with one line.

- `apns DIR`: the fake APNs. Besides HTTP/2 it offers a plain TCP *device channel* (the
  persistent connection a real phone holds to Apple): every push it accepts is written to
  each connected channel as `{"token", "approval_id"}`, the way APNs hands it to the phone.
- `fcm DIR`: the fake FCM (its uvicorn on this process's main thread).
- `phones DIR`: the simulated phones. Given their credentials (`load`), they listen on the
  fake APNs' device channel; for each push they fetch the request over the device API and
  send a signed approval with the number the user read off the backup client's screen
  (`code`, sent by the load generator, as a user types it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.rawhttp import RawRelay

# PNS_BENCH_DEBUG=1: each phone logs when its push, code, detail and answer came (phones.log).
DEBUG = bool(os.environ.get("PNS_BENCH_DEBUG"))


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_requests(handle: Any) -> None:
    """Answer stdin requests until stdin closes (the load generator is done)."""
    reader = await stdin_lines()
    while line := await reader.readline():
        request = json.loads(line)
        reply = await handle(request)
        if "id" in request:
            say({"id": request["id"], **(reply or {})})


class Counter:
    """What a fake provider received: how many, first and last arrival (monotonic clock,
    which on Linux is one clock for every process)."""

    def __init__(self) -> None:
        self.count = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.changed = asyncio.Event()

    def hit(self) -> None:
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.last_at = now
        self.count += 1
        self.changed.set()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "wait":
            deadline = time.monotonic() + float(request.get("timeout", 60))
            while self.count < int(request["count"]) and time.monotonic() < deadline:
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
        return {"count": self.count, "first_at": self.first_at, "last_at": self.last_at}


# -- fake APNs ------------------------------------------------------------------------------
async def run_apns(tmp: Path) -> None:
    from tests.fakes.apns import FakeApns, Received
    from tests.fakes.tls import CertificateAuthority

    counter = Counter()
    channels: list[asyncio.StreamWriter] = []

    class ForwardingApns(FakeApns):
        async def _record(self, item: Received) -> None:
            counter.hit()
            line = json.dumps(
                {"token": item.token, "approval_id": item.payload.get("approval_id")}
            ).encode()
            for writer in channels:
                writer.write(line + b"\n")

    async def device_channel(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channels.append(writer)

    ca = CertificateAuthority("Bench APNs CA")
    async with ForwardingApns(ca=ca, max_concurrent_streams=1000) as apns:
        channel = await asyncio.start_server(device_channel, "127.0.0.1", 0)
        env = {
            "PNS_APNS_KEY_FILE": str(apns.write_key(tmp / "AuthKey.p8")),
            "PNS_APNS_KEY_ID": apns.key_id,
            "PNS_APNS_TEAM_ID": apns.team_id,
            "PNS_APNS_TOPIC": apns.topic,
            "PNS_APNS_URL": apns.url,
            "PNS_APNS_SANDBOX_URL": apns.url,
        }
        ca_file = str(ca.write_ca(tmp / "apns-ca.pem"))
        port = channel.sockets[0].getsockname()[1]
        say({"ready": {"env": env, "ca_file": ca_file, "device_channel": port}})
        await serve_requests(counter.handle)
        channel.close()


# -- fake FCM -------------------------------------------------------------------------------
async def run_fcm(tmp: Path) -> None:
    from tests.fakes.fcm import FakeFcm
    from tests.fakes.tls import CertificateAuthority

    counter = Counter()
    with FakeFcm(ca=CertificateAuthority("Bench FCM CA")) as fcm:
        env = {
            "PNS_FCM_CREDENTIALS_FILE": str(fcm.write_credentials(tmp / "sa.json")),
            "PNS_FCM_URL": fcm.url,
        }
        say({"ready": {"env": env, "ca_file": str(fcm.write_ca(tmp / "fcm-ca.pem"))}})

        async def handle(request: dict[str, Any]) -> dict[str, Any]:
            # The fake's uvicorn runs in its own thread here; catch the counter up first.
            while counter.count < len(fcm.state.received):
                counter.hit()
            if request.get("op") == "wait":
                deadline = time.monotonic() + float(request.get("timeout", 60))
                while len(fcm.state.received) < int(request["count"]):
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.002)
                    while counter.count < len(fcm.state.received):
                        counter.hit()
            return {
                "count": counter.count,
                "first_at": counter.first_at,
                "last_at": counter.last_at,
            }

        await serve_requests(handle)


# -- simulated phones -----------------------------------------------------------------------
class Phone:
    def __init__(self, record: dict[str, Any]) -> None:
        self.device_id: str = record["device_id"]
        self.headers = {"Authorization": f"Bearer {record['token']}"}
        key = serialization.load_pem_private_key(record["key_pem"].encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key

    def answer(self, approval_id: str, match_code: str | None) -> dict[str, Any]:
        timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        message = f"pns-approval-v1|{approval_id}|approve|{match_code or ''}|{timestamp}"
        signature = self.key.sign(message.encode(), ec.ECDSA(hashes.SHA256()))
        return {
            "decision": "approve",
            "match_code": match_code,
            "fraud": False,
            "timestamp": timestamp,
            "signature": base64.b64encode(signature).decode(),
        }


async def run_phones(_tmp: Path, relay_url: str, channel_port: int) -> None:
    phones: dict[str, Phone] = {}  # by push token
    codes: dict[str, asyncio.Future[str | None]] = defaultdict(
        lambda: asyncio.get_running_loop().create_future()
    )
    stats = {"answered": 0, "failed": 0}
    tasks: set[asyncio.Task[None]] = set()
    relay = RawRelay(urlsplit(relay_url).port or 80)

    async def on_push(token: str, approval_id: str) -> None:
        phone = phones.get(token)
        if phone is None:
            return
        try:
            t_push = time.monotonic()
            match_code = await asyncio.wait_for(codes[approval_id], 60)
            t_code = time.monotonic()
            path = f"/v1/device/approvals/{approval_id}"
            await relay.get_json(path, phone.headers)
            t_detail = time.monotonic()
            await relay.post_json(
                f"{path}/response", phone.answer(approval_id, match_code), phone.headers
            )
            if DEBUG:
                t_done = time.monotonic()
                print(
                    f"{approval_id}: push {t_push:.4f} code {t_code:.4f} "
                    f"detail {t_detail:.4f} answered {t_done:.4f} (monotonic s)",
                    file=sys.stderr,
                )
            stats["answered"] += 1
        except Exception as exc:
            stats["failed"] += 1
            print(f"phone {phone.device_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            codes.pop(approval_id, None)

    async def listen() -> None:
        reader, _writer = await asyncio.open_connection("127.0.0.1", channel_port)
        while line := await reader.readline():
            push = json.loads(line)
            task = asyncio.create_task(on_push(push["token"], push["approval_id"]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "load":
            for record in request["phones"]:
                phones[record["push_token"]] = Phone(record)
        elif op == "code":
            future = codes[request["approval_id"]]
            if not future.done():
                future.set_result(request["match_code"])
        return dict(stats)

    listener = asyncio.create_task(listen())
    say({"ready": {}})
    try:
        await serve_requests(handle)
    finally:
        listener.cancel()
        relay.close()


def main(argv: list[str]) -> None:
    role, tmp = argv[0], Path(argv[1])
    if role == "apns":
        asyncio.run(run_apns(tmp))
    elif role == "fcm":
        asyncio.run(run_fcm(tmp))
    elif role == "phones":
        asyncio.run(run_phones(tmp, argv[2], int(argv[3])))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
