"""The README's runnable commands run: every shell block marked ``<!-- runnable -->`` is checked
command by command in a copy of the working tree.

A full run of most commands is far too slow for a test, so each is checked the cheapest way that
still exercises its parsing and its inputs: the flow with ``--dry-run`` (arguments, params file,
target, stage graph); ``dvc exp run`` queued instead of run (its ``-S`` overrides applied to a copy
of params.yaml; each overridden key must exist there); ``dvc repro`` as ``dvc status`` of the same
targets (DVC's own ``--dry`` stops at the first dep a dry run did not build); servers with
``--help``; ``make`` with ``-n``; read-only DVC commands (``metrics show``, ``exp show``, …) as
written. A command with no check below fails the test, so a new runnable block decides how it is
checked.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*\n```sh\n(.*?)\n```", re.S)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DVC_READ_ONLY = (("metrics", "show"), ("metrics", "diff"), ("params", "diff"), ("exp", "show"), ("status",))


def runnable_commands(text: str) -> list[str]:
    """The commands of the README's runnable blocks, one per line (comments dropped, ``\\`` joined)."""
    commands = []
    for block in BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                commands.append(line)
    return commands


def check_command(line: str) -> tuple[dict[str, str], list[str]]:
    """(extra environment, argv) that checks one README command without running it in full."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    program, args = words[0], words[1:]
    python = [sys.executable]
    if program in ("python", "python3") and args[:2] == ["-m", "pipeline.flow"]:
        return env, [*python, *args, "--dry-run"]
    if program == "dvc":
        if args[:1] == ["repro"]:
            return env, [*python, "-m", "dvc", "status", *(a for a in args[1:] if not a.startswith("-"))]
        if args[:2] == ["exp", "run"]:
            return env, [*python, "-m", "dvc", *args, "--queue"]
        if any(tuple(args[: len(cmd)]) == cmd for cmd in DVC_READ_ONLY):
            return env, [*python, "-m", "dvc", *args]
    if program == "make":
        return env, ["make", "-n", *args]
    if program == "mlflow":  # a server: its command line parses, nothing starts
        return env, [*python, "-m", "mlflow", *args, "--help"]
    if program == "prefect":
        return env, [str(Path(sys.executable).with_name("prefect")), *args, "--help"]
    raise AssertionError(f"README command {line!r} is marked runnable but tests/test_readme.py has no check for it")


def test_marker_finds_the_documented_commands():
    commands = runnable_commands((REPO / "README.md").read_text(encoding="utf-8"))
    joined = "\n".join(commands)
    for expected in ("make repro", "python -m pipeline.flow", "dvc exp run -S", "dvc exp show", "dvc metrics show",
                     "dvc metrics diff", "mlflow ui"):
        assert expected in joined, f"no runnable README command contains {expected!r}"
    assert all(check_command(line) for line in commands)


def set_params(line: str) -> list[str]:
    """The params a ``dvc exp run -S key=value`` command sets."""
    words = shlex.split(line, comments=True)
    return [words[i + 1].split("=", 1)[0] for i, word in enumerate(words[:-1]) if word in ("-S", "--set-param")]


def test_exp_run_overrides_name_existing_params():
    """``dvc exp run -S`` adds a key that does not exist without a word; the README's must exist."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = [key for line in runnable_commands((REPO / "README.md").read_text(encoding="utf-8")) for key in set_params(line)]
    assert keys, "no runnable README command sets a param"
    for key in keys:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"README's dvc exp run -S {key}: no such param in params.yaml"
            node = node[part]


def test_unknown_runnable_command_is_an_error():
    with pytest.raises(AssertionError, match="no check"):
        check_command("rm -rf models")
    assert check_command("PREFECT_API_URL=http://x python -m pipeline.flow --jobs 2") == (
        {"PREFECT_API_URL": "http://x"}, [sys.executable, "-m", "pipeline.flow", "--jobs", "2", "--dry-run"])


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The working tree as git sees it (tracked and untracked, not ignored files), committed in a new repo."""
    copy = tmp_path_factory.mktemp("readme") / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "readme copy"]):
        subprocess.run(cmd, cwd=copy, check=True, capture_output=True)
    return copy


def test_every_runnable_readme_command_runs(repo_copy, tmp_path):
    commands = runnable_commands((REPO / "README.md").read_text(encoding="utf-8"))
    base_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    failures = []
    for line in commands:
        env, argv = check_command(line)
        result = subprocess.run(argv, cwd=repo_copy, env={**base_env, **env}, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            failures.append(f"$ {line}\n  checked as: {shlex.join(argv)}\n  exit {result.returncode}\n"
                            + (result.stdout + result.stderr)[-1500:])
    assert not failures, "\n\n".join(failures)
