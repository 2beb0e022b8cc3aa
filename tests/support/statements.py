"""Counting what the relay sends to its database, from whichever task sends it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pns_server import driver


@contextmanager
def statements_where(wanted: Callable[[str], bool]) -> Iterator[list[str]]:
    """The statements (whitespace folded) run meanwhile on the driver connection for which
    `wanted` is true: background tasks' included, unlike a count kept per request."""
    seen: list[str] = []

    def on_statement(sql: str) -> None:
        words = " ".join(sql.split())
        if wanted(words):
            seen.append(words)

    driver.statement_listeners.append(on_statement)
    try:
        yield seen
    finally:
        driver.statement_listeners.remove(on_statement)
