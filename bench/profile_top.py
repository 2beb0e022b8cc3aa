"""`python -m bench.profile_top FILE [N]`: the top costs in a py-spy `--format raw` profile.

Prints the functions with the most samples on top of the stack (self) and the ones most
often anywhere on the stack (inclusive), as a share of all samples, idle frames excluded."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

# The event loop waiting in epoll is idle time, not a cost.
IDLE = ("select (selectors.py", "_run_once (asyncio/base_events.py")


def parse(path: Path) -> tuple[Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [f.split(":")[0] for f in stack.split(";")]
        if frames[-1].startswith(IDLE[0]):
            continue
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    return own, anywhere, total


def main(argv: list[str]) -> None:
    own, anywhere, total = parse(Path(argv[0]))
    limit = int(argv[1]) if len(argv) > 1 else 20
    print(f"{total} busy samples")
    for title, counter in (("self", own), ("inclusive", anywhere)):
        print(f"\n-- top {limit} by {title}")
        for frame, count in counter.most_common(limit):
            print(f"{100 * count / max(total, 1):5.1f}%  {frame}")


if __name__ == "__main__":
    main(sys.argv[1:])
