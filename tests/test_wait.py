"""wait: pushed by the server, a progress line on a terminal, honest exit status."""
import os
import pty
import re
import shlex
import signal
import subprocess
import sys
import time

from conftest import CLI, cpu_seconds, wait_until


def start_wait(cli, *args, **kwargs):
    return subprocess.Popen([sys.executable, str(CLI), "wait", *map(str, args)],
                            cwd=cli.root, env=cli.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def subscribed(cli, count=1):
    log = cli.log_dir / "server.log"
    wait_until(lambda: log.read_text().count("a client waits for") >= count,
               what="wait to subscribe")


def test_wait_for_everything_succeeds_quietly_in_a_pipe(server):
    server.ok("add_slave", "--slots", "2", "w1")
    server.ok("pause")
    for _ in range(4):
        server.add_job(server.script, env=dict(server.env, SLEEP="0.3"))
    waiter = start_wait(server)
    subscribed(server)
    server.ok("resume")
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert out == "all 4 job(s) succeeded\n" and err == ""
    assert server.status()["counts"]["succeeded"] == 4


def test_wait_names_what_did_not_succeed(server):
    server.ok("add_slave", "--slots", "3", "w1")
    ok = server.add_job(server.script)
    bad = server.add_job(server.script, env=dict(server.env, EXIT_CODE="2"))
    doomed = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    waiter = start_wait(server, ok, bad, doomed)
    server.ok("kill", doomed)
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 1
    assert f"job {bad}: failed (exit code 2)" in err
    assert f"job {doomed}: killed" in err
    assert f"2 of 3 job(s) did not succeed: {bad}, {doomed}" in err


def test_wait_takes_ranges_and_refuses_unknown_ids(server):
    server.ok("add_slave", "w1")
    first = server.add_job(server.script)
    second = server.add_job(server.script)
    assert server.ok("wait", f"{first}-{second}") == "all 2 job(s) succeeded\n"
    server.fails("wait", first, 999, expect="unknown job id 999")
    assert "nothing to wait for" in server.ok("wait")


def test_wait_is_told_by_the_server_instead_of_polling(server):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    job_id = server.add_job(server.write_script(
        "gated.sh", f"while [ ! -e {gate} ]; do sleep 0.05; done\n"))
    waiter = start_wait(server, job_id)
    subscribed(server)
    server_pid = server.server_pid()
    client_from, server_from = cpu_seconds(waiter.pid), cpu_seconds(server_pid)
    time.sleep(1.5)
    assert cpu_seconds(waiter.pid) - client_from < 0.05, "wait used CPU while nothing happened"
    assert cpu_seconds(server_pid) - server_from < 0.1, "the server spun while wait waited"
    gate.touch()
    assert waiter.wait(5) == 0


def test_wait_shows_a_progress_line_on_a_terminal(server):
    server.ok("add_slave", "--slots", "2", "w1")
    server.ok("pause")
    for _ in range(4):
        server.add_job(server.script, env=dict(server.env, SLEEP="0.4"))
    controller, terminal = pty.openpty()
    waiter = subprocess.Popen([sys.executable, str(CLI), "wait"], cwd=server.root,
                              env=server.env, stdout=subprocess.PIPE, stderr=terminal,
                              text=True)
    os.close(terminal)
    subscribed(server)
    server.ok("resume")
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert waiter.wait(30) == 0
    assert b"\r" in output and b"done (0 failed)" in output and b"running" in output
    assert waiter.stdout.read() == "all 4 job(s) succeeded\n"


def test_the_progress_line_counts_the_seconds_while_no_job_ends(server, tmux):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    job_id = server.add_job(server.write_script(
        "gated.sh", f"while [ ! -e {gate} ]; do sleep 0.05; done\n"))
    server.wait_for_counts(running=1)
    # The progress line goes to stderr, the pane; the result to a file, which
    # outlasts the pane.
    result, exit_status = server.root / "wait.out", server.root / "wait.status"
    command = (shlex.join([sys.executable, str(CLI), "wait", str(job_id)])
               + f" > {shlex.quote(str(result))}; echo $? > {shlex.quote(str(exit_status))}")
    # The tmux server, started here, gives its panes this environment.
    tmux("new-session", "-d", "-s", "wait", "-x", "120", "-y", "10", "-c", str(server.root),
         command, env=server.env)
    seen = []

    def elapsed_reaches_two_seconds():
        shown = re.search(r"1 running, 0 waiting, (\d+):(\d\d):(\d\d) elapsed",
                          tmux("capture-pane", "-p", "-t", "wait"))
        if shown:
            hours, minutes, seconds = map(int, shown.groups())
            elapsed = hours * 3600 + minutes * 60 + seconds
            if not seen or seen[-1] != elapsed:
                seen.append(elapsed)
        return seen and seen[-1] >= 2
    wait_until(elapsed_reaches_two_seconds, what="the elapsed time to reach 0:00:02")
    assert server.status()["counts"]["running"] == 1, "the job ended: nothing proves a tick"
    assert seen == sorted(seen) and len([second for second in seen if second > 0]) >= 2, seen
    gate.touch()
    wait_until(lambda: exit_status.exists() and exit_status.read_text(), what="wait to exit")
    assert (exit_status.read_text(), result.read_text()) == ("0\n", "the job succeeded\n")


def test_a_job_removed_while_waited_for_ends_the_wait_instead_of_hanging_it(server):
    server.ok("pause")
    keep = server.add_job(server.script)
    drop = server.add_job(server.script)
    waiter = start_wait(server, keep, drop)
    subscribed(server)
    server.ok("remove_job", drop)
    server.ok("kill", keep)
    out, err = waiter.communicate(timeout=10)
    assert waiter.returncode == 1
    assert f"job {drop}: removed" in err and f"job {keep}: killed" in err


def test_load_status_replacing_the_queue_ends_the_wait_for_replaced_jobs(server, tmp_path):
    server.ok("pause")
    job_id = server.add_job(server.script)
    waiter = start_wait(server, job_id)
    subscribed(server)
    document = tmp_path / "empty.json"
    document.write_text('{"slaves": [], "job_waitlist": []}')
    server.ok("load_status", document)
    out, err = waiter.communicate(timeout=10)
    assert waiter.returncode == 1 and f"job {job_id}: removed" in err


def test_a_wait_that_loses_its_server_says_so_instead_of_hanging(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    waiter = start_wait(server, job_id)
    subscribed(server)
    os.kill(server.server_pid(), signal.SIGKILL)
    out, err = waiter.communicate(timeout=10)
    assert waiter.returncode == 2
    assert "went away" in err and "Traceback" not in err


def test_a_wait_interrupted_by_stop_says_so(server):
    server.ok("add_slave", "w1")
    server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    waiter = start_wait(server)
    subscribed(server)
    server.ok("stop")
    out, err = waiter.communicate(timeout=10)
    assert waiter.returncode == 2
    assert "server stopped before this finished" in err
