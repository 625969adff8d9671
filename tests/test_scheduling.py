"""Scheduling policy end to end through real sshd workers: priority and slot identity."""
import json
import time

from conftest import wait_until


def start_order(cli):
    return cli.runs()


def test_priority_orders_the_queue_and_can_be_changed(server):
    server.ok("pause")
    low = server.add_job(server.script)
    high = server.add_job("--priority", "5", server.script)
    low_too = server.add_job(server.script)
    high_too = server.add_job("--priority", "5", server.script)
    lowest = server.add_job("--priority", "-1", server.script)
    assert server.ok("priority", "10", low_too).strip() == f"job {low_too}: priority 10"
    waiting = [job["id"] for job in server.status()["job_waitlist"]]
    expected = [low_too, high, high_too, low, lowest]
    assert waiting == expected, "status lists waiting jobs in the order they will start"
    server.ok("add_slave", "w1")
    server.ok("resume")
    server.ok("wait", "-q")
    assert start_order(server) == expected
    jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    assert [jobs[job_id]["priority"] for job_id in expected] == [10, 5, 5, 0, -1]


def test_priority_refuses_what_it_cannot_change(server):
    server.ok("add_slave", "w1")
    running = server.add_job(server.script, env=dict(server.env, SLEEP="30"))
    server.wait_for_counts(running=1)
    waiting = server.add_job(server.script)
    before = server.status()
    server.fails("priority", "3", running, expect=f"job {running} is running")
    server.fails("priority", "3", waiting, "999", expect="unknown job id 999")
    server.fails("priority", "high", waiting, expect="invalid int value")
    server.fails("priority", str(10 ** 10), waiting, expect="'priority' must be a whole number")
    server.fails("add_job", "--priority", "1.5", server.script, expect="--priority")
    after = server.status()
    assert after["job_waitlist"] == before["job_waitlist"]
    server.ok("kill", running)


def test_each_running_job_has_a_slot_of_its_own(server):
    server.ok("add_slave", "--slots", "3", "w1")
    server.ok("add_slave", "--slots", "2", "w2")
    ids = server.ok("add_job", server.script, ":::", *range(12),
                    env=dict(server.env, SLEEP="0.3")).strip()
    server.ok("wait", "-q", ids)
    records = [server.record(job_id) for job_id in range(1, 13)]
    slots = {"w1": 3, "w2": 2}
    for record in records:
        env = record["env"]
        assert env["JOB_ATTEMPT"] == "1"
        assert env["SLOTS"] == env["SLOT"]
        assert 0 <= int(env["SLOT"]) < slots[record["slave"]]
    for first in records:
        for second in records:
            if first is not second and first["slave"] == second["slave"] and \
                    first["env"]["SLOT"] == second["env"]["SLOT"]:
                assert first["end"] <= second["start"] or second["end"] <= first["start"], \
                    "two jobs held one slot at once"
    wait_until(lambda: server.status()["counts"].get("succeeded") == 12)


# --- retries, timeouts, start times -----------------------------------------

def attempts_of(cli, job_id):
    return json.loads(cli.ok("jobs", job_id, "--json"))["attempts"]


def test_retries_run_a_failed_job_again_until_it_succeeds(server):
    script = server.write_script("flaky.sh", 'echo "attempt $JOB_ATTEMPT" >> "$RESULTS/attempts"\n'
                                             '[ "$JOB_ATTEMPT" -ge 3 ] || exit 3\n')
    server.ok("add_slave", "w1")
    job_id = server.add_job("--retries", "3", script)
    server.ok("wait", "-q", job_id)   # exit 0: it succeeded in the end
    assert (server.results / "attempts").read_text().split("\n")[:-1] == \
        ["attempt 1", "attempt 2", "attempt 3"]
    history = attempts_of(server, job_id)
    assert [(attempt["attempt"], attempt["result"], attempt["exit_code"])
            for attempt in history] == [(1, "failed", 3), (2, "failed", 3), (3, "succeeded", 0)]
    job = json.loads(server.ok("jobs", job_id, "--json"))
    assert (job["result"], job["attempt"]) == ("succeeded", 3)
    shown = server.ok("jobs", job_id)
    assert "1. failed on w1 (exit 3)" in shown and "3. succeeded on w1 (exit 0)" in shown


def test_retries_run_out_and_killed_jobs_are_not_retried(server):
    server.ok("add_slave", "w1")
    failing = server.add_job("--retries", "2", server.script, env=dict(server.env, EXIT_CODE="4"))
    server.fails("wait", "-q", failing)
    assert [attempt["result"] for attempt in attempts_of(server, failing)] == ["failed"] * 3
    assert server.runs() == [failing] * 3
    killed = server.add_job("--retries", "5", server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    server.ok("kill", killed)
    assert [attempt["result"] for attempt in attempts_of(server, killed)] == ["killed"]
    assert server.status()["counts"]["running"] == 0


def test_a_retry_waits_its_delay_and_prefers_another_worker(server):
    server.ok("add_slave", "w1", "w2")
    job_id = server.add_job("--retries", "1", "--retry-delay", "2s", server.script,
                            env=dict(server.env, EXIT_CODE="1"))
    server.fails("wait", "-q", job_id)
    first, second = attempts_of(server, job_id)
    assert first["worker"] != second["worker"], "the retry went back to the worker it failed on"
    gap = cli_time(second["started_at"]) - cli_time(first["ended_at"])
    assert gap >= 2.0, f"retried after {gap:.2f}s, before its --retry-delay"


def cli_time(iso):
    from datetime import datetime
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_timeout_kills_the_job_and_counts_as_a_failure_to_retry(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job("--timeout", "1s", "--retries", "1", server.script,
                            env=dict(server.env, SLEEP="60"))
    server.fails("wait", "-q", job_id, expect=f"job {job_id}: timed_out")
    history = attempts_of(server, job_id)
    assert [attempt["result"] for attempt in history] == ["timed_out", "timed_out"]
    assert all(attempt["signal"] == 15 for attempt in history)
    assert "timed out after 1s" in history[0]["reason"]
    for attempt in history:
        assert 0.9 < cli_time(attempt["ended_at"]) - cli_time(attempt["started_at"]) < 6


def test_a_timeout_counts_from_the_start_across_a_restart(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job("--timeout", "4s", server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    server.ok("stop")
    server.ok("start")
    server.wait_for_counts(timed_out=1, timeout=15)
    job = json.loads(server.ok("jobs", job_id, "--json"))
    assert cli_time(job["ended_at"]) - cli_time(job["started_at"]) < 8


def test_delay_and_at_hold_a_job_until_its_time_even_across_a_restart(server):
    from datetime import datetime, timedelta, timezone
    server.ok("add_slave", "--slots", "2", "w1")
    delayed = server.add_job("--delay", "3s", server.script)
    at = (datetime.now(timezone.utc) + timedelta(seconds=3)).isoformat()
    timed = server.add_job("--at", at, server.script)
    submitted = time.time()
    server.ok("stop")
    server.ok("start")
    assert server.status()["counts"]["waiting"] == 2
    server.ok("wait", "-q", delayed, timed)
    for job_id in (delayed, timed):
        assert server.record(job_id)["start"] >= submitted + 2.5


def test_bad_policy_options_are_refused_and_change_nothing(server):
    server.ok("add_slave", "w1")
    server.ok("pause")
    server.add_job(server.script)
    before = server.status()
    for args, expect in [
            (["--retries", "-1"], "--retries"), (["--retries", "many"], "--retries"),
            (["--timeout", "0"], "--timeout must be longer than 0"),
            (["--timeout", "soon"], "is not a duration"),
            (["--delay", "-5m"], "--delay"), (["--delay=-5m"], "is not a duration"),
            (["--at", "tomorrow"], "--at 'tomorrow' is not a time"),
            (["--at", "12:00", "--delay", "1m"], "choose one"),
            (["--retry-delay", "5s"], "needs --retries"),
            (["--retry-delay", "x", "--retries", "1"], "is not a duration")]:
        server.fails("add_job", *args, server.script, expect=expect)
    assert server.status()["job_waitlist"] == before["job_waitlist"]
