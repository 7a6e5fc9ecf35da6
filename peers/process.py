"""Ports, readiness and stopping, shared by every peer."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx

__all__ = ["PeerError", "free_port", "wait_http", "stop"]


class PeerError(RuntimeError):
    """A peer could not be started; the message carries its log."""


def free_port() -> int:
    # Port 0: the kernel picks a free port, released just before the peer binds it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen, what: str, log: str = "", timeout: float = 60.0) -> None:
    """Until ``url`` answers 200; fails early if the process already exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"{what} exited with code {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise PeerError(f"{what} did not answer {url} within {timeout:.0f} s:\n{_tail(log)}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the process does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def _tail(log: str) -> str:
    try:
        with open(log, errors="replace") as file:
            return "".join(file.readlines()[-40:])
    except OSError:
        return ""
