"""jobs, logs and purge: knowing what happened, kept across restarts."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import CLI, wait_until

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
FIELDS = {"id", "state", "result", "exit_code", "signal", "worker", "slot", "attempt", "script",
          "args", "submitted_at", "started_at", "ended_at", "log"}


def jobs_json(cli, *args):
    import json
    return json.loads(cli.ok("jobs", "--json", *args))


def test_every_job_keeps_its_history_across_a_restart(server):
    server.ok("add_slave", "w1")
    good = server.add_job(server.script, "a b")
    bad = server.add_job(server.script, env=dict(server.env, EXIT_CODE="3"))
    killer = server.write_script("self_kill.sh", "kill -9 $$\n")
    signalled = server.add_job(killer)
    server.wait_for_counts(succeeded=1, failed=2)
    server.ok("pause")
    waiting_later = server.add_job(server.script)
    server.ok("stop")
    server.ok("start")
    jobs = {job["id"]: job for job in jobs_json(server)}
    assert FIELDS <= set(jobs[good])
    assert (jobs[good]["state"], jobs[good]["result"], jobs[good]["exit_code"]) == \
        ("done", "succeeded", 0)
    assert jobs[good]["args"] == ["a b"] and jobs[good]["worker"] == "w1"
    assert jobs[good]["slot"] == 0 and jobs[good]["attempt"] == 1
    assert jobs[good]["log"] == str(server.log_dir / f"job_{good}.txt")
    for key in ("submitted_at", "started_at", "ended_at"):
        assert ISO_UTC.match(jobs[good][key]), jobs[good][key]
    assert (jobs[bad]["result"], jobs[bad]["exit_code"]) == ("failed", 3)
    assert (jobs[signalled]["result"], jobs[signalled]["signal"]) == ("failed", 9)
    assert (jobs[waiting_later]["state"], jobs[waiting_later]["result"]) == ("waiting", None)
    assert jobs[waiting_later]["started_at"] is None
    table = server.ok("jobs")
    assert "SIGKILL" in table and "succeeded" in table
    full = server.ok("jobs", bad)
    assert "exit_code:    3" in full and "result:       failed" in full


def test_filters(server):
    server.ok("add_slave", "w1")
    other = server.write_script("other.sh", "exit 0\n")
    ok = [server.add_job(server.script) for _ in range(3)]
    failed = server.add_job(server.script, env=dict(server.env, EXIT_CODE="1"))
    different = server.add_job(other)
    server.wait_for_counts(succeeded=4, failed=1)
    ids = lambda *args: [job["id"] for job in jobs_json(server, *args)]
    assert ids("--state", "failed") == [failed]
    assert ids("--state", "done") == ok + [failed, different]
    assert ids("--state", "succeeded", "--last", "2") == [ok[2], different]
    assert ids("--script", "other.sh") == [different]
    assert ids("--script", "./other.sh") == [different]
    assert ids("--worker", "w1", "--last", "1") == [different]
    assert ids("--worker", "w2") == []


@pytest.mark.parametrize("arguments, message", [
    (["--state", "sleeping"], "unknown state"),
    (["--last", "0"], "at least 1"),
    (["999"], "unknown job id 999"),
    (["1", "--state", "done"], "not both"),
    (["99999999999999999999"], "ids run from 1 to"),
])
def test_bad_jobs_input(server, arguments, message):
    server.fails("jobs", *arguments, expect=message)


def test_jobs_with_a_range_says_how_to_see_several(server):
    server.fails("jobs", "1-5", expect="jobs --last N")


def test_logs_prints_the_output_and_refuses_what_has_none(server):
    waiting = server.add_job(server.script)
    server.fails("logs", waiting, expect="has not started yet")
    server.fails("logs", 999, expect="unknown job id")
    server.ok("add_slave", "w1")
    server.wait_for_counts(succeeded=1)
    assert server.ok("logs", waiting) == f"job {waiting} ran on w1\n"


def test_logs_follow_streams_until_the_end_and_exits_with_the_jobs_status(server):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    chatty = server.write_script(
        "chatty.sh", f"echo first\nwhile [ ! -e {gate} ]; do sleep 0.05; done\necho second\n"
                     "exit 7\n")
    job_id = server.add_job(chatty)
    follower = subprocess.Popen([sys.executable, str(CLI), "logs", "-f", str(job_id)],
                                cwd=server.root, env=server.env, stdout=subprocess.PIPE,
                                text=True)
    assert follower.stdout.readline() == "first\n"   # live, before the job has ended
    gate.touch()
    assert follower.stdout.read() == "second\n"
    assert follower.wait(10) == 7


def test_logs_follow_of_a_killed_job_exits_like_a_shell_would(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    follower = subprocess.Popen([sys.executable, str(CLI), "logs", "-f", str(job_id)],
                                cwd=server.root, env=server.env, stdout=subprocess.DEVNULL)
    server.ok("kill", job_id)
    assert follower.wait(20) == 128 + 15


def test_purge_removes_old_finished_jobs_and_their_logs_only(server):
    server.ok("add_slave", "--slots", "2", "w1")
    finished = server.add_job(server.script)
    server.wait_for_counts(succeeded=1)
    running = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    server.ok("pause")
    waiting = server.add_job(server.script)
    assert "purged 0" in server.ok("purge", "--older-than", "1h")
    assert "purged 0" in server.ok("purge")          # the default keeps a week
    log = server.log_dir / f"job_{finished}.txt"
    assert log.exists()
    assert "purged 1" in server.ok("purge", "--older-than", "0")
    assert not log.exists()
    assert [job["id"] for job in jobs_json(server)] == [running, waiting]
    server.fails("purge", "--older-than", "a while", expect="not a duration")
    server.fails("purge", "--older-than", "", expect="not a duration")


@pytest.mark.alone("its second job must end and be purged within 1 s")
def test_purge_goes_by_when_a_job_ended(server):
    server.ok("add_slave", "w1")
    old = server.add_job(server.script)
    server.wait_for_counts(succeeded=1)
    time.sleep(1.5)   # let job `old` age past the cut-off below
    new = server.add_job(server.script)
    server.wait_for_counts(succeeded=2)
    assert "purged 1" in server.ok("purge", "--older-than", "1s")
    assert [job["id"] for job in jobs_json(server, "--state", "done")] == [new]
    assert old < new


def test_logs_of_a_job_that_never_ran(server):
    job_id = server.add_job(server.script)
    server.ok("kill", job_id)
    server.fails("logs", job_id, expect="never ran (killed)")


def test_logs_follow_that_loses_its_server_exits_2(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    follower = subprocess.Popen([sys.executable, str(CLI), "logs", "-f", str(job_id)],
                                cwd=server.root, env=server.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    log = server.log_dir / "server.log"
    wait_until(lambda: "a client waits for" in log.read_text(), what="logs -f to subscribe")
    os.kill(server.server_pid(), signal.SIGKILL)
    assert follower.wait(10) == 2
    assert "went away" in follower.stderr.read()
