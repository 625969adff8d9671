"""add_slave and remove_slave through real sshd workers."""
import json
import shlex
import sys

import pytest

from conftest import CLI, process_alive, wait_until


def slaves(cli):
    return {slave["ip"]: slave for slave in cli.status()["slaves"]}


def test_add_slave_checks_ssh_and_registers_with_slots_and_variables(server):
    out = server.ok("add_slave", "--slots", "3", "-e", "SCRATCH=/tmp/x=y", "w1", "w2")
    assert "added w1 (3 slots)" in out
    registered = slaves(server)
    assert registered["w1"]["slots"] == 3
    assert registered["w1"]["envs"] == {"SCRATCH": "/tmp/x=y"}
    assert registered["w1"]["status"] == "idle" and registered["w1"]["running_job"] is None
    assert registered["w1"]["ssh_checked"] is True


@pytest.fixture
def bad_hosts(ssh_sandbox):
    """ssh aliases that fail the check, each for a different real reason."""
    ssh_sandbox.add_alias("refused", "127.0.0.1", ssh_sandbox.refusing_port())
    ssh_sandbox.add_alias("nowhere", "no-such-host.invalid", 22)
    ssh_sandbox.add_alias("silent", "127.0.0.1", ssh_sandbox.silent_listener())
    if not hasattr(ssh_sandbox, "closing"):
        ssh_sandbox.closing = ssh_sandbox.closing_listener()
        ssh_sandbox.add_alias("closing", "127.0.0.1", ssh_sandbox.closing)
    if not hasattr(ssh_sandbox, "locked"):
        ssh_sandbox.locked = ssh_sandbox.start_worker("locked", authorized=False)
    return {"refused": "connection refused", "nowhere": "unknown host",
            "silent": "timed out", "locked": "authentication refused",
            "closing": "closed before the SSH server greeted"}


def test_failing_hosts_are_reported_with_their_reason_and_the_rest_added(server, bad_hosts):
    result = server.run("add_slave", "--timeout", "2", "w1", *bad_hosts)
    assert result.returncode != 0
    for host, reason in bad_hosts.items():
        lines = [line for line in result.stderr.splitlines() if line.startswith(f"{host}:")]
        assert lines and reason in lines[0], (host, result.stderr)
    # One line per failed host, then the summary: nothing else leaks out.
    assert len(result.stderr.strip().splitlines()) == len(bad_hosts) + 1, result.stderr
    assert list(slaves(server)) == ["w1"]


def test_skip_ssh_auth_check_adds_an_unreachable_host(server, bad_hosts):
    server.ok("add_slave", "--skip_ssh_auth_check", "refused")
    assert slaves(server)["refused"]["ssh_checked"] is False


def test_status_fits_a_long_down_reason_in_80_columns_and_json_keeps_it_whole(server,
                                                                              bad_hosts):
    # A worker added with the SSH check (only those are checked again) that now
    # refuses the login, with the longest reason there is.
    document = server.root / "workers.json"
    document.write_text(json.dumps({"slaves": [{"ip": "locked", "ssh_checked": True}],
                                    "job_waitlist": []}))
    server.ok("load_status", document)
    wait_until(lambda: slaves(server)["locked"]["health"] == "down", what="locked marked down")
    reason = slaves(server)["locked"]["check_reason"]
    assert reason.startswith(bad_hosts["locked"]) and reason.endswith("ssh-copy-id locked)")
    workers = server.ok("status").split("\n\n")[1]   # between the header and the job counts
    assert workers.startswith("Workers (1)") and "down, " in workers, workers
    assert max(len(line) for line in workers.splitlines()) <= 80, workers
    assert workers.rstrip().endswith(" ago: authenti...  -"), workers


@pytest.mark.parametrize("arguments, message", [
    (["--", "-bad"], "cannot start with '-'"),
    ([""], "empty worker name"),
    (["two words"], "invalid worker name"),
    (["tab\there"], "invalid worker name"),
    (["bell\x07"], "invalid worker name"),
    (["-e", "NOEQUALS", "w1"], "has no '='"),
    (["-e", "1BAD=x", "w1"], "invalid variable name"),
    (["-e", "JOB_ID=3", "w1"], "cannot be overridden"),
    (["-e", "SLAVE_IP=x", "w1"], "cannot be overridden"),
    (["--slots", "0", "w1"], "at least 1"),
    (["w1", "w1"], "named twice"),
])
def test_bad_add_slave_input_changes_nothing(server, arguments, message):
    before = server.status()
    server.fails("add_slave", "--skip_ssh_auth_check", *arguments, expect=message)
    assert server.status()["slaves"] == before["slaves"]


def test_duplicate_worker_is_refused(server):
    server.ok("add_slave", "w1")
    server.fails("add_slave", "w2", "w1", expect="already registered")
    assert list(slaves(server)) == ["w1"]


def test_remove_idle_worker_and_unknown_worker(server):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1", "w2")
    server.fails("remove_slave", "w1", "nope", expect="unknown worker")
    assert set(slaves(server)) == {"w1", "w2"}
    assert "removed w1" in server.ok("remove_slave", "w1")
    assert list(slaves(server)) == ["w2"]
    server.fails("remove_slave", "--wait", "--kill", "w2", expect="exclude each other")
    server.fails("remove_slave", "w2", "w2", expect="named twice")
    assert list(slaves(server)) == ["w2"]


def test_busy_worker_needs_wait_or_kill(server):
    server.ok("add_slave", "w1")
    job = server.add_job(server.script, env=dict(server.env, SLEEP="30"))
    server.wait_for_counts(running=1)
    error = server.fails("remove_slave", "w1")
    assert "--wait" in error and "--kill" in error and str(job) in error
    assert slaves(server)["w1"]["status"] == "busy"


def test_remove_slave_wait_drains_then_removes(server):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    server.add_job(server.write_script(
        "gated.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'))
    server.wait_for_counts(running=1)
    later = server.add_job(server.script)
    out = server.ok("remove_slave", "--wait", "w1")
    assert "when its jobs end" in out
    assert slaves(server)["w1"]["status"] == "draining"
    gate.touch()
    wait_until(lambda: "w1" not in slaves(server), what="w1 to be removed")
    assert server.runs() == []                  # the drained worker took no new job
    status = server.status()
    assert [job["id"] for job in status["job_waitlist"]] == [later]
    assert status["counts"]["succeeded"] == 1


def test_remove_slave_kill_ends_the_whole_process_group(server):
    server.ok("add_slave", "--slots", "2", "w1")
    marker = server.root / "child.pid"
    stubborn = server.write_script("stubborn.sh",
                                   f"trap '' TERM\nsleep 300 &\necho $! > {marker}\nsleep 300\n")
    stubborn_id = server.add_job(stubborn)
    polite_id = server.add_job(server.script, env=dict(server.env, SLEEP="300"))
    server.wait_for_counts(running=2)
    wait_until(marker.exists, what="the background child")
    child = int(marker.read_text())
    result = server.run("remove_slave", "--kill", "w1", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "removed w1" in result.stdout
    assert "w1" not in slaves(server)
    status = server.status()
    assert status["counts"]["killed"] == 2
    assert not process_alive(child), "a child that ignores SIGTERM survived --kill"
    assert polite_id and stubborn_id


def test_the_check_of_many_hosts_shows_its_progress_on_a_terminal(server, bad_hosts, tmux):
    result = server.root / "add_slave.out"
    command = (shlex.join([sys.executable, str(CLI), "add_slave", "--timeout", "5", "w1",
                           "w2", "refused", "silent"]) + f" > {shlex.quote(str(result))}")
    tmux("new-session", "-d", "-s", "add", "-x", "120", "-y", "10", "-c", str(server.root),
         command + "; sleep 30", env=server.env)
    # w1, w2 and refused answer at once; silent keeps the line at 3 of 4 for 5 s.
    wait_until(lambda: "checked 3/4 host(s), 1 failed" in tmux("capture-pane", "-p",
                                                               "-t", "add"),
               what="the progress line")
    wait_until(lambda: "2 of 4 worker(s) not added" in tmux("capture-pane", "-p", "-t", "add"),
               what="add_slave to end")
    pane = tmux("capture-pane", "-p", "-t", "add")
    assert "checked" not in pane, pane   # the line is cleared before the reasons
    assert result.read_text().splitlines() == ["added w1 (1 slot)", "added w2 (1 slot)"]
