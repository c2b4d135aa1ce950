"""Predictions to an MQTT broker, with availability and Home Assistant discovery.

Topics, with ``<device>`` the client id made safe for a topic level:

* ``<prefix>/<device>/availability``: retained ``online`` after each connect,
  ``offline`` on close; the broker publishes ``offline`` (the last will) when the
  daemon dies without closing.
* ``<prefix>/<device>/<port>/<stream>/prediction``: the JSON record, at the
  configured QoS.
* ``<discovery_prefix>/sensor/<device>_<port>_<stream>_{label,confidence}/config``:
  retained Home Assistant discovery, sent for each stream at each connect.

Delivery: a prediction stays in this sink until the broker acknowledges it. Those
not yet handed to paho wait in a bounded deque (``queue_size``); while the broker
is unreachable nothing is handed over, and when the deque is full the oldest
waiting predictions are dropped and counted. At most ``max_inflight`` messages
are with paho at a time; at QoS 1 and 2 paho keeps them across a lost connection
and sends them again (with the DUP flag) after reconnecting, so a reconnect may
duplicate a prediction but not lose it. The in-flight ones are the oldest and
are never dropped: a full outage keeps ``queue_size + max_inflight`` predictions.
At QoS 0 "acknowledged" means written to the socket; in-flight ones that were
not written when the connection broke are put back at the head of the deque.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgernnd import __version__
from edgernnd.config import MqttConfig
from edgernnd.errors import ConfigError
from edgernnd.frames import Prediction
from edgernnd.publish import DropCounter
from edgernnd.sinks import encode_prediction

_log = logging.getLogger(__name__)

PASSWORD_ENV = "EDGERNN_MQTT_PASSWORD"

# Enough to keep a loopback or LAN link busy (an ack returns well within 100
# messages), and far below paho's mid space, so paho's own queue never fills.
MAX_INFLIGHT = 100

# paho's backoff between connection attempts, in seconds (doubling).
RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30

# Part of close()'s timeout kept for publishing "offline" after the drain.
_OFFLINE_RESERVE_S = 1.0


class _DemoteNotConnected(logging.Filter):
    """Turns paho's "Client is not connected" ERROR into DEBUG.

    paho logs it at each failed reconnection attempt, i.e. every 1 to 30 s of an
    outage; this module already says once per outage that the broker is gone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith(
            "Client is not connected"
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_paho_log = logging.getLogger(__name__ + ".paho")
_paho_log.addFilter(_DemoteNotConnected())


class _Message(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    is_prediction: bool


def sanitise_topic_level(text: str) -> str:
    """Makes ``text`` one safe topic level (and a Home Assistant object id).

    Every character other than ASCII letters, digits, ``-`` and ``_`` becomes
    ``_``; ``/``, ``+`` and ``#`` would otherwise split the level or act as
    wildcards.
    """
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_"
                   for c in text)
    return safe or "_"


def read_password(config: MqttConfig) -> str | None:
    """The broker password: ``password_file`` (stripped) or $EDGERNN_MQTT_PASSWORD.

    Raises:
        ConfigError: The password file cannot be read.
    """
    if config.password_file is not None:
        try:
            return config.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise ConfigError(
                f"cannot read mqtt.password_file {str(config.password_file)!r}: "
                f"{reason}"
            ) from e
    return os.environ.get(PASSWORD_ENV) or None


class MqttSink:
    """Publishes predictions to an MQTT broker; see the module docstring.

    The constructor starts connecting in the background (paho's network thread
    plus one sender thread) and returns at once; :meth:`publish` never waits for
    the broker.

    Args:
        mqtt_config: Broker, identity, topics and credentials.
        labels: Class labels in manifest order, for the record's scores.
        streams_hint: ``(port_name, stream_id)`` pairs to announce to Home
            Assistant at the first connect, before their first prediction.
        metrics: An object with ``inc(name, n=1, **labels)``, or None. Drops are
            counted in ``edgernn_predictions_dropped_total{sink="mqtt"}``.
        queue_size: Bound of the deque of predictions not yet handed to paho
            (``publish.queue_size``).
        max_inflight: Most messages handed to paho and not yet acknowledged.

    Raises:
        ConfigError: The password file or the TLS CA file cannot be used, or a
            password file is given without a user name.

    Attributes:
        client_id: The MQTT client id.
        availability_topic: Where ``online``/``offline`` are published.
        disconnects: Connections lost since the start.
        last_outage_s: Length of the last outage (lost to reconnected), or None.
    """

    name = "mqtt"

    def __init__(
        self,
        mqtt_config: MqttConfig,
        labels: tuple[str, ...],
        streams_hint: Iterable[tuple[str, int]] | None = None,
        metrics: Any = None,
        queue_size: int = 10000,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        if queue_size < 1:
            raise ConfigError(f"publish.queue_size must be >= 1, got {queue_size!r}")
        self._config = mqtt_config
        self._labels = tuple(labels)
        self._queue_size = queue_size
        self._max_inflight = max(1, max_inflight)
        self.client_id = mqtt_config.client_id or socket.gethostname()
        self._device = sanitise_topic_level(self.client_id)
        self._prefix = mqtt_config.topic_prefix.strip("/")
        self.availability_topic = f"{self._prefix}/{self._device}/availability"

        self._cond = threading.Condition()
        self._pending: collections.deque[_Message] = collections.deque()
        self._control: collections.deque[_Message] = collections.deque()
        # mid -> message handed to paho and not yet acknowledged, oldest first.
        self._inflight: dict[int, _Message] = {}
        # Acks that overtook the sender between paho's publish() returning the
        # mid and the sender recording it (see _record_handover).
        self._early_acks: set[int] = set()
        self._streams: dict[tuple[str, int], None] = {}
        self._connected = False
        self._epoch = 0  # +1 at each connect and disconnect
        self._closing = False
        self._stopping = False
        self._outage_since: float | None = time.monotonic()
        self._outage_logged = False
        self._refusal_logged = False
        self._drops = DropCounter(self.name, metrics, _log)
        self.disconnects = 0
        self.last_outage_s: float | None = None
        for port, stream in streams_hint or ():
            self._streams[(port, int(stream))] = None

        self._client = self._make_client()
        self._sender = threading.Thread(
            target=self._run_sender, name="mqtt-sender", daemon=True
        )
        self._sender.start()
        self._client.connect_async(
            mqtt_config.host, mqtt_config.port, keepalive=mqtt_config.keepalive_s
        )
        self._client.loop_start()

    @property
    def dropped(self) -> int:
        """Predictions dropped: deque overflow, or unacknowledged at close."""
        return self._drops.count

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def backlog(self) -> int:
        """Predictions not yet acknowledged by the broker."""
        with self._cond:
            return len(self._pending) + self._count_inflight_predictions()

    def prediction_topic(self, port: str, stream_id: int) -> str:
        """The topic of one stream's predictions."""
        return (f"{self._prefix}/{self._device}/{sanitise_topic_level(port)}/"
                f"{stream_id}/prediction")

    def wait_connected(self, timeout_s: float) -> bool:
        """Waits until the broker accepted the connection; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected, timeout_s)

    def wait_drained(self, timeout_s: float) -> bool:
        """Waits until every prediction is acknowledged; False on timeout."""
        with self._cond:
            return self._cond.wait_for(self._is_drained, timeout_s)

    def publish(self, prediction: Prediction) -> None:
        """Queues a prediction for the broker; never waits for the network.

        Raises:
            ValueError: The record holds a NaN or infinite number.
        """
        message = _Message(
            self.prediction_topic(prediction.port, prediction.stream_id),
            encode_prediction(prediction, self._labels),
            self._config.qos,
            False,
            True,
        )
        key = (prediction.port, prediction.stream_id)
        with self._cond:
            if self._closing:
                self._drops.add(1, "published after close")
                return
            if key not in self._streams:
                self._streams[key] = None
                if self._connected:
                    self._control.extend(self._make_discovery(*key))
            if len(self._pending) >= self._queue_size:
                self._pending.popleft()
                self._drops.add(1, f"queue of {self._queue_size} full")
            self._pending.append(message)
            self._cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        """Delivers what it can within ``timeout_s``, says ``offline``, disconnects.

        The wait for acknowledgements ends early when the broker is unreachable.
        Predictions still unacknowledged then are counted as dropped.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._closing:
                return
            self._closing = True
            drain_s = max(0.0, timeout_s - min(_OFFLINE_RESERVE_S, timeout_s / 2))
            self._cond.wait_for(
                lambda: self._is_drained() or not self._connected, drain_s
            )
            self._stopping = True
            self._cond.notify_all()
        self._sender.join(max(0.0, deadline - time.monotonic()))

        with self._cond:
            lost = len(self._pending) + self._count_inflight_predictions()
            self._pending.clear()
            self._drops.add(lost, "not acknowledged by the broker at shutdown")
            connected = self._connected

        if connected:
            info = self._client.publish(
                self.availability_topic, b"offline", qos=1, retain=True
            )
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                _log.warning("could not publish 'offline' before closing: %s", e)
        self._client.disconnect()
        self._client.loop_stop()
        _log.info("MQTT sink closed; %d predictions dropped in total", self.dropped)

    # The sender thread: the only caller of paho's publish() besides close().
    # It never holds self._cond while calling paho, because paho holds its own
    # message lock while it calls on_publish, which takes self._cond.

    def _run_sender(self) -> None:
        while True:
            with self._cond:
                message = None
                while message is None:
                    if self._stopping:
                        return
                    if self._connected and len(self._inflight) < self._max_inflight:
                        message = self._take_next()
                    if message is None:
                        self._cond.wait()
                epoch = self._epoch

            info = self._client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
            with self._cond:
                self._record_handover(message, info, epoch)

    def _take_next(self) -> _Message | None:
        if self._control:
            return self._control.popleft()
        if self._pending:
            return self._pending.popleft()
        return None

    def _record_handover(
        self, message: _Message, info: mqtt.MQTTMessageInfo, epoch: int
    ) -> None:
        lost_now = info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE or (
            message.qos == 0
            and (info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS or epoch != self._epoch)
            and info.mid not in self._early_acks
        )
        if lost_now:
            # paho did not keep it: QoS 0 without a connection, or no free mid.
            # Control messages are sent again at the next connect anyway.
            if message.is_prediction:
                self._pending.appendleft(message)
            return
        if info.mid in self._early_acks:
            self._early_acks.discard(info.mid)
            self._cond.notify_all()
            return
        self._inflight[info.mid] = message

    def _count_inflight_predictions(self) -> int:
        return sum(1 for m in self._inflight.values() if m.is_prediction)

    def _is_drained(self) -> bool:
        return not self._pending and not self._count_inflight_predictions()

    # paho callbacks, called on paho's network thread.

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            with self._cond:
                first = not self._refusal_logged
                self._refusal_logged = True
            if first:
                _log.error(
                    "MQTT broker %s:%d refused the connection: %s; retrying",
                    self._config.host, self._config.port, reason_code,
                )
            return

        with self._cond:
            self._connected = True
            self._epoch += 1
            self._control.clear()
            self._control.append(
                _Message(self.availability_topic, b"online", 1, True, False)
            )
            for key in self._streams:
                self._control.extend(self._make_discovery(*key))
            outage_s = None
            if self._outage_since is not None:
                outage_s = time.monotonic() - self._outage_since
            self._outage_since = None
            self._outage_logged = False
            self._refusal_logged = False
            waiting = len(self._pending) + self._count_inflight_predictions()
            self._cond.notify_all()

        if self.disconnects == 0:
            _log.info(
                "connected to MQTT broker %s:%d as %r",
                self._config.host, self._config.port, self.client_id,
            )
        else:
            self.last_outage_s = outage_s
            _log.info(
                "reconnected to MQTT broker %s:%d after %.1f s; %d predictions to send",
                self._config.host, self._config.port, outage_s or 0.0, waiting,
            )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = False
            self._epoch += 1
            self._requeue_unwritten_qos0()
            if was_connected and not self._stopping:
                self.disconnects += 1
                self._outage_since = time.monotonic()
                self._outage_logged = True
            self._cond.notify_all()

        if was_connected and not self._stopping:
            _log.warning(
                "lost the connection to MQTT broker %s:%d (%s); reconnecting with "
                "backoff up to %d s, keeping up to %d predictions",
                self._config.host, self._config.port, reason_code,
                RECONNECT_MAX_DELAY_S, self._queue_size,
            )

    def _on_connect_fail(self, client, userdata) -> None:
        with self._cond:
            first = not self._outage_logged
            self._outage_logged = True
        if first:
            _log.warning(
                "cannot reach MQTT broker %s:%d; retrying with backoff up to %d s",
                self._config.host, self._config.port, RECONNECT_MAX_DELAY_S,
            )

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            if self._inflight.pop(mid, None) is None:
                self._early_acks.add(mid)
            self._cond.notify_all()

    def _requeue_unwritten_qos0(self) -> None:
        # paho forgets QoS 0 messages it had not written when the link broke
        # (and calls no on_publish for them): put them back, oldest first.
        unwritten = [mid for mid, m in self._inflight.items() if m.qos == 0]
        for mid in reversed(unwritten):
            message = self._inflight.pop(mid)
            if message.is_prediction:
                self._pending.appendleft(message)

    def _make_discovery(self, port: str, stream_id: int) -> list[_Message]:
        if not self._config.discovery:
            return []
        port_level = sanitise_topic_level(port)
        state_topic = self.prediction_topic(port, stream_id)
        device = {
            "identifiers": [f"edgernn_{self._device}"],
            "name": f"edgernn {self.client_id}",
            "model": "edgernn",
            "manufacturer": "edgernn",
            "sw_version": __version__,
        }
        sensors = (
            ("label", {
                "value_template": "{{ value_json.label }}",
                "json_attributes_topic": state_topic,
                "json_attributes_template": "{{ value_json.scores | tojson }}",
            }),
            ("confidence", {
                "value_template": "{{ value_json.confidence }}",
                "state_class": "measurement",
            }),
        )
        messages = []
        for what, extra in sensors:
            object_id = f"{self._device}_{port_level}_{stream_id}_{what}"
            config = {
                "name": f"{port} stream {stream_id} {what}",
                "unique_id": object_id,
                "object_id": object_id,
                "state_topic": state_topic,
                "availability_topic": self.availability_topic,
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": device,
                **extra,
            }
            topic = f"{self._config.discovery_prefix}/sensor/{object_id}/config"
            payload = json.dumps(config, separators=(",", ":")).encode("utf-8")
            messages.append(_Message(topic, payload, 1, True, False))
        return messages

    def _make_client(self) -> mqtt.Client:
        config = self._config
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.enable_logger(_paho_log)
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)  # unbounded: this sink does the bounding
        client.reconnect_delay_set(
            min_delay=RECONNECT_MIN_DELAY_S, max_delay=RECONNECT_MAX_DELAY_S
        )
        client.will_set(self.availability_topic, b"offline", qos=1, retain=True)

        password = read_password(config)
        if config.username:
            client.username_pw_set(config.username, password)
        elif config.password_file is not None:
            raise ConfigError(
                "mqtt.password_file is set but mqtt.username is not; set "
                "mqtt.username"
            )
        elif password is not None:
            _log.warning(
                "%s is set but mqtt.username is not; connecting without credentials",
                PASSWORD_ENV,
            )

        if config.tls_ca_file is not None:
            try:
                client.tls_set(ca_certs=str(config.tls_ca_file))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"cannot use mqtt.tls_ca_file {str(config.tls_ca_file)!r}: {e}"
                ) from e

        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        return client
