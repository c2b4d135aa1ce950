"""The ``edgernnd`` command line: configuration, logging, and the daemon's exit code.

Exit codes: 0 stopped by a signal; 2 bad configuration; 3 bad manifest or model
file; 4 no usable TFLite runtime or Edge TPU; 1 anything else. A problem the user
can fix prints one line and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgernnd import __version__
from edgernnd.config import Config, load_config, parse_config
from edgernnd.errors import ConfigError, EdgernnError

logger = logging.getLogger("edgernnd")

# journald reads a "<N>" syslog priority at the start of each stderr line.
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                     logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{record.name}: {super().format(record)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgernnd", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run a stateful recurrent step model on serial sensor streams "
                    "and publish a prediction per frame.")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML configuration (see systemd/edgernnd.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and the model, then exit")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model folder with manifest.json (overrides model.dir)")
    parser.add_argument("--port", action="append", default=None, metavar="URL",
                        help="serial port or pyserial URL; repeat for several "
                             "(replaces the configured ports)")
    parser.add_argument("--format", choices=("binary", "csv"), default=None,
                        help="wire format of --port ports")
    parser.add_argument("--baudrate", type=int, default=None,
                        help="baud rate of --port ports")
    parser.add_argument("--accelerator", choices=("cpu", "edgetpu", "auto"),
                        default=None, help="overrides model.accelerator")
    parser.add_argument("--sink", choices=("stdout", "file", "mqtt"), default=None,
                        help="overrides publish.sink")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="overrides state.dir (snapshots)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default=None, help="overrides log.level")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version",
                        version=f"edgernnd {__version__}")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    o: dict = {}
    if args.model_dir is not None:
        o.setdefault("model", {})["dir"] = str(args.model_dir.resolve())
    if args.accelerator:
        o.setdefault("model", {})["accelerator"] = args.accelerator
    if args.port:
        ports = []
        for url in args.port:
            port = {"url": url}
            if args.format:
                port["format"] = args.format
            if args.baudrate is not None:
                port["baudrate"] = args.baudrate
            ports.append(port)
        o["port"] = ports
    if args.sink:
        o.setdefault("publish", {})["sink"] = args.sink
    if args.state_dir is not None:
        o.setdefault("state", {})["dir"] = str(args.state_dir.resolve())
    if args.log_level:
        o["log"] = {"level": args.log_level}
    return o


def make_config(args: argparse.Namespace) -> Config:
    """The configuration from --config with the flags laid over it."""
    if args.config is not None:
        return load_config(args.config, _overrides(args))
    if args.model_dir is None or not args.port:
        raise ConfigError("give --config FILE, or at least --model-dir DIR and --port URL")
    return parse_config({}, _overrides(args))


def _setup_logging(level: str, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else level.upper())


def check_ports(config: Config) -> None:
    """Checks that every configured device path exists.

    The daemon waits for a missing port (an adapter may be plugged in later), so
    only ``--check-config`` treats one as an error. URLs such as ``socket://``
    and ``rfc2217://`` are reachable only by connecting and are not checked.

    Raises:
        ConfigError: A device path does not exist.
    """
    for i, port in enumerate(config.ports):
        if "://" not in port.url and not os.path.exists(port.url):
            raise ConfigError(
                f"port[{i}].url {port.url!r} does not exist; plug the device in or "
                "fix the path (the daemon would keep retrying it)")


def check_config(config: Config) -> int:
    """``--check-config``: the ports exist and the model loads and runs.

    Raises:
        ConfigError: A port does not exist.
        ManifestError: The manifest or a model file is bad.
        RuntimeUnavailableError: No runtime can load the model.
    """
    import numpy as np

    from edgernnd.daemon import load_runner
    from edgernnd.manifest import load_manifest

    check_ports(config)
    manifest = load_manifest(config.model.dir)
    runner = load_runner(config, manifest)
    runner.run_sequence(np.asarray([manifest.mean], np.float32))  # one invoke
    print(f"configuration OK: {len(config.ports)} ports, model {manifest.name} "
          f"({manifest.features} features, {len(manifest.labels)} labels) on "
          f"{runner.variant}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level or "info", args.debug)
    try:
        config = make_config(args)
        _setup_logging(config.log_level, args.debug)
        if args.check_config:
            return check_config(config)
        from edgernnd.daemon import Daemon

        daemon = Daemon(config, args.config)
        return daemon.run()
    except EdgernnError as e:
        if args.debug:
            raise
        print(f"edgernnd: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
