"""Another local user can neither read the queue's state nor use its server."""
import os
import pathlib
import shutil
import tempfile

import pytest

from conftest import Cli, as_user, python_for

CLI_PY = pathlib.Path(__file__).resolve().parent.parent / "cli.py"


@pytest.fixture
def open_server(ssh_sandbox, workers):
    """A server whose data dir sits in a directory everyone may enter, started with
    umask 0: only cli.py's own modes stand between the queue and other users."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="clipy-shared-"))
    root.chmod(0o755)
    cli = Cli(root, ssh_sandbox.env())
    cli.ok("start", umask=0)
    cli.ok("add_slave", "w1", umask=0)
    job_id = cli.add_job(cli.script, umask=0)
    cli.ok("wait", "-q", job_id)
    yield cli
    cli.run("stop")
    cli.end_leftover_jobs()
    shutil.rmtree(root, ignore_errors=True)


def test_a_second_user_can_neither_read_the_state_nor_submit_jobs(open_server, second_user):
    cli = open_server
    before = cli.status()
    for path in (cli.data_dir / "state.db", cli.log_dir / "job_1.txt",
                 cli.log_dir / "server.log"):
        result = as_user(second_user, "cat", str(path))
        assert result.returncode != 0 and "Permission denied" in result.stderr, path
    listing = as_user(second_user, "ls", str(cli.data_dir))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr

    env = {"PATH": os.defpath, "HOME": "/tmp", "CLI_PY_DATA_DIR": str(cli.data_dir)}
    python = python_for(second_user)
    for command in (["status", "--json"], ["add_job", "/bin/true"], ["stop"]):
        result = as_user(second_user, python, str(CLI_PY), *command, env=env)
        assert result.returncode != 0, (command, result.stdout)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("Error: ") and "another user" in result.stderr, \
            result.stderr

    # Even with the socket's path in hand, connecting is refused.
    connect = as_user(second_user, python, "-c",
                      "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                      f"s.connect({str(cli.data_dir / 'server.sock')!r})")
    assert connect.returncode != 0 and "PermissionError" in connect.stderr
    assert cli.status()["counts"] == before["counts"]
    assert cli.status()["job_waitlist"] == before["job_waitlist"]
