"""What both commands share: the config directory, 0600 state files, and output that is
either sentences for people or one JSON document for scripts (`--json`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from client_sdk import __version__
from client_sdk._exceptions import ApiError, PnsError, TransportError, Unavailable

# Exit codes, the same for both commands (docs/sdk.md lists them):
EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran and said no (login refused, wrong code, check failed)
EXIT_USAGE = 2  # missing credentials, bad arguments (argparse exits 2 as well)
EXIT_UNREACHABLE = 3  # the relay could not be reached, or answered that it is unavailable
UNAVAILABLE_STATUSES = (502, 503, 504)


class CliError(Exception):
    """A problem the user can fix; printed as one sentence, never with a traceback."""

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/pns`, else `~/.config/pns` (the XDG base directory default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pns"


def load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        message = f"{path} is not readable JSON ({exc}); move it away and start again"
        raise CliError(message) from None
    if not isinstance(data, dict):
        raise CliError(f"{path} does not hold a JSON object; move it away and start again")
    return data


def save_state(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically, mode 0600 from the first byte: the file holds bearer tokens."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(dict(data), handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """Dataclasses, datetimes and tuples as plain JSON values (times as RFC 3339 with Z)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class Output:
    """Sentences go to stdout for people; with `--json` they go to stderr (so a watcher
    still sees progress) and stdout carries exactly one JSON document."""

    def __init__(self, as_json: bool, stdout: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stdout = stdout or sys.stdout
        self.stderr = sys.stderr

    @property
    def interactive(self) -> bool:
        return not self.as_json and self.stdout.isatty()

    def say(self, text: str = "") -> None:
        print(text, file=self.stderr if self.as_json else self.stdout, flush=True)

    def status(self, text: str) -> None:
        """A line that redraws itself (spinner, countdown) on a terminal; silent otherwise."""
        if self.interactive:
            self.stdout.write("\r\033[K" + text)
            self.stdout.flush()

    def end_status(self) -> None:
        if self.interactive:
            self.stdout.write("\r\033[K")
            self.stdout.flush()

    def result(self, data: Any) -> None:
        if self.as_json:
            json.dump(jsonable(data), self.stdout, indent=2, sort_keys=True)
            self.stdout.write("\n")
            self.stdout.flush()

    def error(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        if self.as_json:
            self.result({"error": {"message": message, "code": code, **extra}})
        else:
            print(f"error: {message}", file=self.stderr, flush=True)


def exit_code_for(exc: PnsError) -> int:
    """1 when the relay said no; 3 when there was no usable relay to ask, so a script can
    tell "refused" from "try again later"."""
    if isinstance(exc, TransportError | Unavailable):
        return EXIT_UNREACHABLE
    if isinstance(exc, ApiError) and exc.status in UNAVAILABLE_STATUSES:
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def explain(exc: PnsError) -> tuple[str, str | None]:
    """A sentence for the user and the stable code, if the server gave one."""
    if isinstance(exc, ApiError):
        return str(exc), exc.code
    return str(exc), type(exc).__name__


def common_options() -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand (`pns-client --json devices`
    and `pns-client devices --json`). SUPPRESS keeps a later default from erasing an
    earlier value."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document"
    )
    parent.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="state file to use"
    )
    parent.add_argument("--server", metavar="URL", default=argparse.SUPPRESS, help="relay base URL")
    return parent


SPINNER = "|/-\\"
