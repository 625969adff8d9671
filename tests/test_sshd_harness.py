"""The SSH harness itself: real sshd workers reachable by ssh, rsync and fabric."""

import subprocess
import sys


def run(sandbox, *argv):
    return subprocess.run(argv, env=sandbox.env(), capture_output=True, text=True, timeout=30)


def test_ssh_shim_reaches_every_worker(ssh_sandbox, workers):
    for worker in workers:
        result = run(ssh_sandbox, "ssh", worker.alias, "echo", "ok")
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_worker_without_our_key_refuses_auth(ssh_sandbox):
    worker = ssh_sandbox.start_worker("unauthorized", authorized=False)
    try:
        result = run(ssh_sandbox, "ssh", worker.alias, "true")
    finally:
        worker.stop()
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_fabric_reads_sandbox_ssh_config_via_home(ssh_sandbox, workers):
    snippet = "from fabric import Connection; print(Connection('w1').run('echo hi', hide=True).stdout, end='')"
    result = run(ssh_sandbox, sys.executable, "-c", snippet)
    assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr


def test_rsync_round_trip_through_shim(ssh_sandbox, workers, tmp_path):
    # The worker is this machine, so a local directory doubles as the remote path.
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    source = tmp_path / "payload.txt"
    source.write_text("payload\n")
    copied_back = tmp_path / "copied_back.txt"

    upload = run(ssh_sandbox, "rsync", "-e", "ssh", str(source), f"w1:{remote_dir}/")
    assert upload.returncode == 0, upload.stderr
    download = run(ssh_sandbox, "rsync", "-e", "ssh", f"w1:{remote_dir}/payload.txt", str(copied_back))
    assert download.returncode == 0, download.stderr
    assert copied_back.read_text() == "payload\n"


def test_worker_restarts_on_same_port(ssh_sandbox):
    worker = ssh_sandbox.start_worker("restartable")
    first_pid, port = worker.pid, worker.port

    worker.stop()
    down = run(ssh_sandbox, "ssh", worker.alias, "true")
    assert down.returncode == 255
    assert "Connection refused" in down.stderr

    worker.start()
    try:
        up = run(ssh_sandbox, "ssh", worker.alias, "true")
    finally:
        worker.stop()
    assert (worker.port, up.returncode) == (port, 0), up.stderr
    assert worker.pid is None and first_pid is not None
