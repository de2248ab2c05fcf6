"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme[:8] if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and commands[0].endswith("rosetool demo")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
