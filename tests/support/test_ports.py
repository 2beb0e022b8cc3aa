"""The ports the test processes hand out: each process its own range, in use ones skipped."""

from __future__ import annotations

import socket

from tests.support.postgres import free_port, this_process_ports


def test_ports_come_from_this_process_range_and_are_not_handed_out_twice() -> None:
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert all(port in this_process_ports() for port in ports)


def test_a_port_something_listens_on_is_skipped() -> None:
    upcoming = free_port() + 1  # handed out in order, within the range
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", upcoming))
        listening.listen()
        port = free_port()
        assert port != upcoming and port in this_process_ports()
