import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"snippet {index} failed:\n{SNIPPETS[index]}\n{result.stderr}"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(make \w+)\s+# the test suite", README, flags=re.MULTILINE)
    assert commands == ["make test"]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci_lines
