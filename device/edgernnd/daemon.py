"""The daemon: serial readers, the model with per-stream state, and the publisher.

Threads: one :class:`~edgernnd.serial_reader.PortReader` per port puts decoded
frames on a bounded queue; the main thread runs inference and the periodic work
(watchdog, STATUS=, metrics, snapshots); the publisher's worker hands predictions
to the sink. Inference never waits on the sink (a bounded queue drops the oldest
prediction) and readers never wait on inference (a bounded queue drops the newest
chunk, counted, when inference cannot keep up).

There is one shutdown path, :meth:`Daemon.run`'s ``finally``, and it always logs
why the daemon stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import queue
import signal
import time
from pathlib import Path

import numpy as np

from edgernnd.config import Accelerator, Config, PublishMode, load_config
from edgernnd.errors import ConfigError, EdgernnError, RuntimeUnavailableError
from edgernnd.frames import Frame, FrameKind, Prediction
from edgernnd.manifest import Manifest, load_manifest, write_bytes_atomic
from edgernnd.metrics import MetricKind, Metrics, MetricsServer
from edgernnd.notify import Notifier
from edgernnd.publish import Publisher
from edgernnd.runner import StepRunner
from edgernnd.runtime import import_runtime, load_edgetpu_delegate
from edgernnd.serial_reader import PortReader
from edgernnd.sinks import make_sink
from edgernnd.state import StreamStates

logger = logging.getLogger(__name__)

FRAME_QUEUE_CHUNKS = 4096
TICK_S = 0.2
PORT_OPEN_WAIT_S = 2.0
TEXTFILE_MODE = 0o640
SEQ_MODULO = 1 << 16


def load_runner(config: Config, manifest: Manifest) -> StepRunner:
    """Loads the model for the configured accelerator, falling back as configured.

    Raises:
        RuntimeUnavailableError: ``edgetpu`` was asked for and cannot be used, or
            no TFLite runtime is installed.
    """
    runtime = import_runtime()
    accelerator = config.model.accelerator
    if accelerator is not Accelerator.CPU:
        try:
            if "edgetpu" not in manifest.models:
                raise RuntimeUnavailableError(
                    "the model folder has no Edge TPU model; compile it with "
                    "'edgernn compile' on an x86-64 host")
            delegate = load_edgetpu_delegate(runtime)
            return StepRunner(manifest, "edgetpu", runtime, [delegate])
        except RuntimeUnavailableError as e:
            if accelerator is Accelerator.EDGETPU:
                raise
            logger.warning("Edge TPU not used, running the int8 model on the CPU: %s", e)
    return StepRunner(manifest, "int8", runtime)


def pin_to_one_cpu() -> int | None:
    """Restricts every thread of the process, and those started later, to one CPU.

    Threads already running (numpy's BLAS pool, the interpreter's) are pinned
    one by one through /proc/self/task; new threads inherit the setting.

    Returns:
        The CPU (the highest-numbered one allowed, away from CPU 0 where most
        interrupts land), or None where the platform cannot pin.
    """
    try:
        cpu = max(os.sched_getaffinity(0))
        for task in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(task), {cpu})
            except ProcessLookupError:  # the thread ended meanwhile
                pass
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError) as e:
        logger.warning("cannot pin to one CPU: %s", e)
        return None
    return cpu


class Daemon:
    """One running edgernnd.

    Args:
        config: Validated configuration.
        config_path: The file it came from, re-read on SIGHUP (None: no reload).
        notifier: systemd notification sender.
    """

    def __init__(self, config: Config, config_path: Path | None = None,
                 notifier: Notifier | None = None):
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier.from_environ()
        self.metrics = Metrics()
        self.metrics.declare("edgernn_frames_dropped_total", MetricKind.COUNTER,
                             "Decoded frames dropped because inference fell behind.")
        self.manifest = load_manifest(config.model.dir)
        self.runner = load_runner(config, self.manifest)
        self.labels = self.manifest.labels
        self.model_sha256 = self.manifest.models[self.runner.variant].sha256
        self.states = StreamStates(self.runner, config.state.staggered_copies,
                                   config.state.reset_every, self._count_reset)
        self.frames: queue.Queue = queue.Queue(FRAME_QUEUE_CHUNKS)
        self.readers: list[PortReader] = []
        self.publisher: Publisher | None = None
        self.metrics_server: MetricsServer | None = None
        self.stop_reason: str | None = None
        self._reload = False
        self._frames_done = 0
        self._synced_rejections: dict = collections.defaultdict(int)
        self._ports_seen: set[str] = set()  # ports connected at least once
        self._snapshot_failing = False
        # False until the snapshot was read: a start that fails before must not
        # overwrite a good snapshot with empty states at shutdown.
        self._states_loaded = False

    # -- start-up -----------------------------------------------------------------

    def start(self) -> None:
        """Everything up to READY=1: metrics listener, first invoke, snapshot,
        sink, ports.

        Raises:
            ConfigError: ``metrics.listen`` cannot be bound, or the sink cannot
                be set up.
        """
        if self.config.model.pin_cpu:
            # Before any thread starts: threads inherit their creator's CPU set.
            cpu = pin_to_one_cpu()
            if cpu is not None:
                logger.info("running on CPU %d (model.pin_cpu)", cpu)
        listen = self.config.metrics.listen
        if listen:
            host, _, port = listen.rpartition(":")
            try:
                self.metrics_server = self.metrics.serve_http(host.strip("[]"),
                                                              int(port))
            except (OSError, ValueError) as e:
                raise ConfigError(f"metrics.listen {listen!r} cannot be served: "
                                  f"{e}") from e
        scores = self.runner.step(self.runner.quantize_frame(
            np.asarray(self.manifest.mean, np.float32)), self.runner.zero_states())
        logger.info("model %s loaded (%s, %s): %d features, %d states, %d labels; "
                    "first invoke gave %d scores", self.manifest.name,
                    self.runner.variant, self.model_sha256[:12], self.manifest.features,
                    len(self.manifest.states), len(self.labels), scores.size)
        state_dir = self.config.state.dir
        if state_dir is not None:
            try:
                state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            except OSError as e:
                logger.warning("cannot create the state directory %s: %s; state "
                               "will not survive a restart", state_dir, e)
            self.states.restore(state_dir, self.model_sha256,
                                self.config.state.snapshot_max_age_s)
        self._states_loaded = True
        sink = make_sink(self.config, self.labels, self.metrics)
        self.publisher = Publisher(sink, self.config.publish.queue_size, self.metrics)
        for port in self.config.ports:
            reader = PortReader(port, self.manifest.features, self._on_frames,
                                self._on_connect)
            self.readers.append(reader)
            reader.start()
        deadline = time.monotonic() + PORT_OPEN_WAIT_S
        for reader in self.readers:
            reader.connected.wait(max(0.0, deadline - time.monotonic()))
        self.metrics.set_gauge("edgernn_up", 1)
        self.notifier.ready()
        self.notifier.status(f"running: {len(self.readers)} ports, model "
                             f"{self.manifest.name} on {self.runner.variant}")
        logger.info("ready: %d ports, %d open", len(self.readers),
                    sum(r.connected.is_set() for r in self.readers))

    # -- reader callbacks (reader threads) ---------------------------------------

    def _on_frames(self, port: str, frames: list[Frame], read_time: float) -> None:
        try:
            self.frames.put_nowait((port, frames, read_time))
        except queue.Full:
            self.metrics.inc("edgernn_frames_dropped_total", len(frames), port=port)

    def _on_connect(self, port: str, connected: bool) -> None:
        self.frames.put(("", (port, connected), time.monotonic()))

    # -- the main loop ------------------------------------------------------------

    def run(self) -> int:
        """Runs until SIGTERM/SIGINT; returns the exit code."""
        self._install_signals()
        code = 0
        try:
            self.start()
            self._loop()
        except EdgernnError as e:
            self.stop_reason = f"error: {e}"
            code = e.exit_code
            raise
        except BaseException as e:
            self.stop_reason = f"crash: {type(e).__name__}: {e}"
            code = 1
            raise
        finally:
            self._shutdown()
        return code

    def _loop(self) -> None:
        config = self.config
        watchdog_s = self.notifier.watchdog_interval_s()
        watchdog_period = watchdog_s / 2 if watchdog_s else None
        now = time.monotonic()
        next_watchdog = now
        next_status = now + config.metrics.interval_s
        snapshot_s = config.state.snapshot_interval_s
        next_snapshot = now + snapshot_s if snapshot_s else math.inf
        last_frames, last_status = 0, now
        while self.stop_reason is None:
            try:
                port, frames, read_time = self.frames.get(timeout=TICK_S)
            except queue.Empty:
                pass
            else:
                if port:
                    self._process(port, frames, read_time)
                else:
                    self._port_event(*frames)
            now = time.monotonic()
            if watchdog_period and now >= next_watchdog:
                # The loop came round, so inference is making progress.
                self.notifier.watchdog()
                next_watchdog = now + watchdog_period
            if now >= next_status:
                fps = (self._frames_done - last_frames) / max(now - last_status, 1e-9)
                last_frames, last_status = self._frames_done, now
                self._update_metrics()
                self.notifier.status(self.metrics.status_line(fps))
                if config.metrics.textfile is not None:
                    self._write_textfile()
                next_status = now + config.metrics.interval_s
            if now >= next_snapshot:
                self._snapshot()
                next_snapshot = now + snapshot_s
            if self._reload:
                self._reload = False
                self._reload_config()

    def _process(self, port: str, frames: list[Frame], read_time: float) -> None:
        """Runs one chunk of frames read from a port; publishes their predictions.

        This is the per-frame path, so what does not change between frames is
        looked up once per chunk, counters are added once per chunk, and the
        predictions of the chunk go to the publisher in one hand-over.
        """
        state = self.config.state
        publish = self.config.publish
        change_only = publish.mode is PublishMode.CHANGE
        every = publish.every
        limit = state.value_limit
        idle_s = state.idle_reset_s
        max_gap = state.max_seq_gap
        states = self.states
        runner = self.runner
        labels = self.labels
        observe = self.metrics.observe_invoke
        perf = time.perf_counter
        host_time = read_time + (time.time() - time.monotonic())
        out = []
        done = 0
        for frame in frames:
            stream = states.get((port, frame.stream_id))
            if frame.kind is FrameKind.RESET:
                states.reset(stream, "reset_frame")
                stream.last_seq = frame.seq
                stream.last_seen = read_time
                continue
            if stream.last_seen and read_time - stream.last_seen > idle_s:
                states.reset(stream, "idle")
            seq = frame.seq
            if seq is not None and stream.last_seq is not None:
                if (seq - stream.last_seq) % SEQ_MODULO > max_gap:
                    self.metrics.inc("edgernn_seq_gaps_total", port=port)
                    states.reset(stream, "seq_gap")
            stream.last_seq = seq
            stream.last_seen = read_time
            values = frame.values
            if not np.abs(values).max() <= limit:  # NaN fails the test too
                self.metrics.inc("edgernn_rejected_frames_total", port=port,
                                 reason="bad_value")
                states.reset(stream, "bad_value")
                continue
            started = perf()
            scores = states.step(stream, runner.quantize_frame(values))
            observe(perf() - started)
            done += 1
            stream.count += 1
            best, probabilities = runner.read_scores(scores)
            label = labels[best]
            if change_only:
                due = label != stream.last_label
            else:
                due = stream.count % every == 0
            stream.last_label = label
            if due:
                out.append(Prediction(
                    port, frame.stream_id, seq if seq is not None else stream.total,
                    frame.sensor_time_ms, host_time, label, probabilities,
                    (time.monotonic() - read_time) * 1000.0))
        if done:
            self._frames_done += done
            self.metrics.inc("edgernn_frames_total", done, port=port)
        if out:
            self.metrics.inc("edgernn_predictions_total", len(out))
            self.publisher.submit_many(out)

    def _port_event(self, port: str, connected: bool) -> None:
        if connected:
            if port not in self._ports_seen:
                # The first connection: the states are fresh or were restored
                # from a snapshot, and resetting them would undo the restore.
                self._ports_seen.add(port)
                return
            self.metrics.inc("edgernn_reconnects_total", port=port)
            reason = "reconnect"
        else:
            reason = "disconnect"
        # Frames before and after an outage do not belong to one sequence.
        self.states.reset_port(port, reason)

    def _count_reset(self, key, reason: str) -> None:
        self.metrics.inc("edgernn_state_resets_total", reason=reason)
        logger.debug("stream %s/%d reset: %s", key[0], key[1], reason)

    # -- periodic work ---------------------------------------------------------------

    def _update_metrics(self) -> None:
        """Copies the decoders' counters into the metrics (counters only grow)."""
        for reader in self.readers:
            port = reader.port.name
            totals: collections.Counter = collections.Counter()
            for stats in [*reader.stats_done, reader.decoder.stats]:
                totals.update(stats.rejected)
            for reason, count in totals.items():
                key = (port, reason)
                delta = count - self._synced_rejections[key]
                if delta > 0:
                    name = ("edgernn_crc_errors_total" if reason == "crc"
                            else "edgernn_rejected_frames_total")
                    labels = {"port": port} if reason == "crc" else {
                        "port": port, "reason": reason}
                    self.metrics.inc(name, delta, **labels)
                    self._synced_rejections[key] = count
        self.metrics.set_gauge("edgernn_streams", len(self.states.streams))

    def _write_textfile(self) -> None:
        # Not Metrics.write_textfile, which makes the file 0644: the metrics name
        # the ports and show the traffic, so like the snapshot (0600) and the
        # predictions file (0640) they are not for every local user. A scraper
        # reads the file through the group (node_exporter in the group of the
        # daemon) or scrapes metrics.listen on loopback instead.
        try:
            write_bytes_atomic(self.config.metrics.textfile,
                               self.metrics.render().encode("utf-8"),
                               mode=TEXTFILE_MODE)
        except OSError as e:
            logger.warning("cannot write metrics textfile %s: %s",
                           self.config.metrics.textfile, e)

    def _snapshot(self, final: bool = False) -> None:
        directory = self.config.state.dir
        if directory is None:
            return
        try:
            path = self.states.snapshot(directory, self.model_sha256)
        except OSError as e:
            # A directory that stays unwritable would warn at every interval:
            # warn once, repeat at DEBUG, and always warn for the last snapshot
            # at shutdown (without it the next start begins from zero states).
            if self._snapshot_failing and not final:
                logger.debug("cannot write state snapshot to %s: %s", directory, e)
            else:
                logger.warning("cannot write state snapshot to %s%s: %s", directory,
                               " at shutdown" if final else "", e)
            self._snapshot_failing = True
            return
        if self._snapshot_failing:
            logger.info("state snapshot written to %s again", path)
            self._snapshot_failing = False
        else:
            logger.debug("state snapshot written to %s", path)

    # -- signals, reload, shutdown -----------------------------------------------

    def _install_signals(self) -> None:
        def stop(signum, _frame):
            self.stop_reason = f"signal {signal.Signals(signum).name}"

        def reload(_signum, _frame):
            self._reload = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _reload_config(self) -> None:
        """SIGHUP: re-reads the file; applies what can change without a restart."""
        if self.config_path is None:
            logger.warning("SIGHUP ignored: no configuration file to re-read")
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except EdgernnError as e:
            logger.error("reload failed, keeping the running configuration: %s", e)
            self.notifier.ready()
            return
        if (new.model, new.ports, new.publish.sink, new.mqtt, new.metrics.listen) != (
                self.config.model, self.config.ports, self.config.publish.sink,
                self.config.mqtt, self.config.metrics.listen):
            logger.warning("reload: model, ports, sink settings and metrics.listen "
                           "change only at a restart; the rest is applied now")
        self.config = type(new)(model=self.config.model, ports=self.config.ports,
                                state=new.state, publish=self._keep_sink(new),
                                mqtt=self.config.mqtt,
                                metrics=dataclasses.replace(
                                    new.metrics, listen=self.config.metrics.listen),
                                log_level=new.log_level)
        logging.getLogger().setLevel(new.log_level.upper())
        logger.info("configuration reloaded from %s", self.config_path)
        self.notifier.ready()

    def _keep_sink(self, new: Config):
        return dataclasses.replace(new.publish, sink=self.config.publish.sink,
                                   file=self.config.publish.file,
                                   queue_size=self.config.publish.queue_size)

    def _shutdown(self) -> None:
        reason = self.stop_reason or "end of run"
        self.notifier.stopping()
        for reader in self.readers:
            reader.stop()
        for reader in self.readers:
            reader.join(timeout=2.0)
        # Frames already read are run before the state is saved.
        while True:
            try:
                port, frames, read_time = self.frames.get_nowait()
            except queue.Empty:
                break
            if port:
                self._process(port, frames, read_time)
        if self._states_loaded:
            self._snapshot(final=True)
        if self.publisher is not None:
            self.publisher.close(timeout_s=5.0)
        self._update_metrics()
        self.metrics.set_gauge("edgernn_up", 0)
        if self.config.metrics.textfile is not None:
            self._write_textfile()
        if self.metrics_server is not None:
            self.metrics_server.close()
        logger.info("stopped (%s) after %d frames, %d streams", reason,
                    self._frames_done, len(self.states.streams))

