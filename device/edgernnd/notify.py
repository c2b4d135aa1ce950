"""systemd's notification protocol, spoken without libsystemd.

A service of ``Type=notify`` tells the service manager about itself by sending
datagrams of newline-separated ``KEY=VALUE`` assignments to the AF_UNIX socket
named in ``$NOTIFY_SOCKET``: ``READY=1`` once started, ``STATUS=...`` for
``systemctl status``, ``WATCHDOG=1`` to keep ``WatchdogSec=`` from firing,
``RELOADING=1`` and ``STOPPING=1`` around reloads and shutdown.

The socket is a filesystem path, or an abstract socket when the name starts with
``@`` (the ``@`` stands for the leading NUL byte). Outside systemd the variable is
unset and every method is a no-op, so the daemon runs the same in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# A send failure is logged at most this often; the watchdog pings every few
# seconds and a broken socket would otherwise flood the journal.
_ERROR_LOG_INTERVAL_S = 60.0

# systemd reads the socket from its event loop; a full queue means it is busy,
# not gone. Waiting this long keeps READY=1 from being lost and bounds the stall
# a watchdog ping can cause in the main loop.
_SEND_TIMEOUT_S = 2.0


class Notifier:
    """Sends state changes to the service manager.

    Build it with :meth:`from_environ`. Every method returns whether a datagram
    was sent; none raises. A send error is logged (at most once a minute, with
    the count of the suppressed ones) and otherwise ignored: losing a STATUS line
    must not stop inference. A lost ``WATCHDOG=1`` is covered by pinging at half
    the interval.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
    ) -> None:
        """Args:
        address: ``$NOTIFY_SOCKET`` as given: an absolute path, ``@name`` for an
            abstract socket, or None to disable notifications.
        watchdog_usec: The watchdog interval in microseconds when the watchdog
            is enabled for this process, else None.
        """
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._last_error_log = float("-inf")
        self._suppressed_errors = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Builds a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
        ``WATCHDOG_PID``.

        A ``WATCHDOG_PID`` naming another process (the variables were inherited
        from a parent) disables the watchdog for this one, as sd_watchdog_enabled
        does. An address of a kind this module does not speak (systemd 254+ also
        accepts ``vsock:``) is logged and disables notifications.
        """
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            logger.warning(
                "NOTIFY_SOCKET=%r is neither a path nor an abstract socket; "
                "systemd notifications disabled", address
            )
            address = None
        return cls(address, _parse_watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """True when notifications go to a socket."""
        return self._address is not None

    def ready(self) -> bool:
        """Tells systemd that start-up finished (``READY=1``)."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """Sets the one-line status shown by ``systemctl status``.

        Args:
            text: Free text; line breaks are replaced by spaces because a new
                line would start another assignment.
        """
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Pings the watchdog (``WATCHDOG=1``)."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tells systemd that shutdown began (``STOPPING=1``)."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """Tells systemd that a reload began; send :meth:`ready` when done.

        ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in microseconds) lets systemd 253+
        with ``Type=notify-reload`` match this message to the reload it asked
        for; older versions ignore the field.
        """
        now_usec = time.monotonic_ns() // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def watchdog_interval_s(self) -> float | None:
        """The watchdog timeout in seconds, or None when no watchdog is armed.

        Ping at half this interval so that one delayed ping is not fatal.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1e6

    def send(self, message: str) -> bool:
        """Sends one datagram of ``KEY=VALUE`` lines.

        Returns:
            True if the datagram was sent, False when notifications are disabled
            or the send failed (the failure is logged, rate-limited).
        """
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(_SEND_TIMEOUT_S)
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as e:
            self._log_send_error(e)
            return False
        logger.debug("notified systemd: %r", message)
        return True

    def close(self) -> None:
        """Closes the socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _log_send_error(self, error: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error_log < _ERROR_LOG_INTERVAL_S:
            self._suppressed_errors += 1
            return
        logger.warning(
            "cannot notify systemd at %r: %s (%d similar errors suppressed)",
            self._address, error, self._suppressed_errors,
        )
        self._last_error_log = now
        self._suppressed_errors = 0


def _socket_address(address: str) -> str:
    # Linux spells an abstract socket name with a leading NUL byte; systemd
    # writes it as '@' because an environment variable cannot hold a NUL.
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def _parse_watchdog_usec(environ: Mapping[str, str]) -> int | None:
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.warning("ignoring watchdog: WATCHDOG_PID=%r is not a pid", pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("ignoring watchdog: WATCHDOG_USEC=%r is not an integer", raw)
        return None
    if usec <= 0:
        logger.warning("ignoring watchdog: WATCHDOG_USEC=%r is not positive", raw)
        return None
    return usec
