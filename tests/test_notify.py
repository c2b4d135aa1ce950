"""Tests of edgernnd.notify against real AF_UNIX datagram sockets."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import pytest

from edgernnd.notify import Notifier

RECV_TIMEOUT_S = 2.0


@pytest.fixture
def path_socket(tmp_path):
    """A datagram socket bound to a file; yields (socket, NOTIFY_SOCKET value)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT_S)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_socket():
    """A datagram socket bound to an abstract name; yields (socket, '@name')."""
    name = f"edgernn-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECV_TIMEOUT_S)
    yield sock, "@" + name
    sock.close()


def receive(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_notifier_path_socket_sends_exact_datagrams(path_socket):
    sock, address = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})

    assert notifier.enabled
    assert notifier.ready()
    assert receive(sock) == b"READY=1"
    assert notifier.status("412.3 frames/s, 8 streams")
    assert receive(sock) == b"STATUS=412.3 frames/s, 8 streams"
    assert notifier.watchdog()
    assert receive(sock) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert receive(sock) == b"STOPPING=1"
    notifier.close()


def test_notifier_abstract_socket_sends_exact_datagrams(abstract_socket):
    sock, address = abstract_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})

    assert notifier.ready()
    assert receive(sock) == b"READY=1"
    assert notifier.watchdog()
    assert receive(sock) == b"WATCHDOG=1"
    notifier.close()


def test_notifier_reloading_sends_current_monotonic_usec(path_socket):
    sock, address = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})

    before_usec = time.monotonic_ns() // 1000
    assert notifier.reloading()
    after_usec = time.monotonic_ns() // 1000

    lines = receive(sock).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before_usec <= int(value) <= after_usec
    assert len(lines) == 2
    notifier.close()


def test_notifier_status_flattens_line_breaks(path_socket):
    sock, address = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})

    notifier.status("port lost\nREADY=1")

    assert receive(sock) == b"STATUS=port lost READY=1"
    notifier.close()


def test_notifier_without_socket_is_noop():
    notifier = Notifier.from_environ({})

    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False
    assert notifier.watchdog_interval_s() is None


def test_notifier_unsupported_address_disables(caplog):
    with caplog.at_level(logging.WARNING, logger="edgernnd.notify"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})

    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text


def test_notifier_send_error_is_logged_once_not_raised(tmp_path, caplog):
    missing = str(tmp_path / "nobody-listens.sock")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": missing})

    with caplog.at_level(logging.WARNING, logger="edgernnd.notify"):
        results = [notifier.watchdog() for _ in range(5)]

    assert results == [False] * 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage()
    notifier.close()


def test_notifier_recovers_after_receiver_appears(tmp_path):
    path = str(tmp_path / "late.sock")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.ready() is False

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT_S)
    try:
        assert notifier.ready()
        assert receive(sock) == b"READY=1"
    finally:
        sock.close()
        notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected_s"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(os.getpid())}, 2.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "init"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_notifier_watchdog_interval_s_honours_pid(environ, expected_s):
    notifier = Notifier.from_environ(environ)

    assert notifier.watchdog_interval_s() == expected_s
