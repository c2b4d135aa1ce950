"""Checks of the files in systemd/: the unit, the example config, the udev rules.

``systemd-analyze verify`` exits 0 even when it warns about unknown keys or
unparsable values, so the tests fail on any line it prints about our unit. It
rejects an ExecStart= binary that does not exist, which on a workstation is the
case for /opt/edgernn/venv/bin/edgernnd; the copy under test points at the
installed console script instead (the arguments stay). It does not resolve
users or groups: DynamicUser= and SupplementaryGroups= are checked only by a
real start.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgernnd import config as config_module
from edgernnd.config import load_config

tomllib = config_module.tomllib  # tomli on Python 3.10

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "edgernnd.service"
EXAMPLE_CONFIG = SYSTEMD_DIR / "edgernnd.toml"
RULES = SYSTEMD_DIR / "99-edgernn.rules"

INSTALLED_BINARY = "/opt/edgernn/venv/bin/edgernnd"
MAX_EXPOSURE = 2.5
ANALYZE_TIMEOUT_S = 30

systemd_analyze = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    systemd_analyze is None, reason="systemd-analyze is not installed"
)


def find_daemon_binary() -> str:
    """The edgernnd console script of this environment, else the interpreter."""
    found = shutil.which("edgernnd")
    if found:
        return found
    beside_python = Path(sys.executable).with_name("edgernnd")
    if beside_python.is_file():
        return str(beside_python)
    return sys.executable


def copy_unit(tmp_path: Path, extra_lines: str = "") -> Path:
    """The unit with ExecStart's binary replaced, written to tmp_path."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    text = text.replace(f"ExecStart={INSTALLED_BINARY} ",
                        f"ExecStart={find_daemon_binary()} ")
    text = text.replace("\n[Install]", extra_lines + "\n[Install]")
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def run_analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [systemd_analyze, *args], capture_output=True, text=True,
        timeout=ANALYZE_TIMEOUT_S, cwd="/",
    )


def lines_about(output: str, unit_path: Path) -> list[str]:
    return [line for line in output.splitlines()
            if unit_path.name in line or str(unit_path.parent) in line]


def parse_unit(text: str) -> dict[tuple[str, str], list[str]]:
    """Maps (section, key) to the values assigned, in order."""
    entries: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=value line: {raw!r}"
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


@needs_systemd_analyze
def test_systemd_unit_verify_passes(tmp_path):
    unit = copy_unit(tmp_path)

    result = run_analyze("verify", str(unit))

    complaints = lines_about(result.stdout + result.stderr, unit)
    assert result.returncode == 0, result.stderr
    assert complaints == []


@needs_systemd_analyze
def test_systemd_unit_verify_catches_mistakes(tmp_path):
    # Shows that the check above can fail: a bad key and a bad value are
    # reported (with exit status 0), and so is the uninstalled binary.
    unit = copy_unit(tmp_path, "\nProtectClock=maybe\nWatchdogSecs=30")
    output = run_analyze("verify", str(unit))
    complaints = "\n".join(lines_about(output.stdout + output.stderr, unit))
    assert "WatchdogSecs" in complaints
    assert "maybe" in complaints

    if not Path(INSTALLED_BINARY).exists():
        original = tmp_path / "original" / UNIT.name
        original.parent.mkdir()
        shutil.copy(UNIT, original)
        result = run_analyze("verify", str(original))
        assert result.returncode != 0
        assert INSTALLED_BINARY in result.stderr


@needs_systemd_analyze
def test_systemd_unit_security_exposure_at_most_limit(tmp_path):
    unit = copy_unit(tmp_path)

    result = run_analyze("security", "--offline=true", "--no-pager", str(unit))

    if "offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze is older than 250 (no --offline)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure of {UNIT.name}: {exposure}")
    assert exposure <= MAX_EXPOSURE


def test_systemd_unit_declares_service_contract():
    entries = parse_unit(UNIT.read_text())

    def one(key: str, section: str = "Service") -> str:
        values = entries[(section, key)]
        assert len(values) == 1, f"{key} assigned {len(values)} times"
        return values[0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "on-failure"
    assert one("RestartSec") == "5"
    assert one("ExecStart") == (
        f"{INSTALLED_BINARY} --config /etc/edgernnd/edgernnd.toml"
    )
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("DevicePolicy") == "closed"
    assert one("UMask") == "0027"
    assert int(one("StartLimitBurst", "Unit")) >= 2
    assert int(one("StartLimitIntervalSec", "Unit")) >= 5 * int(one("RestartSec"))
    groups = one("SupplementaryGroups").split()
    assert set(groups) == {"dialout", "plugdev"}
    allowed = {v.split()[0] for v in entries[("Service", "DeviceAllow")]}
    assert allowed == {
        "char-ttyUSB", "char-ttyACM", "char-ttyAMA", "char-ttyS",
        "char-usb_device", "char-apex",
    }
    families = one("RestrictAddressFamilies").split()
    assert "AF_INET" in families and "AF_INET6" in families
    # Fleets publish to a remote broker: no IP allow list in the shipped unit.
    assert ("Service", "IPAddressDeny") not in entries


def test_systemd_unit_directories_match_example_config():
    entries = parse_unit(UNIT.read_text())
    config = load_config(EXAMPLE_CONFIG)

    state_dir = entries[("Service", "StateDirectory")][0]
    config_dir = entries[("Service", "ConfigurationDirectory")][0]
    assert config.state.dir == Path("/var/lib") / state_dir
    assert f"--config /etc/{config_dir}/{EXAMPLE_CONFIG.name}" in (
        entries[("Service", "ExecStart")][0]
    )


def test_example_config_loads_with_documented_values():
    config = load_config(EXAMPLE_CONFIG)

    assert config.model.dir == Path("/opt/edgernn/model")
    assert config.state.dir == Path("/var/lib/edgernnd")
    (port,) = config.ports
    assert port.url == "/dev/edgernn-imu0"
    assert port.format is config_module.WireFormat.BINARY
    assert port.baudrate == 115200
    assert config.publish.sink is config_module.SinkKind.STDOUT


# Keys the example sets on purpose instead of showing the schema's default.
_CHOSEN = {
    ("model", "dir"), ("port", "url"), ("port", "name"), ("state", "dir"),
}
_SECTIONS = {
    "model": config_module.ModelConfig,
    "port": config_module.PortConfig,
    "state": config_module.StateConfig,
    "publish": config_module.PublishConfig,
    "mqtt": config_module.MqttConfig,
    "metrics": config_module.MetricsConfig,
}


def test_example_config_shows_every_key_with_its_default():
    text = EXAMPLE_CONFIG.read_text()
    raw = tomllib.loads(text)
    commented = _commented_keys(text)

    for section, cls in _SECTIONS.items():
        table = raw[section][0] if section == "port" else raw[section]
        for field in dataclasses.fields(cls):
            if field.name in table:
                if (section, field.name) in _CHOSEN:
                    continue
                default = field.default
                if isinstance(default, enum.Enum):
                    default = default.value
                assert table[field.name] == default, f"{section}.{field.name}"
            else:
                # Optional keys without a TOML spelling of "unset" are shown
                # commented out, with an example value.
                assert field.default is None, f"{section}.{field.name} missing"
                assert field.name in commented.get(section, set()), (
                    f"{section}.{field.name} not shown"
                )
    assert raw["log"] == {"level": "info"}


def _commented_keys(text: str) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\[\[?(\w+)\]\]?", line.strip())
        if header:
            section = header.group(1)
        match = re.fullmatch(r"# (\w+) = .+", line.strip())
        if match:
            keys.setdefault(section, set()).add(match.group(1))
    return keys


# --- udev rules ------------------------------------------------------------------

_MATCH_KEYS = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "SUBSYSTEM", "SUBSYSTEMS",
               "DRIVER", "DRIVERS", "ATTR", "ATTRS", "ENV", "TAG", "TAGS", "TEST",
               "PROGRAM", "RESULT", "SYSCTL", "CONST", "NAME", "SYMLINK"}
_ASSIGN_KEYS = {"NAME", "SYMLINK", "OWNER", "GROUP", "MODE", "ENV", "TAG", "ATTR",
                "SYSCTL", "RUN", "LABEL", "GOTO", "IMPORT", "OPTIONS", "SECLABEL"}
_PAIR = re.compile(
    r'([A-Z_]+)(?:\{([^}]+)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)'
)


def parse_udev_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    """Parses udev rules into lists of (key, attribute, operator, value).

    Raises:
        ValueError: A line is not a comma-separated list of KEY op "value"
            pairs, a key is unknown, or a key is used with the wrong operator.
    """
    rules = []
    logical = ""
    for number, raw in enumerate(text.splitlines(), 1):
        if not logical and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.endswith("\\"):
            logical += raw[:-1]
            continue
        logical += raw
        rules.append(_parse_rule(logical.strip(), number))
        logical = ""
    if logical:
        raise ValueError("the file ends inside a continued line")
    return rules


def _parse_rule(line: str, number: int) -> list[tuple[str, str | None, str, str]]:
    pairs = []
    pos = 0
    while pos < len(line):
        match = _PAIR.match(line, pos)
        if not match:
            raise ValueError(f"line {number}: cannot parse {line[pos:]!r}")
        key, attribute, op, value = match.groups()
        matching = op in ("==", "!=")
        if key not in (_MATCH_KEYS if matching else _ASSIGN_KEYS):
            raise ValueError(f"line {number}: {key} {op} is not a udev rule key")
        if key in ("ATTR", "ATTRS", "ENV") and not attribute:
            raise ValueError(f"line {number}: {key} needs {{name}}")
        if key == "MODE" and not re.fullmatch(r"0[0-7]{3}", value):
            raise ValueError(f"line {number}: MODE={value!r} is not octal")
        pairs.append((key, attribute, op, value))
        pos = match.end()
        while pos < len(line) and line[pos] == " ":
            pos += 1
    if not any(op in ("==", "!=") for _, _, op, _ in pairs):
        raise ValueError(f"line {number}: a rule without a match applies to all")
    return pairs


def find_rule(rules, **wanted: str):
    """The rules whose match keys include every ``key=value`` in ``wanted``."""
    found = []
    for rule in rules:
        matches = {(f"{k}{{{a}}}" if a else k): v for k, a, op, v in rule if op == "=="}
        if all(matches.get(k) == v for k, v in wanted.items()):
            found.append({(f"{k}{{{a}}}" if a else k, op): v for k, a, op, v in rule})
    return found


def test_udev_rules_parse_and_name_the_devices():
    rules = parse_udev_rules(RULES.read_text())

    assert len(rules) == 4
    (ftdi,) = find_rule(rules, **{"SUBSYSTEM": "tty", "ATTRS{idVendor}": "0403",
                                  "ATTRS{idProduct}": "6001"})
    assert ("ATTRS{serial}", "==") in ftdi
    assert ftdi[("SYMLINK", "+=")] == "edgernn-imu0"
    assert ftdi[("GROUP", "=")] == "dialout"
    assert ftdi[("MODE", "=")] == "0660"
    for vendor, product in (("1a6e", "089a"), ("18d1", "9302")):
        (coral,) = find_rule(rules, **{"SUBSYSTEM": "usb", "ATTR{idVendor}": vendor,
                                       "ATTR{idProduct}": product})
        assert coral[("GROUP", "=")] == "plugdev"
        assert coral[("MODE", "=")] == "0660"
    (apex,) = find_rule(rules, SUBSYSTEM="apex")
    assert apex[("GROUP", "=")] == "plugdev"
    assert apex[("MODE", "=")] == "0660"


@pytest.mark.parametrize(
    "line",
    [
        'SUBSYSTEM=="tty" GROUP="dialout"',  # missing comma
        'SUBSYSTEM=="tty", GROUP=="dialout"',  # GROUP is not a match key
        'SUBSYSTEM=="tty", MODE="660x"',
        'SUBSYSTEM=="tty", ATTRS=="0403"',
        'SUBSYSTEM=="tty", SYMLINK+=edgernn',  # unquoted value
        'GROUP="plugdev"',  # no match: would apply to every device
        'SUBSYSTEM=="usb", \\',  # continuation at the end of the file
    ],
)
def test_udev_parser_rejects_malformed_rule(line):
    with pytest.raises(ValueError):
        parse_udev_rules(line + "\n")
