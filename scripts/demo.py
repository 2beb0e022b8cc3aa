"""`make demo`: the whole PNS flow in one terminal, narrated.

Starts a relay on the embedded default (SQLite in a temporary directory, pushes printed
instead of sent) on a free port, then plays both sides with the real commands:
`pns-client` is the backup client on a file server, `pns-device` is the owner's phone.

    1. register the backup client      4. a login the phone rejects
    2. pair the phone from the QR code  5. a login finished with a one-time password
    3. a login the phone approves

Nothing outside the temporary directory is touched; it is deleted at the end."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

CLIENT = "client_sdk.cli.client"
DEVICE = "client_sdk.cli.device"
NAMES = {CLIENT: "pns-client", DEVICE: "pns-device"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(workdir / "config"),
            "PYTHONUNBUFFERED": "1",
        }
        for name in [k for k in self.env if k.startswith("PNS_")]:
            del self.env[name]  # the demo shows the zero-configuration default

    # -- narration --

    @staticmethod
    def step(number: int, title: str, text: str) -> None:
        print(f"\n=== {number}. {title} ===", flush=True)
        print(textwrap.fill(textwrap.dedent(text).strip(), 88), flush=True)

    @staticmethod
    def show(prefix: str, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            print(f"  {prefix} {line}", flush=True)

    def command(self, module: str, *argv: str) -> list[str]:
        printable = " ".join(a if " " not in a else repr(a) for a in argv)
        print(f"\n  $ {NAMES[module]} {printable}", flush=True)
        return [sys.executable, "-m", module, *argv]

    def run(self, module: str, *argv: str, quiet: bool = False) -> str:
        done = subprocess.run(
            self.command(module, *argv), env=self.env, capture_output=True, text=True, check=False
        )
        if not quiet:
            self.show("|", done.stdout)
        if done.returncode != 0:
            self.show("!", done.stderr)
            raise SystemExit(f"demo step failed: {NAMES[module]} {' '.join(argv)}")
        return done.stdout

    def run_json(self, module: str, *argv: str) -> Any:
        return json.loads(self.run(module, "--json", *argv, quiet=True))

    # -- the relay --

    @contextmanager
    def relay(self) -> Iterator[None]:
        env = {
            **self.env,
            "PNS_DATA_DIR": str(self.workdir / "relay"),
            "PNS_HOST": "127.0.0.1",
            "PNS_PORT": str(self.port),
            "PNS_PUBLIC_URL": self.url,
        }
        log_path = self.workdir / "relay.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pns_server.cli", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                self.wait_until_up(process, log_path)
                self.show("relay>", log_path.read_text().splitlines()[0])
                yield
            finally:
                process.terminate()
                process.wait(20)

    def wait_until_up(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit("the relay did not start:\n" + log_path.read_text())
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("the relay did not answer within 60 s:\n" + log_path.read_text())

    # -- logins --

    def start_login(self, stdin_text: str | None = None) -> tuple[subprocess.Popen[str], str]:
        """Start `pns-client login`, echo its screen until it shows the match code."""
        argv = self.command(CLIENT, "login", "--username", "admin", "--ip", "203.0.113.7")
        process = subprocess.Popen(
            argv,
            env=self.env,
            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        match_code = None
        for line in process.stdout:
            self.show("client>", line)
            found = re.match(r"Match code: (\d+)", line.strip())
            match_code = found.group(1) if found else match_code
            if line.startswith("Press Enter") and match_code:
                return process, match_code
        raise SystemExit("the login ended before showing a match code")

    def finish_login(self, process: subprocess.Popen[str], stdin_text: str | None = None) -> int:
        """Type `stdin_text` (if any) and echo the rest of the login screen."""
        assert process.stdout is not None
        if process.stdin is not None:
            process.stdin.write(stdin_text or "")
            process.stdin.close()
        for line in process.stdout:
            self.show("client>", line)
        return process.wait(timeout=120)

    def pending_id(self) -> str:
        pending = self.run_json(DEVICE, "pending")["approvals"]
        if len(pending) != 1:
            raise SystemExit(f"expected one pending request on the phone, found {len(pending)}")
        approval = pending[0]
        ctx = approval["context"]
        self.show(
            "phone>", f"Login request: {ctx['username']} on {ctx['hostname']} from {ctx['ip']}"
        )
        return str(approval["approval_id"])

    # -- the story --

    def play(self) -> int:
        self.step(
            0,
            "Start a relay",
            """The relay runs with no configuration at all: an SQLite file in a data
            directory, and a push sender that prints pushes to its log instead of calling
            Apple or Google. Here it lives in a temporary directory.""",
        )
        with self.relay():
            self.register_and_pair()
            approved = self.approved_login()
            rejected = self.rejected_login()
            otp = self.otp_login()
        ok = approved == 0 and rejected == 1 and otp == 0
        print("\n=== Done ===", flush=True)
        print(
            "Approved with the right number, rejected on the phone, then a one-time password."
            if ok
            else "Something did not go as described above.",
            flush=True,
        )
        return 0 if ok else 1

    def register_and_pair(self) -> None:
        self.step(
            1,
            "Register the backup client",
            """A backup client registers once and keeps its token in a file only its user
            can read (mode 0600).""",
        )
        self.run(CLIENT, "--server", self.url, "register", "--name", "FILESRV01")
        self.step(
            2,
            "Pair the phone",
            """The backup client shows a QR code; the phone scans it, creates a P-256 key
            in its secure hardware and enrols with it. The QR code ends with a secret
            (k=...) that never reaches the relay: the phone proves its key with it, and the
            backup client pins the key only when that proof checks out, so not even the
            relay can slip in a key of its own. Here the simulated phone gets the QR code's
            text directly.""",
        )
        pairing = self.run(CLIENT, "pair", "--no-wait")
        # The relay serves the web approver, so the code is its https link; the phone
        # simulator reads it like a native app claiming the link.
        payload = next(p for p in pairing.split() if "/app/pair#" in p or p.startswith("pns://"))
        self.run(DEVICE, "pair", payload, "--name", "Ann's phone")
        self.run(CLIENT, "devices")

    def approved_login(self) -> int:
        self.step(
            3,
            "A login the phone approves",
            """Someone logs in to the backup client. It asks the relay for an approval and
            shows a short number; the phone gets a push, shows who is logging in from where,
            and the owner types that number to approve. The backup client checks the
            phone's signature itself before letting anyone in.""",
        )
        process, match_code = self.start_login()
        approval_id = self.pending_id()
        self.run(DEVICE, "approve", approval_id, "--code", match_code)
        return self.finish_login(process)

    def rejected_login(self) -> int:
        self.step(
            4,
            "A login the phone rejects",
            """The owner did not try to log in, so they tap Reject. The backup client says so
            at once (it was long-polling, not sleeping). With nobody to type a one-time
            password the login is refused.""",
        )
        process, _ = self.start_login()
        approval_id = self.pending_id()
        self.run(DEVICE, "reject", approval_id)
        return self.finish_login(process)

    def otp_login(self) -> int:
        self.step(
            5,
            "A login with a one-time password",
            """The push does not arrive (no signal, say). The user presses Enter on the
            login screen and types the 6-digit code the app shows; it works offline on the
            phone, like Google Authenticator.""",
        )
        process, _ = self.start_login(stdin_text="")
        code = self.run_json(DEVICE, "otp")["code"]
        self.show("phone>", f"One-time password: {code}")
        self.show("user>", "(presses Enter, then types the code)")
        return self.finish_login(process, f"\n{code}\n")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pns-demo-") as workdir:
        return Demo(Path(workdir)).play()


if __name__ == "__main__":
    raise SystemExit(main())
