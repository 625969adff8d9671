"""start and stop: readiness, one server per data dir, stale leftovers, paths, permissions."""
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys

import pytest

import cli as cli_module

from conftest import CLI, cpu_seconds, wait_until


def test_start_returns_when_ready_and_stop_ends_the_server(cli):
    out = cli.ok("start")
    assert "server started" in out
    pid = cli.server_pid()
    # No sleep between start and the next command.
    assert cli.status()["server"]["pid"] == pid
    assert "server stopped" in cli.ok("stop")
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the server to exit")
    cli.fails("status", expect=f"no server running for {cli.data_dir}; start it with ./cli.py start")


def test_second_start_names_the_running_server(server):
    error = server.fails("start", expect="already running")
    assert str(server.server_pid()) in error


def test_killed_server_leaves_nothing_that_blocks_a_new_start(server):
    pid = server.server_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the server to die")
    assert (server.data_dir / "server.sock").exists()   # stale socket left behind
    server.fails("status", expect="no server running")
    server.ok("start")
    assert server.status()["server"]["pid"] != pid


def test_two_racing_starts_give_exactly_one_server(cli):
    starts = [subprocess.Popen([sys.executable, str(CLI), "start"], cwd=cli.root, env=cli.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    results = [(start.wait(30), start.stderr.read()) for start in starts]
    assert sorted(code for code, _ in results) == [0, 1, 1], results
    assert all("already running" in error for code, error in results if code)


def test_relative_dirs_resolve_against_the_callers_directory(cli):
    elsewhere = cli.root / "project"
    elsewhere.mkdir()
    cli.ok("start", "mydata", "mylogs", cwd=elsewhere)
    status = cli.run("status", "--json", "--server_data_dir", "project/mydata")
    assert status.returncode == 0, status.stderr
    assert (elsewhere / "mydata" / "state.db").exists()
    assert (elsewhere / "mylogs" / "server.log").exists()
    cli.ok("--server_data_dir", "mydata", "stop", cwd=elsewhere)   # option before the action


def test_log_dir_flag_puts_job_logs_and_the_server_log_there(cli):
    cli.ok("start", "--log_dir", "elsewhere/logs")
    cli.ok("add_slave", "w1")
    job_id = cli.add_job(cli.script)
    cli.wait_for_counts(succeeded=1)
    logs = cli.root / "elsewhere" / "logs"
    assert "ran on w1" in (logs / f"job_{job_id}.txt").read_text()
    assert (logs / "server.log").exists()
    assert cli.status()["running_jobs"] == [] and str(logs) in cli.ok("status")


@pytest.mark.parametrize("command", ["", *cli_module.COMMANDS])
def test_every_command_has_help_ending_with_examples(cli, command):
    out = cli.ok(*([command] if command else []), "--help")
    assert "usage: cli.py" in out
    assert "examples:" in out.split("options:")[-1], out


def test_data_dir_defaults_to_dot_data_unless_the_environment_variable_says(cli):
    plain = {name: value for name, value in cli.env.items() if name != "CLI_PY_DATA_DIR"}
    cli.ok("start", env=plain)
    assert (cli.root / ".data" / "state.db").exists()
    other = dict(plain, CLI_PY_DATA_DIR=str(cli.root / "from-env"))
    cli.fails("status", env=other, expect="no server running")
    cli.ok("start", env=other)
    assert (cli.root / "from-env" / "state.db").exists()
    cli.ok("stop", env=other)
    cli.ok("stop", env=plain)


def test_everything_is_owner_only_whatever_the_umask(cli):
    old = os.umask(0)
    try:
        cli.ok("start")
    finally:
        os.umask(old)
    server_pid = cli.server_pid()
    assert server_pid
    job = cli.add_job(cli.script)   # no worker: stays waiting, but its log dir exists
    assert job == 1
    for path in (cli.data_dir, cli.log_dir, cli.data_dir / "run"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (cli.data_dir / "state.db", cli.data_dir / "server.sock",
                 cli.log_dir / "server.log"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_deep_data_dir_still_gets_a_socket(cli):
    deep = cli.root / ("d" * 60) / ("e" * 60)
    cli.ok("start", "--server_data_dir", deep)
    assert cli.run("status", "--server_data_dir", deep).returncode == 0
    cli.ok("stop", "--server_data_dir", deep)


def test_unusable_dirs_are_one_line_errors(cli):
    afile = cli.root / "a-file"
    afile.write_text("")
    cli.fails("start", "--server_data_dir", afile / "data", expect="Not a directory")
    cli.fails("start", "--log_dir", afile / "logs", expect="cannot start the server")
    cli.fails("start", "one", "--server_data_dir", "two", expect="two different data dirs")


def test_corrupt_database_is_refused_and_kept(cli):
    cli.data_dir.mkdir(mode=0o700)
    database = cli.data_dir / "state.db"
    database.write_bytes(b"this is not an sqlite database" * 100)
    before = database.read_bytes()
    cli.fails("start", expect="corrupt")
    assert database.read_bytes() == before


def test_a_truncated_database_is_refused(cli):
    cli.ok("start")
    cli.add_job(cli.script)
    cli.ok("stop")
    database = cli.data_dir / "state.db"
    connection = sqlite3.connect(database)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    size = database.stat().st_size
    with open(database, "r+b") as handle:
        handle.truncate(size // 2)
    cli.fails("start", expect="refusing to start")
    assert database.stat().st_size == size // 2


def foreground_server(cli):
    server = subprocess.Popen([sys.executable, str(CLI), "start", "--foreground"], cwd=cli.root,
                              env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_until(lambda: cli.run("status").returncode == 0, what="the foreground server")
    return server


def test_foreground_server_logs_to_stderr_and_stops_on_sigterm(cli):
    server = foreground_server(cli)
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert "listening on" in server.stderr.read()
    cli.fails("status", expect="no server running")


def test_stop_ends_a_foreground_server_cleanly_and_answers_every_stop(cli):
    """A clean exit matters under systemd's Restart=on-failure."""
    server = foreground_server(cli)
    stops = [subprocess.Popen([sys.executable, str(CLI), "stop"], cwd=cli.root, env=cli.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert server.wait(10) == 0
    assert "Traceback" not in server.stderr.read()
    outcomes = [(stop.wait(10), stop.stdout.read() + stop.stderr.read()) for stop in stops]
    assert all(code == 0 and "server stopped" in output or "no server running" in output
               for code, output in outcomes), outcomes


def test_an_existing_log_dir_keeps_its_mode(cli):
    cli.log_dir.mkdir(mode=0o755)
    os.chmod(cli.log_dir, 0o755)
    cli.ok("start")
    assert stat.S_IMODE(cli.log_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((cli.log_dir / "server.log").stat().st_mode) == 0o600


def test_garbage_on_the_socket_gets_an_error_and_the_server_keeps_serving(server):
    path = str(server.data_dir / "server.sock")
    for garbage in (b"not json\n", b"[1, 2]\n", b'{"command": "nope"}\n',
                    b'{"command": "add_job", "params": {"script": 5}}\n',
                b'{"command": "retry", "params": {}}\n',
                b'{"command": "kill", "params": {"ids": ["7.x"]}}\n',
                b'{"command": "wait", "params": {"ids": ["99999999999999999999.1"]}}\n'):
        with socket.socket(socket.AF_UNIX) as connection:
            connection.connect(path)
            connection.sendall(garbage)
            reply = connection.makefile().readline()
            assert '"ok": false' in reply and "internal error" not in reply, (garbage, reply)
    with socket.socket(socket.AF_UNIX) as connection:   # half a request, then gone
        connection.connect(path)
        connection.sendall(b'{"command": "sta')
    with socket.socket(socket.AF_UNIX) as connection:   # nesting deep enough to overflow json
        connection.connect(path)
        connection.sendall(b"[" * 200000 + b"\n")
        assert b"malformed request" in connection.makefile("rb").readline()
    server.ok("status")


def test_an_oversized_request_is_refused_with_a_reason(server, tmp_path):
    huge = tmp_path / "huge.json"
    huge.write_text('{"slaves": [], "job_waitlist": [], "padding": "' + "x" * (70 << 20) + '"}')
    server.fails("load_status", huge, expect="request larger than")
    server.ok("status")


def test_a_client_leaving_while_its_reply_is_pending_costs_no_cpu(server):
    server.ok("add_slave", "w1")
    stubborn = server.write_script("stubborn.sh", "trap '' TERM\nsleep 300\n")
    server.add_job(stubborn)
    server.wait_for_counts(running=1)
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(server.data_dir / "server.sock"))
        connection.sendall(b'{"command": "remove_slave", "params": {"hosts": ["w1"], '
                           b'"mode": "kill", "grace": 3}}\n')
    pid = server.server_pid()
    before = cpu_seconds(pid)
    server.wait_for_counts(killed=1, timeout=20)
    assert cpu_seconds(pid) - before < 1.0, "the server spun while the kill was pending"


def test_running_out_of_descriptors_pauses_accepting_instead_of_crashing(cli):
    limited = subprocess.run(["bash", "-c", f"ulimit -n 64 && exec {sys.executable} {CLI} start"],
                             cwd=cli.root, env=cli.env, capture_output=True, text=True)
    assert limited.returncode == 0, limited.stderr
    path = str(cli.data_dir / "server.sock")
    idle = []
    for _ in range(100):
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(path)   # queued by the kernel even while the server cannot accept
        idle.append(connection)
    log = cli.log_dir / "server.log"
    wait_until(lambda: "cannot accept a client" in log.read_text(), what="the server to run out")
    for connection in idle:
        connection.close()
    wait_until(lambda: cli.run("status").returncode == 0, what="the server to serve again")
