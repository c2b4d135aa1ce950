"""Prints one of the README's commands: the fenced line after `<!-- command: NAME -->`.

Used by .ci/run and tests/test_readme.py so that the commands run are the ones a
reader copies.
"""

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command(name: str) -> str:
    lines = README.read_text().splitlines()
    marker = f"<!-- command: {name} -->"
    start = lines.index(marker)
    fence = lines[start + 1]
    if not fence.startswith("```"):
        raise SystemExit(f"README: no code block after {marker}")
    return lines[start + 2].strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
