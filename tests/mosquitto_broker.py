"""A real mosquitto on 127.0.0.1 for tests, and a paho subscriber that records.

:class:`MosquittoBroker` writes a config into a directory of its own, listens on
a free loopback port, can be stopped and started again on the same port, and
kills its process when closed, garbage-collected or at interpreter exit.
:class:`Subscriber` is a paho client that keeps every message it receives and
lets a test wait, with a timeout, for a condition on them.

The broker never drops messages queued for an offline persistent session
(``max_queued_messages 0``), so a test sees only the client's own losses.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

_READY_MARK = " running"


def find_mosquitto() -> str | None:
    """The mosquitto binary (it usually lives in /usr/sbin, off a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_mosquitto_passwd() -> str | None:
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    candidate = "/usr/bin/mosquitto_passwd"
    return candidate if os.access(candidate, os.X_OK) else None


def pick_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MosquittoBroker:
    """One mosquitto process on 127.0.0.1, restartable on the same port.

    Args:
        directory: Where the config, password file and persistence go; a new
            temporary directory (removed on close) when None.
        users: ``{user: password}``; when given, anonymous clients are refused.
            Needs ``mosquitto_passwd``.
        persistence: Keep sessions and queued messages across :meth:`stop` and
            :meth:`start` (written at a clean stop).
        port: The port; a free one when None.
        tls_files: ``(certfile, keyfile)`` in PEM: the listener speaks TLS only.

    Raises:
        RuntimeError: mosquitto (or mosquitto_passwd, for ``users``) is missing.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        users: dict[str, str] | None = None,
        persistence: bool = False,
        port: int | None = None,
        tls_files: tuple[str | os.PathLike, str | os.PathLike] | None = None,
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed")
        self._binary = binary
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="mosquitto-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or pick_free_port()
        self.host = "127.0.0.1"
        self.persistence = persistence
        self._process: subprocess.Popen | None = None
        self._log_lines: list[str] = []
        self._log_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _kill_quietly, [None])
        self.config_path = self.directory / "mosquitto.conf"
        self._write_config(users, tls_files)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log(self) -> str:
        """What mosquitto wrote to stderr, across restarts."""
        with self._log_lock:
            return "".join(self._log_lines)

    def start(self, timeout_s: float = 10.0) -> None:
        """Starts mosquitto and returns once it listens.

        Raises:
            RuntimeError: It exited or did not report running within timeout_s.
        """
        if self.running:
            return
        ready = threading.Event()
        process = subprocess.Popen(
            [self._binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._process = process
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_quietly, [process])
        threading.Thread(
            target=self._read_log, args=(process, ready), daemon=True,
            name=f"mosquitto-log-{self.port}",
        ).start()
        if not ready.wait(timeout_s) or process.poll() is not None:
            self.kill()
            raise RuntimeError(
                f"mosquitto did not start on port {self.port}:\n{self.log}"
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops mosquitto cleanly (SIGTERM; SIGKILL after timeout_s)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def kill(self) -> None:
        """Kills mosquitto at once (SIGKILL), as a crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None

    def close(self) -> None:
        """Stops mosquitto and removes the directory if it made it."""
        try:
            self.stop(timeout_s=5.0)
        finally:
            self.kill()
            self._finalizer.detach()
            if self._own_dir:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _write_config(
        self,
        users: dict[str, str] | None,
        tls_files: tuple[str | os.PathLike, str | os.PathLike] | None,
    ) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if users else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            "max_queued_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if tls_files is not None:
            lines.append(f"certfile {Path(tls_files[0]).resolve()}")
            lines.append(f"keyfile {Path(tls_files[1]).resolve()}")
        if self.persistence:
            lines.append(f"persistence_location {self.directory}/")
        if os.geteuid() == 0:
            # As root mosquitto would switch to the "mosquitto" user, which cannot
            # read this directory.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if users:
            lines.append(f"password_file {self._write_passwords(users)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def _write_passwords(self, users: dict[str, str]) -> Path:
        tool = find_mosquitto_passwd()
        if tool is None:
            raise RuntimeError("mosquitto_passwd is not installed")
        path = self.directory / "passwords"
        path.touch(mode=0o600)
        for user, password in users.items():
            subprocess.run(
                [tool, "-b", str(path), user, password],
                check=True, capture_output=True, timeout=10,
            )
        return path

    def _read_log(self, process: subprocess.Popen, ready: threading.Event) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            with self._log_lock:
                self._log_lines.append(line)
            if _READY_MARK in line:
                ready.set()
        ready.set()  # exited: let start() see it at once


def _kill_quietly(holder: list) -> None:
    process = holder[0]
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


class Received(NamedTuple):
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Subscriber:
    """A paho client on the test broker that records what it receives.

    It subscribes in on_connect, so it subscribes again after a reconnect.

    Args:
        broker: The broker.
        topics: Topic filters to subscribe to.
        qos: Subscription QoS.
        client_id: MQTT client id (a random one when None).
        clean_session: False keeps a persistent session at the broker.
        username, password: Credentials, when the broker has users.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        topics: list[str],
        qos: int = 1,
        client_id: str | None = None,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._topics = topics
        self._qos = qos
        self._cond = threading.Condition()
        self._subscribed = False
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
            clean_session=clean_session,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._broker = broker

    def __enter__(self) -> Subscriber:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, timeout_s: float = 10.0) -> None:
        """Connects and waits until subscribed."""
        self._client.connect_async(self._broker.host, self._broker.port, keepalive=10)
        self._client.loop_start()
        if not self.wait_subscribed(timeout_s):
            self.close()
            raise RuntimeError(f"could not subscribe to {self._topics!r}")

    def wait_subscribed(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._subscribed, timeout_s)

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float
    ) -> bool:
        """Waits until ``predicate(messages)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout_s)

    def snapshot(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(topic, self._qos) for topic in self._topics])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._subscribed = False
            self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(
                Received(message.topic, message.payload, message.retain, message.qos)
            )
            self._cond.notify_all()
