"""The daemon started as the systemd unit starts it, with the example configuration.

The unit's ExecStart arguments are taken from systemd/edgernnd.service and the
example systemd/edgernnd.toml is used with only its paths pointed at this test's
model folder, state directory and a pseudo-terminal.
"""

import re
import shlex
from pathlib import Path

from daemon_harness import Daemon, PtyPort

from edgernnd.binary_codec import encode_frame

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"


def _exec_start_args() -> list[str]:
    text = (SYSTEMD / "edgernnd.service").read_text()
    line = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    words = shlex.split(line)
    assert words[0].endswith("/edgernnd")
    return words[1:]


def test_daemon_runs_with_unit_exec_start_and_example_config(
        basicmotions_model, basicmotions_test, tmp_path):
    port = PtyPort()
    state = tmp_path / "state"
    state.mkdir()
    config = (SYSTEMD / "edgernnd.toml").read_text()
    replacements = {'"/opt/edgernn/model"': f'"{basicmotions_model}"',
                    '"/dev/edgernn-imu0"': f'"{port.tty}"',
                    '"/var/lib/edgernnd"': f'"{state}"'}
    for old, new in replacements.items():
        assert old in config
        config = config.replace(old, new)
    (tmp_path / "edgernnd.toml").write_text(config)
    args = [str(tmp_path / "edgernnd.toml") if a == "/etc/edgernnd/edgernnd.toml"
            else a for a in _exec_start_args()]
    assert str(tmp_path / "edgernnd.toml") in args

    daemon = Daemon(args, tmp_path)
    try:
        daemon.wait_ready()
        recording = basicmotions_test.sequences[0]
        port.write(b"".join(encode_frame(0, t, v) for t, v in enumerate(recording)))
        records = daemon.wait_records(len(recording))
    finally:
        code = daemon.stop()
        port.close()
    assert code == 0, daemon.stderr_text()
    assert [r["seq"] for r in records] == list(range(len(recording)))
    assert {r["port"] for r in records} == {"edgernn-imu0"}
    assert (state / "states.npz").exists()  # the SIGTERM snapshot
