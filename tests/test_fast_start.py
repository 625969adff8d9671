"""./cli.py starts from cached bytecode: its first lines are a shell script that runs
python3 on the file as an imported module (see the top of cli.py).  Run here as a user
runs it, by its path, on a copy of cli.py in a directory of the test's own."""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import CLI, as_user, python_for


@pytest.fixture
def copy(tmp_path):
    """A copy of cli.py, and an environment whose python3 is this one, with
    PYTHONDONTWRITEBYTECODE set, as on our machines."""
    path = tmp_path / "bin" / "cli.py"
    path.parent.mkdir()
    shutil.copy(CLI, path)
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.defpath}", "HOME": str(tmp_path),
           "PYTHONDONTWRITEBYTECODE": "1", "CLI_PY_DATA_DIR": str(tmp_path / ".data")}
    return path, env


def run(argv, env, **kwargs):
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, **kwargs)


def loaded_from_cache(result):
    """Whether python -v said it read cli.py's code from a .pyc."""
    return any(line.startswith("# code object from ") and "cli." in line and ".pyc" in line
               for line in result.stderr.splitlines())


def test_the_second_run_loads_cached_bytecode_even_under_pythondontwritebytecode(copy):
    path, env = copy
    first = run([str(path), "--version"], env)
    assert first.returncode == 0 and first.stdout.startswith("cli.py ")
    cached = list((path.parent / "__pycache__").glob("cli.*.pyc"))
    assert len(cached) == 1
    second = run([str(path), "--version"], dict(env, PYTHONVERBOSE="1"))
    assert second.returncode == 0 and second.stdout == first.stdout
    assert loaded_from_cache(second), second.stderr[-2000:]
    # The same run without the cache (the file run as a script) compiles it.
    plain = run([sys.executable, "-v", str(path), "--version"], env)
    assert plain.stdout == first.stdout and not loaded_from_cache(plain)


def test_an_edited_file_is_compiled_again(copy):
    path, env = copy
    assert run([str(path), "--version"], env).returncode == 0
    text = path.read_text()
    path.write_text(text.replace('VERSION = "', 'VERSION = "edited-', 1))
    assert run([str(path), "--version"], env).stdout.startswith("cli.py edited-")


def test_arguments_exit_status_and_errors_pass_through(copy):
    path, env = copy
    usage = run([str(path), "--help"], env)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: cli.py ")
    assert run([str(path), "status"], env).returncode != 0   # no server: one line, exit 1
    refused = run([str(path), "add_job", "--priority", "x", "job.sh", "two words", "-x"], env)
    assert refused.returncode == 1 and refused.stderr.startswith("Error: ")
    assert "Traceback" not in refused.stderr
    # Installed under another name (a symlink on PATH, say), it runs the same.
    link = path.parent / "q"
    link.symlink_to(path)
    assert run([str(link), "--version"], env).stdout.startswith("cli.py ")
    # Still a Python file: python3 cli.py, and sh cli.py, run it the same.
    for argv in ([sys.executable, str(path), "--version"], ["sh", str(path), "--version"]):
        assert run(argv, env).stdout.startswith("cli.py ")


def test_a_directory_it_may_not_write_caches_in_the_users_cache_or_nowhere(second_user):
    root = pathlib.Path(tempfile.mkdtemp(prefix="clipy-fast-"))   # (tmp_path: 0700 above)
    try:
        check_other_users_cache(root, second_user)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_other_users_cache(root, second_user):
    root.chmod(0o755)
    path = root / "bin" / "cli.py"
    path.parent.mkdir(mode=0o755)   # root's: the other user may read, not write
    shutil.copy(CLI, path)
    path.chmod(0o755)
    python = python_for(second_user)
    cache = root / "cache"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    user_env = {"PATH": f"{os.path.dirname(python)}:{os.defpath}", "HOME": "/nonexistent",
                "PYTHONDONTWRITEBYTECODE": "1", "XDG_CACHE_HOME": str(cache)}
    first = as_user(second_user, str(path), "--version", env=user_env)
    assert first.returncode == 0 and first.stdout.startswith("cli.py "), first.stderr
    assert not (path.parent / "__pycache__").exists()
    assert list(cache.rglob("cli.*.pyc")), "no .pyc in XDG_CACHE_HOME"
    again = as_user(second_user, str(path), "--version", env=dict(user_env, PYTHONVERBOSE="1"))
    assert loaded_from_cache(again), again.stderr[-2000:]
    # Nothing writable at all: it runs all the same, compiled each time.
    os.chmod(cache, 0o755)
    shutil.rmtree(cache / "cli.py")
    bare = as_user(second_user, str(path), "--version", env=user_env)
    assert bare.returncode == 0 and bare.stdout == first.stdout, bare.stderr
    assert not list(cache.rglob("cli.*.pyc"))


def test_a_command_imports_no_more_than_it_needs_and_help_still_fits_the_width(copy):
    """argparse's own help formatter imports shutil (and its archive modules) at every
    start; cli.py's sizes help itself, as shutil would: COLUMNS, the terminal, else 80."""
    path, env = copy
    result = run([str(path), "status"], dict(env, PYTHONPROFILEIMPORTTIME="1"))
    assert "no server running" in result.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "argparse" in imported   # (the import list was read)
    assert not imported & {"shutil", "tabulate", "fabric", "filelock", "sqlite3"}, imported
    for columns in ("50", "120"):
        shown = run([str(path), "add_job", "--help"], dict(env, COLUMNS=columns)).stdout
        # (the options are wrapped; the description and examples are shown as written)
        options = shown.split("\noptions:\n", 1)[1].split("\nexamples:\n", 1)[0]
        width = max(map(len, options.splitlines()))
        assert int(columns) - 12 <= width <= int(columns) - 2, (columns, width)
