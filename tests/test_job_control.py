"""kill, pause and resume, edit_slave: stopping and steering a live queue."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import CLI, process_alive, wait_until


def counts(cli):
    return cli.status()["counts"]


def test_kill_ends_a_running_job_group_after_the_grace_and_returns_when_done(server):
    server.ok("add_slave", "w1")
    marker = server.root / "child.pid"
    stubborn = server.write_script("stubborn.sh",
                                   f"trap '' TERM\nsleep 300 &\necho $! > {marker}\nsleep 300\n")
    job_id = server.add_job(stubborn)
    wait_until(marker.exists, what="the job to start")
    out = server.ok("kill", "--grace", "1s", job_id)
    assert f"killed job {job_id}" in out
    assert counts(server)["killed"] == 1          # already ended when kill returned
    assert not process_alive(int(marker.read_text()))


def test_kill_of_waiting_jobs_ends_them_without_running(server):
    ids = [server.add_job(server.script) for _ in range(3)]
    assert "killed jobs" in server.ok("kill", f"{ids[0]}-{ids[1]}")
    server.ok("add_slave", "w1")
    server.wait_for_counts(succeeded=1, killed=2)
    assert server.runs() == [ids[2]]


@pytest.mark.parametrize("arguments, message", [
    (["999"], "unknown job id 999"),
    (["1", "999"], "unknown job id 999"),
    (["abc"], "not a job id"),
    (["5-3"], "runs backwards"),
    (["--grace", "soon", "1"], "not a duration"),
    (["--grace", "40000w", "1"], "too long"),
    (["1-2000000000"], "more than 1000000 job ids"),
    (["99999999999999999999"], "job ids run from 1 to"),
])
def test_bad_kill_input_changes_nothing(server, arguments, message):
    server.add_job(server.script)
    server.fails("kill", *arguments, expect=message)
    assert counts(server)["waiting"] == 1


def test_kill_of_a_finished_job_is_refused_but_a_range_kills_what_is_left(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job(server.script)
    server.wait_for_counts(succeeded=1)
    server.fails("kill", job_id, expect="already ended")
    server.ok("pause")
    later = server.add_job(server.script)
    out = server.ok("kill", f"{job_id}-{later}")
    assert f"killed job {later} (1 had already ended)" in out


def test_a_second_kill_can_shorten_the_grace(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job(server.write_script("stubborn.sh", "trap '' TERM\nsleep 300\n"))
    server.wait_for_counts(running=1)
    patient = subprocess.Popen([sys.executable, str(CLI), "kill", "--grace", "1h", str(job_id)],
                               cwd=server.root, env=server.env, stdout=subprocess.PIPE,
                               text=True)
    wait_until(lambda: "killing" in (server.log_dir / "server.log").read_text(),
               what="the first kill")
    server.ok("kill", "--grace", "0", job_id, timeout=20)
    assert patient.wait(10) == 0
    assert counts(server)["killed"] == 1


def test_kill_stops_the_work_on_the_worker_too(server):
    server.ok("add_slave", "w1")
    remote = server.write_script(
        "remote.sh", 'ssh -t -t "$SLAVE_IP" "sleep 303.5" </dev/null &\nwait\n',
        shell="/bin/bash")
    server.add_job(remote)
    remote_sleep = lambda: subprocess.run(["pgrep", "-f", "^sleep 303.5"],
                                          capture_output=True).returncode == 0
    wait_until(remote_sleep, what="the remote work to start")
    server.ok("kill", "1")
    wait_until(lambda: not remote_sleep(), what="the remote work to stop")


def test_pause_edit_and_kill_survive_a_kill_9_of_the_server(server):
    server.ok("add_slave", "w1", "w2")
    server.ok("pause")
    server.ok("pause", "w2")
    server.ok("edit_slave", "w1", "--slots", "3", "-e", "X=1")
    killed = server.add_job(server.script)
    server.ok("kill", killed)
    waiting = server.add_job(server.script)
    os.kill(server.server_pid(), signal.SIGKILL)
    wait_until(lambda: server.run("status").returncode != 0, what="the server to die")
    server.ok("start")
    status = server.status()
    assert status["paused"] is True
    slaves = {slave["ip"]: slave for slave in status["slaves"]}
    assert slaves["w2"]["status"] == "paused"
    assert (slaves["w1"]["slots"], slaves["w1"]["envs"]) == (3, {"X": "1"})
    assert [job["id"] for job in status["job_waitlist"]] == [waiting]
    assert status["counts"]["killed"] == 1


def test_a_paused_queue_starts_nothing_and_stays_paused_across_a_restart(server):
    server.ok("add_slave", "w1")
    assert "queue paused" in server.ok("pause")
    job_id = server.add_job(server.script)
    assert server.status()["paused"] is True
    assert "QUEUE PAUSED" in server.ok("status")
    server.ok("stop")
    server.ok("start")
    assert server.status()["paused"] is True
    assert counts(server)["waiting"] == 1 and server.runs() == []
    server.ok("resume")
    server.wait_for_counts(succeeded=1)
    assert server.runs() == [job_id]


def test_resume_says_when_nothing_was_paused(server):
    assert "was not paused" in server.ok("resume")
    server.ok("pause")
    assert "already paused" in server.ok("pause")
    assert server.ok("resume") == "queue resumed\n"


@pytest.mark.alone("its 1 s job must still run when the test looks")
def test_pausing_the_queue_lets_running_jobs_finish(server):
    server.ok("add_slave", "w1")
    server.add_job(server.script, env=dict(server.env, SLEEP="1"))
    server.wait_for_counts(running=1)
    server.ok("pause")
    server.add_job(server.script)
    server.wait_for_counts(succeeded=1, waiting=1)


@pytest.mark.alone("its 1 s job must still run when the test looks")
def test_a_paused_worker_drains_without_being_removed(server):
    server.ok("add_slave", "w1", "w2")
    running = server.add_job(server.script, env=dict(server.env, SLEEP="1"))
    server.wait_for_counts(running=1)
    busy = server.status()["running_jobs"][0]["worker"]
    other = "w2" if busy == "w1" else "w1"
    server.ok("pause", busy)
    server.ok("pause", other)
    server.ok("resume", other)
    ids = [server.add_job(server.script) for _ in range(3)]
    server.wait_for_counts(succeeded=4)
    workers = {server.record(job_id)["slave"] for job_id in ids}
    assert workers == {other}
    assert server.record(running)["slave"] == busy
    slaves = {slave["ip"]: slave["status"] for slave in server.status()["slaves"]}
    assert slaves == {busy: "paused", other: "idle"}
    server.ok("stop")
    server.ok("start")
    slaves = {slave["ip"]: slave["status"] for slave in server.status()["slaves"]}
    assert slaves[busy] == "paused"


def test_pause_of_an_unknown_worker_is_refused(server):
    server.ok("add_slave", "w1")
    server.fails("pause", "nope", expect="unknown worker")
    server.fails("pause", "w1", "w1", expect="named twice")
    assert server.status()["slaves"][0]["status"] == "idle"


@pytest.mark.alone("its first 2 s job must still run when the second starts")
def test_edit_slave_changes_slots_and_variables_for_new_jobs(server):
    server.ok("add_slave", "-e", "KEEP=1", "-e", "DROP=2", "w1")
    env = dict(server.env, SLEEP="2")   # long enough to see both run on a slow machine
    first = [server.add_job(server.script, env=env) for _ in range(2)]
    server.wait_for_counts(running=1, waiting=1)
    out = server.ok("edit_slave", "w1", "--slots", "3", "-e", "NEW=x=y", "--unset", "DROP")
    assert "3 slot(s)" in out
    server.wait_for_counts(running=2)             # the waiting one starts at once
    later = server.add_job(server.script)
    server.wait_for_counts(succeeded=3, timeout=30)
    env_of_later = server.record(later)["env"]
    assert env_of_later["NEW"] == "x=y" and env_of_later["KEEP"] == "1"
    assert "DROP" not in env_of_later
    second = server.record(first[1])
    assert second["start"] < server.record(first[0])["end"], "the third slot was not used"


@pytest.mark.alone("its 1.5 s jobs must still run when the test looks")
def test_fewer_slots_than_in_use_lets_jobs_finish_and_starts_nothing_until_it_fits(server):
    server.ok("add_slave", "--slots", "3", "w1")
    env = dict(server.env, SLEEP="1.5")
    for _ in range(3):
        server.add_job(server.script, env=env)
    server.wait_for_counts(running=3)
    server.ok("edit_slave", "w1", "--slots", "1")
    ids = [server.add_job(server.script, env=dict(server.env, SLEEP="0.3")) for _ in range(2)]
    server.wait_for_counts(succeeded=5, timeout=30)
    old_ends = [server.record(job_id)["end"] for job_id in range(1, 4)]
    first, second = (server.record(job_id) for job_id in ids)
    assert first["start"] >= max(old_ends), "a job started before the worker fitted 1 slot"
    assert second["start"] >= first["end"], "two jobs ran at once on a 1-slot worker"


@pytest.mark.parametrize("arguments, message", [
    (["nope", "--slots", "2"], "unknown worker"),
    (["w1"], "nothing to change"),
    (["w1", "--slots", "0"], "at least 1"),
    (["w1", "-e", "JOB_ID=1"], "cannot be overridden"),
    (["w1", "--unset", "MISSING"], "no variable MISSING"),
    (["w1", "-e", "A=2", "--unset", "A"], "both set"),
    (["w1", "-e", "BAD"], "has no '='"),
])
def test_bad_edit_slave_input_changes_nothing(server, arguments, message):
    server.ok("add_slave", "--slots", "2", "-e", "A=1", "w1")
    # The first health check of a new worker would change its checked_at.
    before = wait_until(lambda: [slave for slave in server.status()["slaves"]
                                 if slave["checked_at"]], what="the first health check")
    server.fails("edit_slave", *arguments, expect=message)
    assert server.status()["slaves"] == before
