"""The `pns-server` command: one clear line, not a traceback, where only the SDK is installed.

`pip install pns-relay` (the SDK) still installs the `pns-server` script, because a wheel's
scripts cannot depend on an extra. This module imports nothing beyond the standard library
until it knows the relay's dependencies are there."""

from __future__ import annotations

import sys
from collections.abc import Sequence

DISTRIBUTION = "pns-relay"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from pns_server.cli import main as cli_main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing in ("pns_server", "client_sdk"):
            raise  # our own code is broken: that deserves the traceback
        print(
            f"pns-server: only the SDK of {DISTRIBUTION} is installed here (no module "
            f"{missing!r}); the relay needs the [server] extra: "
            f"pip install '<checkout or wheel of {DISTRIBUTION}>[server]'",
            file=sys.stderr,
        )
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
