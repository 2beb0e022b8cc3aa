"""`pns-client` and `pns-device` end to end against a real relay process."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
import zxingcpp
from PIL import Image

import client_sdk
from client_sdk import ApiError, OtpInvalid, RequestTimeout, Unavailable
from client_sdk._wire import pairing_secret_of, parse_qr_payload
from client_sdk.cli import client as client_cli
from client_sdk.cli import device as device_cli
from client_sdk.cli._common import exit_code_for
from tests.client_sdk.cli.conftest import Cli
from tests.support.postgres import free_port

pytestmark = pytest.mark.slow


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestSetUp:
    def test_register_pair_devices_otp_recovery_codes(self, registered: Cli) -> None:
        cli = registered
        config = cli.config_home / "pns" / "client.json"
        assert mode_of(config) == 0o600
        assert json.loads(config.read_text())["server"] == cli.server.url

        device_id = cli.pair_phone()
        assert mode_of(cli.config_home / "pns" / "device.json") == 0o600

        code, listing = cli.client("devices")
        assert code == 0
        assert [(d["device_id"], d["name"], d["kind"]) for d in listing["devices"]] == [
            (device_id, "Test phone", "app")
        ]

        code, shown = cli.device("otp")
        assert code == 0 and re.fullmatch(r"\d{6}", shown["code"])
        code, verified = cli.client("otp", shown["code"])
        assert (code, verified["result"], verified["device_id"]) == (0, "accepted", device_id)

        code, replay = cli.client("otp", shown["code"])
        assert code == 1
        assert replay["error"]["code"] == "otp_replayed"

        code, recovery = cli.client("recovery-codes")
        assert code == 0 and len(recovery["codes"]) == 10

    def test_register_refuses_to_overwrite_credentials(self, registered: Cli) -> None:
        code, body = registered.client("register", "--name", "OTHER")
        assert code == 2
        assert "--force" in body["error"]["message"]

    def test_commands_without_credentials_say_how_to_register(self, cli: Cli) -> None:
        code, body = cli.client("--server", cli.server.url, "devices")
        assert code == 2
        assert "pns-client register" in body["error"]["message"]

    def test_remove_device(self, registered: Cli) -> None:
        device_id = registered.pair_phone()
        assert registered.client("remove", device_id)[0] == 0
        assert registered.client("devices")[1]["devices"] == []
        code, body = registered.device("pending")
        assert code == 1 and body["error"]["code"] == "unauthenticated"

    def test_totp_pairing_confirmed_with_the_apps_first_code(self, registered: Cli) -> None:
        code, pairing = registered.client("pair", "--kind", "totp", "--label", "Authy", "--no-wait")
        assert code == 0
        uri = pairing["otpauth_uri"]
        assert pairing["qr_payload"] == uri
        secret = parse_qs(urlparse(uri).query)["secret"][0]

        code, body = registered.client("confirm", pairing["pairing_id"], pyotp.TOTP(secret).now())
        assert code == 0 and body["device"]["kind"] == "totp"

    def test_pair_writes_png_and_svg_qr_codes(self, registered: Cli, tmp_path) -> None:
        png, svg = tmp_path / "pair.png", tmp_path / "pair.svg"
        code, pairing = registered.client(
            "pair", "--no-wait", "--qr-png", str(png), "--qr-svg", str(svg)
        )
        assert code == 0
        with Image.open(png) as image:
            decoded = [b.text for b in zxingcpp.read_barcodes(image.convert("L"))]
        # The relay offers the web approver: the QR is the https link, which carries the
        # pairing code's server, token and secret (one parser reads both forms).
        assert decoded == [pairing["qr_link"]]
        assert decoded[0].startswith(registered.server.url + "/app/pair#server=")
        assert parse_qr_payload(decoded[0]) == parse_qr_payload(pairing["qr_payload"])
        assert pairing_secret_of(decoded[0]) == pairing_secret_of(pairing["qr_payload"])
        assert ET.parse(svg).getroot().tag.endswith("svg")

    def test_pair_waits_and_says_which_device_joined(self, registered: Cli) -> None:
        process = registered.spawn("client_sdk.cli.client", "pair", "--no-qr", "--timeout", "30")
        assert process.stdout is not None
        payload = None
        for line in process.stdout:
            # The relay serves the web approver, so the CLI shows the https link; the
            # device simulator pairs with it like a native app claiming the link.
            if line.strip().startswith(registered.server.url + "/app/pair#"):
                payload = line.strip()
                break
        assert payload is not None
        assert registered.device("pair", payload, "--name", "Ann's phone")[0] == 0
        rest, _ = process.communicate(timeout=30)
        assert process.returncode == 0
        assert "'Ann's phone'" in rest or "Ann's phone" in rest
        assert "joined" in rest


class TestLogin:
    def start_login(self, cli: Cli, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
        process = cli.spawn(
            "client_sdk.cli.client",
            *extra,
            "login",
            "--username",
            "admin",
            stdin=subprocess.DEVNULL,
        )
        stream = process.stderr if "--json" in extra else process.stdout
        assert stream is not None
        match_code = None
        for line in stream:
            found = re.match(r"Match code: (\d+)", line.strip())
            if found:
                match_code = found.group(1)
                break
        assert match_code is not None, process.communicate(timeout=5)
        code, pending = cli.device("pending")
        assert code == 0 and len(pending["approvals"]) == 1
        return process, pending["approvals"][0]["approval_id"], match_code

    def test_approved_with_the_right_code(self, registered: Cli) -> None:
        registered.pair_phone()
        process, approval_id, match_code = self.start_login(registered, "--json")

        code, decision = registered.device("approve", approval_id, "--code", match_code)
        assert (code, decision["status"]) == (0, "approved")

        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0
        result = json.loads(out)
        assert (result["outcome"], result["method"]) == ("approved", "push")
        assert result["approval"]["verified"] is True

    def test_rejected_says_so(self, registered: Cli) -> None:
        registered.pair_phone()
        process, approval_id, _ = self.start_login(registered)

        code, decision = registered.device("reject", approval_id)
        assert (code, decision["status"]) == (0, "rejected")

        out, _ = process.communicate(timeout=30)
        assert process.returncode == 1
        assert "REJECTED on the phone" in out

    def test_wrong_code_on_the_phone_rejects(self, registered: Cli) -> None:
        registered.pair_phone()
        process, approval_id, match_code = self.start_login(registered, "--json")
        wrong = str((int(match_code) + 1) % 10 ** len(match_code)).zfill(len(match_code))

        code, decision = registered.device("approve", approval_id, "--code", wrong)
        assert (code, decision["status"]) == (1, "rejected")

        out, _ = process.communicate(timeout=30)
        result = json.loads(out)
        assert result["outcome"] == "rejected"
        assert result["approval"]["reason"] == "number_mismatch"

    def test_watch_prompts_and_approves_with_the_typed_number(self, registered: Cli) -> None:
        registered.pair_phone()
        process, _, match_code = self.start_login(registered, "--json")
        watcher = registered.spawn(
            "client_sdk.cli.device",
            "watch",
            "--count",
            "1",
            "--interval",
            "0.2",
            stdin=subprocess.PIPE,
        )
        shown, _ = watcher.communicate(f"{match_code}\n", timeout=30)
        assert watcher.returncode == 0
        assert "New request: login by admin" in shown
        assert "-> approved" in shown

        out, _ = process.communicate(timeout=30)
        assert json.loads(out)["outcome"] == "approved"

    def test_no_phone_offers_the_code_at_once(self, registered: Cli) -> None:
        process = registered.spawn(
            "client_sdk.cli.client", "login", "--username", "admin", stdin=subprocess.PIPE
        )
        out, _ = process.communicate("000000\n", timeout=30)
        assert "not available" in out
        assert "Login refused" in out
        assert process.returncode == 1


class TestDiagnose:
    def test_against_the_live_relay_everything_is_ok(self, registered: Cli) -> None:
        code, report = registered.client("diagnose")
        assert code == 0, report
        statuses = {c["name"]: c["status"] for c in report["checks"]}
        assert statuses == {
            "dns": "ok",
            "tcp": "ok",
            "tls": "warn",  # plain http on 127.0.0.1
            "ping": "ok",
            "clock": "ok",
            "credentials": "ok",
        }

    def test_closed_port_explains_the_firewall(self, cli: Cli) -> None:
        port = free_port()
        code, report = cli.client("--server", f"http://127.0.0.1:{port}", "diagnose")
        assert code == 1
        tcp = next(c for c in report["checks"] if c["name"] == "tcp")
        assert tcp["status"] == "fail"
        assert f"127.0.0.1 port {port}" in tcp["fix"]
        assert "firewall" in tcp["fix"]
        assert {c["status"] for c in report["checks"][2:]} == {"skip"}

    def test_unknown_token_says_to_register_again(self, registered: Cli) -> None:
        config = registered.config_home / "pns" / "client.json"
        data = json.loads(config.read_text())
        data["client_token"] = "pnsc_not-a-real-token"
        config.write_text(json.dumps(data))
        code, report = registered.client("diagnose")
        assert code == 1
        creds = report["checks"][-1]
        assert creds["status"] == "fail" and "register" in creds["fix"]


class TestScriptingHabits:
    """What a script relies on: --version, exit codes, the token from the environment."""

    @pytest.mark.parametrize(
        ("main", "prog"), [(client_cli.main, "pns-client"), (device_cli.main, "pns-device")]
    )
    def test_version(self, main, prog: str, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as info:
            main(["--version"])
        assert info.value.code == 0
        assert capsys.readouterr().out.strip() == f"{prog} {client_sdk.__version__}"

    def test_usage_errors_exit_2(self, cli: Cli) -> None:
        with pytest.raises(SystemExit) as info:
            client_cli.main(["login", "--no-such-option"])
        assert info.value.code == 2
        code, report = cli.client("devices")  # no credentials anywhere
        assert code == 2 and report["error"]["code"] == "usage"

    def test_an_unreachable_relay_exits_3(self, cli: Cli) -> None:
        closed = f"http://127.0.0.1:{free_port()}"
        code, report = cli.client("--server", closed, "register", "--name", "X")
        assert code == 3 and report["error"]["code"] == "ConnectError"
        code, _ = cli.device("pair", f"pns://pair?server={closed}&token=pnsp_x")
        assert code == 3

    def test_a_refused_code_exits_1(self, registered: Cli) -> None:
        # (A login rejected on the phone exits 1 too: TestLogin.test_rejected_says_so.)
        code, _ = registered.client("otp", "000000")
        assert code == 1

    def test_the_token_can_come_from_the_environment(
        self, registered: Cli, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        config = registered.config_home / "pns" / "client.json"
        token = json.loads(config.read_text())["client_token"]
        config.unlink()
        monkeypatch.setenv("PNS_SERVER", registered.server.url)
        monkeypatch.setenv("PNS_CLIENT_TOKEN", token)
        code, listing = registered.client("devices")
        assert code == 0 and listing["devices"] == []
        # The environment wins over a state file, so a wrong one is refused, not ignored.
        monkeypatch.setenv("PNS_CLIENT_TOKEN", "pnsc_not-a-real-token")
        code, report = registered.client("devices")
        assert code == 1 and report["error"]["code"] == "unauthenticated"


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (Unavailable(503, "unavailable", "busy", {}), 3),
        (ApiError(502, "", "Bad Gateway", {}), 3),
        (ApiError(504, "", "Gateway Timeout", {}), 3),
        (RequestTimeout("timed out"), 3),
        (OtpInvalid(401, "otp_invalid", "wrong", {}), 1),
        (ApiError(500, "internal_error", "bug", {}), 1),
    ],
)
def test_exit_code_for(error: Exception, exit_code: int) -> None:
    assert exit_code_for(error) == exit_code  # type: ignore[arg-type]
