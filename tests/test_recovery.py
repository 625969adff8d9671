"""Restarts and crashes: running jobs are adopted, finished ones recorded, none run twice."""
import os
import random
import signal
import time

from conftest import wait_until


def jobs_by_id(cli):
    status = cli.status()
    return {job["id"]: job for job in status["running_jobs"] + status["job_waitlist"]}


def test_jobs_finishing_while_the_server_is_stopped_keep_their_exit_codes(server):
    server.ok("add_slave", "--slots", "4", "w1")
    gate = server.root / "gate"
    waiter = server.root / "wait_for_gate.sh"
    # Each job ends only once the test opens the gate, i.e. while the server is down.
    waiter.write_text(f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n"
                      "[ -n \"$SIGNAL_SELF\" ] && kill -$SIGNAL_SELF $$\nexit $CODE\n")
    waiter.chmod(0o755)
    codes = {server.add_job(waiter, env=dict(server.env, CODE=str(code))): code
             for code in (0, 3, 42)}
    by_signal = server.add_job(waiter, env=dict(server.env, CODE="0", SIGNAL_SELF="USR1"))
    server.wait_for_counts(running=4)
    server.ok("stop")
    gate.touch()
    wait_until(lambda: len(list((server.data_dir / "run").glob("*.exit"))) == 4,
               what="the jobs to end while the server is down")
    server.ok("start")
    status = server.status()
    assert status["counts"] == {"waiting": 0, "running": 0, "succeeded": 1, "failed": 3}
    log = (server.log_dir / "server.log").read_text()
    for job_id, code in codes.items():
        assert f"job {job_id}: {'succeeded' if code == 0 else 'failed'} (exit code {code}," \
            in log
    assert f"job {by_signal}: failed (exit code None, signal {int(signal.SIGUSR1)})" in log


def test_jobs_still_running_after_a_restart_are_adopted_and_recorded_when_they_end(server):
    server.ok("add_slave", "--slots", "2", "w1")
    env = dict(server.env, SLEEP="1.5")
    first = server.add_job(server.script, env=env)
    second = server.add_job(server.script, env=dict(env, EXIT_CODE="5"))
    server.wait_for_counts(running=2)
    server.ok("stop")
    server.ok("start")
    running = jobs_by_id(server)
    assert running[first]["state"] == "running" and running[second]["state"] == "running"
    assert server.status()["slaves"][0]["slots_in_use"] == 2   # slots still held
    server.wait_for_counts(succeeded=1, failed=1, running=0)
    assert server.runs() == [first, second]


def test_an_adopted_job_can_still_be_killed(server):
    server.ok("add_slave", "w1")
    server.add_job(server.script, env=dict(server.env, SLEEP="300"))
    server.wait_for_counts(running=1)
    server.ok("stop")
    server.ok("start")
    result = server.run("remove_slave", "--kill", "w1", timeout=60)
    assert result.returncode == 0, result.stderr
    assert server.status()["counts"]["killed"] == 1


def test_kill_9_of_the_server_again_and_again_runs_every_job_exactly_once(server):
    server.ok("add_slave", "--slots", "3", "w1", "w2")
    total = 40
    ids = [server.add_job(server.script, env=dict(server.env, SLEEP=f"{0.05 * (n % 4)}"))
           for n in range(total)]
    rng = random.Random(7)
    for _ in range(5):
        time.sleep(rng.uniform(0.05, 0.4))
        pid = server.server_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z",
                   what="the server to die")
        server.ok("start")
    server.wait_for_counts(succeeded=total, timeout=90)
    runs = server.runs()
    assert sorted(runs) == sorted(ids), "a job ran twice or never"
    records = [server.record(job_id) for job_id in ids]
    assert all(records)
