"""The daemon's configuration: a TOML file validated into one typed object.

Every section and key is checked: an unknown key, a wrong type or a value out of
range raises :class:`ConfigError` with one line naming the key, the bad value and
what was expected. The example file ``systemd/edgernnd.toml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import ssl
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from edgernnd.errors import ConfigError


class Accelerator(enum.Enum):
    CPU = "cpu"
    EDGETPU = "edgetpu"
    AUTO = "auto"


class WireFormat(enum.Enum):
    CSV = "csv"
    BINARY = "binary"


class SinkKind(enum.Enum):
    STDOUT = "stdout"
    FILE = "file"
    MQTT = "mqtt"


class PublishMode(enum.Enum):
    EVERY = "every"  # every k-th frame of each stream (k = publish.every)
    CHANGE = "change"  # only when a stream's label changes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Attributes:
    dir: Directory holding ``manifest.json`` and the ``.tflite`` files.
    accelerator: cpu, edgetpu, or auto (Edge TPU if usable, else CPU with a warning).
    pin_cpu: Run all of the daemon's threads on one CPU (the last it may use).
        Its threads share one Python interpreter lock; spread over several cores
        they hand it back and forth, which cost more than a core's worth of
        throughput and most of the latency in the benchmarks (bench/).
    """

    dir: Path
    accelerator: Accelerator = Accelerator.AUTO
    pin_cpu: bool = True


@dataclasses.dataclass(frozen=True)
class PortConfig:
    """Attributes:
    url: A pyserial URL: ``/dev/ttyUSB0``, ``/dev/serial/by-id/...``,
        ``socket://host:port`` (ser2net), ``rfc2217://host:port``.
    name: Short name used in records and MQTT topics (default: from the url).
    baudrate: Line speed in baud (ignored by socket and pty links).
    format: Wire format, ``binary`` or ``csv``.
    csv_reset_line: In csv, a line that resets a stream ("<line>" or "<line> <id>").
    """

    url: str
    name: str
    baudrate: int = 115200
    format: WireFormat = WireFormat.BINARY
    csv_reset_line: str = "#reset"


@dataclasses.dataclass(frozen=True)
class StateConfig:
    """Attributes:
    dir: Where state snapshots are written (systemd's StateDirectory).
    snapshot_interval_s: Period of snapshots while running; 0 disables periodic ones.
    snapshot_max_age_s: A snapshot older than this is not restored.
    max_seq_gap: A sequence jump larger than this resets the stream (binary only).
    idle_reset_s: A stream silent longer than this is reset on its next frame.
    value_limit: A raw value with magnitude above this (or not finite) resets
        the stream and the frame is dropped.
    reset_every: Bounded history: reset each state copy every N frames; 0 = never.
    staggered_copies: K copies of each stream's state, reset N/K frames apart;
        the prediction comes from the oldest. 1 = plain periodic reset.
    """

    dir: Path | None = None
    snapshot_interval_s: float = 60.0
    snapshot_max_age_s: float = 3600.0
    max_seq_gap: int = 1
    idle_reset_s: float = 5.0
    value_limit: float = 1e6
    reset_every: int = 0
    staggered_copies: int = 1


@dataclasses.dataclass(frozen=True)
class PublishConfig:
    """Attributes:
    sink: stdout, file or mqtt.
    mode: every (each k-th frame) or change (on a change of label).
    every: k, for mode ``every``.
    file: Path of the JSON-lines file, for sink ``file``.
    queue_size: Bound of the queue between inference and the sink; the oldest
        prediction is dropped (and counted) when it is full.
    """

    sink: SinkKind = SinkKind.STDOUT
    mode: PublishMode = PublishMode.EVERY
    every: int = 1
    file: Path | None = None
    queue_size: int = 10000


@dataclasses.dataclass(frozen=True)
class MqttConfig:
    """Attributes:
    host, port: The broker.
    client_id: MQTT client id; also the device name in topics (default: hostname).
    topic_prefix: Topics are ``<prefix>/<client_id>/...``.
    qos: 0, 1 or 2 for predictions.
    keepalive_s: MQTT keepalive.
    username: Optional user name.
    password_file: File holding the password; or set EDGERNN_MQTT_PASSWORD.
    tls_ca_file: CA bundle; when set the connection uses TLS.
    discovery: Publish Home Assistant MQTT discovery for each stream.
    discovery_prefix: Home Assistant's discovery prefix.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    topic_prefix: str = "edgernn"
    qos: int = 1
    keepalive_s: int = 30
    username: str | None = None
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    discovery: bool = True
    discovery_prefix: str = "homeassistant"


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Attributes:
    textfile: Prometheus textfile written atomically every interval, mode 0640
        (or None).
    listen: ``HOST:PORT`` to serve ``/metrics``, HOST a loopback address
        (``127.0.0.1``, ``[::1]``, ``localhost``); port 0 takes a free port (the
        log says which); empty = no listener.
    interval_s: Period of textfile writes and STATUS= updates.
    """

    textfile: Path | None = None
    listen: str = ""
    interval_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    model: ModelConfig
    ports: tuple[PortConfig, ...]
    state: StateConfig = StateConfig()
    publish: PublishConfig = PublishConfig()
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: str = "info"


_LOG_LEVELS = ("debug", "info", "warning", "error")

# The URL handlers pyserial ships (serial.protocol_handler_packages).
SERIAL_URL_SCHEMES = ("socket", "rfc2217", "loop", "spy", "hwgrep", "alt", "cp2110")


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> Config:
    """Reads and validates a TOML configuration file.

    Args:
        path: The TOML file.
        overrides: Values that replace the file's, as ``{"section": {"key": value}}``
            (command-line flags).

    Raises:
        ConfigError: The file is missing, unreadable, not TOML, or invalid.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read configuration {str(path)!r}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:  # tomllib decodes before it parses
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte "
                          f"{e.object[e.start]:#04x} at offset {e.start})") from e
    return parse_config(raw, overrides, base_dir=path.parent)


def parse_config(
    raw: dict, overrides: dict | None = None, base_dir: Path | None = None
) -> Config:
    """Validates a configuration given as a dict (the parsed TOML).

    Relative paths are taken relative to ``base_dir`` (the file's folder).
    """
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    base_dir = base_dir or Path.cwd()

    known = {"model", "port", "state", "publish", "mqtt", "metrics", "log"}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"unknown section [{key}]; expected one of {sorted(known)}"
            )

    model = _build(ModelConfig, "model", _table(raw, "model", required=True), base_dir)
    ports_raw = raw.get("port")
    if not ports_raw:
        raise ConfigError("no [[port]] configured; add at least one serial port")
    if not isinstance(ports_raw, list):
        raise ConfigError("'port' must be an array of tables: write [[port]]")
    ports = []
    for i, p in enumerate(ports_raw):
        if not isinstance(p, dict):
            raise ConfigError(f"port[{i}] must be a table, got {p!r}")
        p = dict(p)
        if "url" in p and isinstance(p["url"], str) and "name" not in p:
            p["name"] = _default_port_name(p["url"], i)
        ports.append(_build(PortConfig, f"port[{i}]", p, base_dir))
    names = [p.name for p in ports]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"port names must be unique; repeated: {sorted(dupes)!r}")

    log = _table(raw, "log")
    unknown = set(log) - {"level"}
    if unknown:
        raise ConfigError(f"unknown key log.{sorted(unknown)[0]}; expected: level")
    level = log.get("level", "info")
    if level not in _LOG_LEVELS:
        raise ConfigError(f"log.level must be one of {_LOG_LEVELS}, got {level!r}")

    config = Config(
        model=model,
        ports=tuple(ports),
        state=_build(StateConfig, "state", _table(raw, "state"), base_dir),
        publish=_build(PublishConfig, "publish", _table(raw, "publish"), base_dir),
        mqtt=_build(MqttConfig, "mqtt", _table(raw, "mqtt"), base_dir),
        metrics=_build(MetricsConfig, "metrics", _table(raw, "metrics"), base_dir),
        log_level=level,
    )
    _check_ranges(config)
    return config


def _default_port_name(url: str, index: int) -> str:
    parts = url.rstrip("/").rsplit("/", 2)
    tail = parts[-1]
    if tail.isdigit() and len(parts) > 1:  # /dev/pts/3 -> pts3
        tail = parts[-2] + tail
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in tail)
    return name or f"port{index}"


def _table(raw: dict, key: str, required: bool = False) -> dict:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"missing section [{key}]")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table, got {value!r}")
    return value


def _build(cls: type, section: str, values: dict, base_dir: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key {section}.{key}; expected one of {sorted(fields)}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", value, fields[key].type, base_dir)
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and name not in kwargs
    ]
    if missing:
        raise ConfigError(f"missing key {section}.{missing[0]}")
    return cls(**kwargs)


_ENUMS = {
    "Accelerator": Accelerator,
    "WireFormat": WireFormat,
    "SinkKind": SinkKind,
    "PublishMode": PublishMode,
}


def _coerce(name: str, value: Any, type_name: str, base_dir: Path) -> Any:
    optional = type_name.endswith("| None")
    base = type_name.replace("| None", "").strip()
    if base in _ENUMS:
        enum_cls = _ENUMS[base]
        choices = [m.value for m in enum_cls]
        if value not in choices:
            raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        return enum_cls(value)
    if base == "Path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a path string, got {value!r}")
        p = Path(value)
        return p if p.is_absolute() else base_dir / p
    expected = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    kinds = expected.get(base)
    if kinds is None:  # pragma: no cover - a field type this function forgot
        raise AssertionError(f"no coercion for {type_name}")
    if isinstance(value, bool) and base != "bool" or not isinstance(value, kinds):
        if optional and value is None:
            return None
        raise ConfigError(f"{name} must be {_ARTICLE[base]}, got {value!r}")
    return float(value) if base == "float" else value


_ARTICLE = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _check_ranges(c: Config) -> None:
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {value!r}")

    for i, p in enumerate(c.ports):
        need(p.url.strip() != "", f"port[{i}].url", p.url, "a device path or URL")
        scheme = p.url.split("://", 1)[0] if "://" in p.url else None
        need(scheme is None or scheme in SERIAL_URL_SCHEMES, f"port[{i}].url", p.url,
             "a device path or a pyserial URL (" + ", ".join(
                 f"{s}://" for s in SERIAL_URL_SCHEMES) + ")")
        need(0 < p.baudrate <= 20_000_000, f"port[{i}].baudrate", p.baudrate,
             "a positive baud rate such as 115200")
        need(p.csv_reset_line.strip() != "", f"port[{i}].csv_reset_line",
             p.csv_reset_line, "a non-empty line")
    s = c.state
    need(s.snapshot_interval_s >= 0, "state.snapshot_interval_s", s.snapshot_interval_s,
         ">= 0 (0 disables periodic snapshots)")
    need(s.snapshot_max_age_s > 0, "state.snapshot_max_age_s", s.snapshot_max_age_s,
         "> 0")
    need(1 <= s.max_seq_gap <= 32767, "state.max_seq_gap", s.max_seq_gap,
         "between 1 and 32767")
    need(s.idle_reset_s > 0, "state.idle_reset_s", s.idle_reset_s, "> 0")
    need(s.value_limit > 0, "state.value_limit", s.value_limit, "> 0")
    need(s.reset_every >= 0, "state.reset_every", s.reset_every, ">= 0 (0 = never)")
    need(1 <= s.staggered_copies <= 64, "state.staggered_copies", s.staggered_copies,
         "between 1 and 64")
    need(s.staggered_copies == 1 or s.reset_every >= s.staggered_copies,
         "state.reset_every", s.reset_every,
         f">= staggered_copies ({s.staggered_copies}) when copies are staggered")
    pb = c.publish
    need(pb.every >= 1, "publish.every", pb.every, ">= 1")
    need(pb.queue_size >= 1, "publish.queue_size", pb.queue_size, ">= 1")
    need(pb.sink is not SinkKind.FILE or pb.file is not None, "publish.file", pb.file,
         "a path when publish.sink is 'file'")
    m = c.mqtt
    need(0 < m.port < 65536, "mqtt.port", m.port, "between 1 and 65535")
    need(m.qos in (0, 1, 2), "mqtt.qos", m.qos, "0, 1 or 2")
    need(m.keepalive_s >= 5, "mqtt.keepalive_s", m.keepalive_s, ">= 5")
    need(m.topic_prefix.strip("/") != "" and not any(ch in m.topic_prefix for ch in "+#"),
         "mqtt.topic_prefix", m.topic_prefix, "a topic without wildcards")
    if pb.file is not None:
        need(pb.file.parent.is_dir(), "publish.file", str(pb.file),
             "a path in an existing directory")
    if m.password_file is not None:
        need(m.password_file.is_file(), "mqtt.password_file", str(m.password_file),
             "an existing file")
        need(bool(m.username), "mqtt.username", m.username,
             "set when mqtt.password_file is set")
    if m.tls_ca_file is not None:
        need(m.tls_ca_file.is_file(), "mqtt.tls_ca_file", str(m.tls_ca_file),
             "an existing CA file")
        need(_is_ca_file(m.tls_ca_file), "mqtt.tls_ca_file", str(m.tls_ca_file),
             "a file of PEM CA certificates")
    mt = c.metrics
    need(mt.interval_s > 0, "metrics.interval_s", mt.interval_s, "> 0")
    if mt.listen:
        host, _, port = mt.listen.rpartition(":")
        need(host != "" and port.isdigit() and int(port) < 65536, "metrics.listen",
             mt.listen, "HOST:PORT such as 127.0.0.1:9108 (port 0: any free port)")
        # Metrics name the ports and show the traffic: loopback only (a reverse
        # proxy or node_exporter's textfile collector can take them further).
        need(_is_loopback(host), "metrics.listen", mt.listen,
             "a loopback address: 127.0.0.1, [::1] or localhost")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ca_file(path: Path) -> bool:
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError, ValueError):
        return False
    return True
