"""Ports for servers a test starts by address (a process told where to listen)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1. Also what a test uses for a closed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
