"""The daemon's counters and gauges, rendered in Prometheus text format 0.0.4.

Increments sit on the per-frame path, so a series is a plain dict entry keyed by
its label values and :meth:`Metrics.inc` costs a dict lookup and an add. Two ways
out: :meth:`Metrics.write_textfile` for node_exporter's textfile collector, and
:meth:`Metrics.serve_http`, a loopback-only ``/metrics`` listener.
"""

from __future__ import annotations

import collections
import enum
import http.server
import ipaddress
import logging
import math
import os
import socket
import socketserver
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

# Quantiles of the invoke time come from the most recent observations, not all
# of them: a slow-down shows within a window instead of being averaged away over
# days. 2048 invokes is a few seconds at typical frame rates, and sorting them
# at each scrape takes well under a millisecond.
INVOKE_WINDOW = 2048
INVOKE_QUANTILES = (0.5, 0.99)

_INVOKE = "edgernn_invoke_seconds"


class MetricKind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"


# Name, kind, label names and help of the daemon's metrics, in render order.
_BUILTIN = (
    ("edgernn_up", MetricKind.GAUGE, (), "1 while the daemon is running and ready."),
    ("edgernn_streams", MetricKind.GAUGE, (), "Streams with recurrent state held."),
    ("edgernn_frames_total", MetricKind.COUNTER, ("port",),
     "Frames decoded, per port."),
    ("edgernn_rejected_frames_total", MetricKind.COUNTER, ("port", "reason"),
     "Frames dropped before inference, per port and reason."),
    ("edgernn_crc_errors_total", MetricKind.COUNTER, ("port",),
     "Binary frames with a bad checksum, per port."),
    ("edgernn_seq_gaps_total", MetricKind.COUNTER, ("port",),
     "Sequence number jumps (lost frames), per port."),
    ("edgernn_state_resets_total", MetricKind.COUNTER, ("reason",),
     "Recurrent state resets, per reason."),
    ("edgernn_reconnects_total", MetricKind.COUNTER, ("port",),
     "Serial port reopen attempts, per port."),
    ("edgernn_predictions_total", MetricKind.COUNTER, (), "Predictions made."),
    ("edgernn_predictions_dropped_total", MetricKind.COUNTER, ("sink",),
     "Predictions dropped because a sink's queue was full, per sink."),
)

# Counters whose sum is the "errors" figure of the status line.
_ERROR_COUNTERS = ("edgernn_crc_errors_total", "edgernn_rejected_frames_total")

# A series key is the tuple of (label, value) pairs in the caller's keyword
# order; keys differing only in order are merged when rendering.
_Key = tuple[tuple[str, object], ...]


class Metrics:
    """The daemon's metrics registry.

    Threads: each call is a handful of bytecodes under the GIL and rendering
    works on copies, so readers never see a torn dict. Two threads incrementing
    the *same* series may, rarely, lose an increment (the read and the write of
    ``+=`` are separate steps); give each series one writer (e.g. the thread of
    its port) where exact counts matter.
    """

    def __init__(self) -> None:
        self._help: dict[str, str] = {}
        self._counters: dict[str, dict[_Key, float]] = {}
        self._gauges: dict[str, dict[_Key, float]] = {}
        self._labelled: set[str] = set()
        self._invoke_count = 0
        self._invoke_sum_s = 0.0
        self._invoke_window: collections.deque[float] = collections.deque(
            maxlen=INVOKE_WINDOW
        )
        for name, kind, label_names, help_text in _BUILTIN:
            self.declare(name, kind, help_text, label_names)

    def declare(
        self,
        name: str,
        kind: MetricKind | str,
        help_text: str,
        label_names: tuple[str, ...] = (),
    ) -> None:
        """Declares a metric beyond the built-in ones.

        Args:
            name: A Prometheus metric name; counters should end in ``_total``.
            kind: ``counter`` or ``gauge``.
            help_text: One line for the ``# HELP`` comment.
            label_names: The labels its series carry. A metric without labels
                renders as 0 until first set; one with labels renders no sample
                until a series exists (a label-less 0 would be a stray series).
                The names are not checked on each increment.

        Raises:
            ValueError: The name is invalid or already declared, or the kind is
                unknown.
        """
        try:
            kind = MetricKind(kind)
        except ValueError:
            raise ValueError(
                f"kind must be 'counter' or 'gauge', got {kind!r}"
            ) from None
        if not _is_metric_name(name):
            raise ValueError(f"metric name must match [a-zA-Z_:][a-zA-Z0-9_:]*, "
                             f"got {name!r}")
        if name in self._help or name == _INVOKE:
            raise ValueError(f"metric {name!r} is already declared")
        if label_names:
            self._labelled.add(name)
        table = self._counters if kind is MetricKind.COUNTER else self._gauges
        table[name] = {}
        # Last: render() walks _help, so a metric appears only once complete.
        self._help[name] = help_text

    def inc(self, name: str, n: int = 1, **labels: object) -> None:
        """Adds ``n`` to a counter series.

        Args:
            name: A declared counter.
            n: The increment; must not be negative (not checked, for speed).
            **labels: Label values, e.g. ``port="imu0"``.

        Raises:
            ValueError: The counter was not declared.
        """
        try:
            series = self._counters[name]
        except KeyError:
            raise ValueError(self._unknown_message(name, "counter")) from None
        key = tuple(labels.items())
        series[key] = series.get(key, 0) + n

    def set_gauge(self, name: str, value: float, **labels: object) -> None:
        """Sets a gauge series.

        Raises:
            ValueError: The gauge was not declared.
        """
        try:
            series = self._gauges[name]
        except KeyError:
            raise ValueError(self._unknown_message(name, "gauge")) from None
        series[tuple(labels.items())] = value

    def observe_invoke(self, seconds: float) -> None:
        """Records the duration of one interpreter invoke, in seconds."""
        self._invoke_count += 1
        self._invoke_sum_s += seconds
        self._invoke_window.append(seconds)

    def total(self, name: str) -> float:
        """The sum of all series of a counter or gauge (0 when none)."""
        series = self._counters.get(name)
        if series is None:
            series = self._gauges.get(name)
        if series is None:
            raise ValueError(self._unknown_message(name, "metric"))
        return sum(series.copy().values())

    def invoke_quantile_s(self, q: float) -> float:
        """The q-quantile (nearest rank) of the recent invoke times in seconds;
        NaN before the first invoke."""
        return _quantiles(list(self._invoke_window), (q,))[0]

    def render(self) -> str:
        """The metrics in Prometheus text exposition format 0.0.4.

        Label sets are rendered sorted by label name, series sorted by their
        labels. A metric declared without labels and never set renders as 0.
        """
        lines: list[str] = []
        for name, help_text in self._help.copy().items():
            if name in self._counters:
                kind, series = MetricKind.COUNTER, self._counters[name].copy()
            else:
                kind, series = MetricKind.GAUGE, self._gauges[name].copy()
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind.value}")
            merged: dict[_Key, float] = {}
            for key, value in series.items():
                sorted_key = tuple(sorted(key))
                merged[sorted_key] = merged.get(sorted_key, 0) + value
            if not merged and name not in self._labelled:
                merged[()] = 0
            for key in sorted(merged, key=lambda k: [(n, str(v)) for n, v in k]):
                value = _format_value(merged[key])
                lines.append(f"{name}{_format_labels(key)} {value}")

        window = list(self._invoke_window)
        count, total_s = self._invoke_count, self._invoke_sum_s
        lines.append(f"# HELP {_INVOKE} Interpreter invoke time; quantiles over the "
                     f"last {INVOKE_WINDOW} invokes.")
        lines.append(f"# TYPE {_INVOKE} summary")
        quantiles = _quantiles(window, INVOKE_QUANTILES)
        for q, value in zip(INVOKE_QUANTILES, quantiles, strict=True):
            lines.append(f'{_INVOKE}{{quantile="{q}"}} {_format_value(value)}')
        lines.append(f"{_INVOKE}_sum {_format_value(total_s)}")
        lines.append(f"{_INVOKE}_count {count}")
        return "\n".join(lines) + "\n"

    def status_line(self, fps: float) -> str:
        """One short line for systemd's ``STATUS=``.

        Args:
            fps: Frames per second over the caller's last interval.

        Returns:
            E.g. ``"412.3 frames/s, 8 streams, 0 errors, invoke p50 0.012 ms"``;
            errors are checksum errors plus rejected frames since start.
        """
        streams = self.total("edgernn_streams")
        errors = sum(self.total(name) for name in _ERROR_COUNTERS)
        p50_s = self.invoke_quantile_s(0.5)
        invoke = "-" if math.isnan(p50_s) else f"{p50_s * 1e3:.3f} ms"
        return (f"{fps:.1f} frames/s, {streams:g} streams, {int(errors)} errors, "
                f"invoke p50 {invoke}")

    def write_textfile(self, path: str | os.PathLike) -> None:
        """Writes :meth:`render` to ``path`` atomically.

        The text goes to a temporary file in the same directory, is flushed to
        disk, made mode 0644 (readable by a scraper running as another user,
        writable only by us) and renamed over ``path``, so a reader sees the old
        file or the new one, never a part.

        Raises:
            OSError: The directory is missing or not writable; no temporary file
                is left behind.
        """
        path = Path(path)
        data = self.render().encode("utf-8")
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        _fsync_directory(path.parent)

    def serve_http(
        self, host: str, port: int, allow_remote: bool = False
    ) -> MetricsServer:
        """Serves ``GET /metrics`` from a daemon thread.

        Args:
            host: Address to bind: a loopback address (``127.0.0.1``, ``::1``) or
                ``localhost``. Metrics reveal port names and traffic, so other
                addresses need ``allow_remote=True``.
            port: TCP port; 0 picks a free one (see :attr:`MetricsServer.port`).
            allow_remote: Permit a non-loopback ``host``.

        Raises:
            ValueError: ``host`` is not loopback and ``allow_remote`` is False.
            OSError: The address cannot be bound.
        """
        bind_host = _check_listen_host(host, allow_remote)
        return MetricsServer(self, bind_host, port)

    def _unknown_message(self, name: str, kind: str) -> str:
        if name in self._help:
            actual = "counter" if name in self._counters else "gauge"
            return f"metric {name!r} is a {actual}, not a {kind}"
        return (f"unknown {kind} {name!r}; declare it first with "
                f"Metrics.declare(name, kind, help_text)")


class MetricsServer:
    """A ``/metrics`` HTTP listener on its own daemon thread.

    Attributes:
        host: The bound address.
        port: The bound TCP port.
    """

    # A scrape that stalls longer than this is dropped, so one stuck client
    # cannot hold the single serving thread.
    CLIENT_TIMEOUT_S = 10.0

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        handler = _make_handler(metrics, self.CLIENT_TIMEOUT_S)
        server_cls = (
            _HTTPServer6 if ipaddress.ip_address(host).version == 6 else _HTTPServer
        )
        self._server = server_cls((host, port), handler)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"metrics-http-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("serving metrics on %s", self.url)

    @property
    def url(self) -> str:
        """The URL of the metrics page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stops serving and closes the socket; waits for the thread to end."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


class _HTTPServer(http.server.HTTPServer):
    # http.server.HTTPServer looks up the fully qualified host name at bind
    # time, which stalls for seconds on a Pi without DNS; nothing here uses it.
    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _make_handler(metrics: Metrics, timeout_s: float) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = timeout_s

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            try:
                body = metrics.render().encode("utf-8")
            except Exception:
                logger.exception("rendering metrics failed")
                self.send_error(500, "rendering metrics failed")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            # http.server writes an access log to stderr; ours goes to DEBUG.
            logger.debug("metrics http %s: " + fmt, self.client_address[0], *args)

    return Handler


def _check_listen_host(host: str, allow_remote: bool) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(
            f"metrics host must be an IP address or 'localhost', got {host!r}"
        ) from None
    if not address.is_loopback and not allow_remote:
        raise ValueError(
            f"metrics host {host!r} is not a loopback address; use 127.0.0.1 or "
            f"::1, or pass allow_remote=True to expose metrics on the network"
        )
    return str(address)


def _quantiles(values: list[float], qs: tuple[float, ...]) -> list[float]:
    if not values:
        return [math.nan] * len(qs)
    values.sort()
    n = len(values)
    return [values[max(0, math.ceil(q * n) - 1)] for q in qs]


def _format_labels(key: _Key) -> str:
    if not key:
        return ""
    inner = ",".join(f'{name}="{_escape_label(str(value))}"' for name, value in key)
    return "{" + inner + "}"


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _is_metric_name(name: str) -> bool:
    if not name or name[0].isdigit():
        return False
    return all(c.isascii() and (c.isalnum() or c in "_:") for c in name)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk; without
    # this a power cut on an SD card can bring back the previous file.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        logger.debug("cannot open %s to fsync it: %s", directory, e)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
