"""The README's demo command, run as written on a fresh clone of this repository.

The test command is the one .ci/run executes, so it is exercised by every CI run;
this test does the same for the demo: it clones the committed tree, runs the
command line copied out of the README in that clone (a new virtual environment,
the package installed from the clone), and checks the demo's table.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".ci"))

from readme_command import readme_command  # noqa: E402


def test_readme_commands_are_single_lines_that_install_and_run():
    demo, tests = readme_command("demo"), readme_command("tests")
    assert demo.endswith("edgernn demo") and "pip install" in demo
    assert tests.endswith("pytest") and "pip install" in tests and "mosquitto" in tests


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_demo_command_works_on_a_fresh_clone(tmp_path):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout with commits")
    clone = tmp_path / "edgernn"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    result = subprocess.run(["bash", "-c", readme_command("demo")], cwd=clone,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    match = re.search(r"accuracy at the last frame: (\d+)/40 = ", out)
    assert match, out[-2000:]
    assert int(match.group(1)) / 40 >= 0.85
    assert "predictions: 4000/4000 frames" in out
    assert re.search(r"latency, frame written to prediction received: median "
                     r"[\d.]+ ms, 99th percentile [\d.]+ ms", out)
    assert "from frames that crossed /dev/pts/" in out
