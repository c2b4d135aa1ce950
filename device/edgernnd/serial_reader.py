"""Reading one serial port: bytes in, decoded frames out, reconnecting forever.

A :class:`PortReader` thread only moves bytes from the port into a pure decoder
(:mod:`edgernnd.binary_codec` or :mod:`edgernnd.csv_codec`) and hands the decoded
frames on. The port is any pyserial URL, opened exclusively where the platform
allows it.

What an unplugged USB adapter looks like: the read raises ``SerialException``
("device reports readiness to read but returned no data") or ``OSError`` EIO, and
the device node disappears; a pseudo-terminal whose other side closed behaves the
same way. The reader closes the port, reports the outage once, and reopens it with
capped exponential backoff until the node is back; each (re)connection gets a new
decoder, so a partial frame from before the outage is never glued to new bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import serial

from edgernnd.binary_codec import BinaryDecoder
from edgernnd.config import PortConfig, WireFormat
from edgernnd.csv_codec import CsvDecoder
from edgernnd.frames import Frame

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.05
READ_CHUNK_BYTES = 4096
# A connection lost sooner than this without a byte read counts as a failed
# open: a ser2net whose device is gone accepts and hangs up at once, several
# times a second; without backoff the reader would reopen it (and log twice)
# at that rate forever. A sensor replugged after streaming reconnects at once.
STABLE_CONNECTION_S = 1.0


def make_decoder(port: PortConfig, channels: int):
    """A fresh decoder for the port's wire format, checking the channel count."""
    if port.format is WireFormat.CSV:
        return CsvDecoder(channels, reset_line=port.csv_reset_line)
    return BinaryDecoder(channels=channels)


class PortReader(threading.Thread):
    """Reads one port until :meth:`stop`.

    Args:
        port: The port's configuration.
        channels: Values per frame the model takes.
        on_frames: Called as on_frames(port_name, frames, read_time_s) from this
            thread for every chunk that decoded to at least one frame;
            read_time_s is time.monotonic() when the bytes were read.
        on_connect: Called as on_connect(port_name, connected: bool) on every
            (re)connection and loss.
        backoff_initial_s: First wait before reopening.
        backoff_max_s: Cap of the doubling wait.

    Attributes:
        decoder: The current decoder (its ``stats`` count frames and rejections).
        reconnects: Successful reopenings after a loss.
        open_failures: Failed attempts to open.
    """

    def __init__(self, port: PortConfig, channels: int,
                 on_frames: Callable[[str, list[Frame], float], None],
                 on_connect: Callable[[str, bool], None] | None = None,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0):
        super().__init__(name=f"reader-{port.name}", daemon=True)
        self.port = port
        self.channels = channels
        self.on_frames = on_frames
        self.on_connect = on_connect or (lambda name, up: None)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.decoder = make_decoder(port, channels)
        self.stats_done = []  # stats of decoders retired at reconnects
        self.reconnects = 0
        self.open_failures = 0
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._serial: serial.SerialBase | None = None
        self._bytes_read = 0  # in the current connection

    def stop(self) -> None:
        self._stopping.set()

    def open_port(self) -> serial.SerialBase:
        """Opens the port once (raises ``serial.SerialException`` on failure)."""
        return serial.serial_for_url(self.port.url, baudrate=self.port.baudrate,
                                     timeout=READ_TIMEOUT_S, exclusive=True)

    def run(self) -> None:
        delay = self.backoff_initial_s
        ever_connected = False
        outage_logged = False
        flapping = False  # connections keep ending at once without data
        while not self._stopping.is_set():
            try:
                self._serial = self.open_port()
            except (serial.SerialException, OSError, ValueError) as e:
                self.open_failures += 1
                if not outage_logged:
                    logger.warning("port %s (%s) cannot be opened: %s; retrying every "
                                   "%.1f s at most", self.port.name, self.port.url, e,
                                   self.backoff_max_s)
                    outage_logged = True
                self._stopping.wait(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            if ever_connected:
                self.reconnects += 1
                self.stats_done.append(self.decoder.stats)
                self.decoder = make_decoder(self.port, self.channels)
            logger.log(logging.DEBUG if flapping else logging.INFO,
                       "port %s open: %s", self.port.name, self.port.url)
            ever_connected, outage_logged = True, False
            self.connected.set()
            self.on_connect(self.port.name, True)
            opened_at = time.monotonic()
            self._bytes_read = 0
            reason = self._read_until_lost()
            self.connected.clear()
            self._close()
            if self._stopping.is_set():
                break
            self.on_connect(self.port.name, False)
            if self._bytes_read or time.monotonic() - opened_at >= STABLE_CONNECTION_S:
                logger.warning("port %s lost: %s; reconnecting", self.port.name, reason)
                outage_logged, flapping = True, False
                delay = self.backoff_initial_s
                continue
            self.open_failures += 1
            logger.log(logging.DEBUG if flapping else logging.WARNING,
                       "port %s (%s) lost right after opening: %s; retrying every "
                       "%.1f s at most", self.port.name, self.port.url, reason,
                       self.backoff_max_s)
            outage_logged = flapping = True
            self._stopping.wait(delay)
            delay = min(delay * 2, self.backoff_max_s)
        self._close()

    def _read_until_lost(self) -> str:
        ser = self._serial
        decoder = self.decoder
        # pyserial's socket:// reports in_waiting as 0 or 1 (readable or not),
        # so what is waiting is read in a second call that does not wait.
        network = self.port.url.startswith("socket://")
        while not self._stopping.is_set():
            try:
                waiting = ser.in_waiting
                data = ser.read(min(max(waiting, 1), READ_CHUNK_BYTES))
                if network and data:
                    ser.timeout = 0
                    data += ser.read(READ_CHUNK_BYTES - len(data))
                    ser.timeout = READ_TIMEOUT_S
            except (serial.SerialException, OSError) as e:
                return str(e) or type(e).__name__
            if not data:
                continue
            self._bytes_read += len(data)
            read_time = time.monotonic()
            frames = decoder.feed(data)
            if frames:
                self.on_frames(self.port.name, frames, read_time)
        return "stopping"

    def _close(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            except (serial.SerialException, OSError):
                pass
            self._serial = None
