"""Write the relay's OpenAPI document to docs/openapi.json (`make openapi`).

python scripts/openapi.py            # regenerate
python scripts/openapi.py --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from pns_server.app import create_app  # noqa: E402
from pns_server.config import Settings  # noqa: E402
from pns_server.docs_page import openapi_json  # noqa: E402

TARGET = ROOT / "docs" / "openapi.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that it is current")
    args = parser.parse_args()
    # The document depends on the code only; the settings just let the app be built.
    document = openapi_json(create_app(Settings(database_url="", public_url="http://x")))
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != document:
            print(f"{TARGET.relative_to(ROOT)} is stale: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(document, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
