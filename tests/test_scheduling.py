"""Scheduling policy end to end through real sshd workers: priority and slot identity."""
import json
import re
import time

import pytest

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
    assert [(attempt["attempt"], attempt["result"], attempt["exit_code"], attempt["reason"])
            for attempt in history] == [(1, "failed", 3, None), (2, "failed", 3, None),
                                        (3, "succeeded", 0, None)]
    job = json.loads(server.ok("jobs", job_id, "--json"))
    assert (job["result"], job["attempt"]) == ("succeeded", 3)
    shown = server.ok("jobs", job_id)
    assert "1. failed on w1 (exit 3)" in shown and "3. succeeded on w1 (exit 0)" in shown


def test_each_retry_is_marked_in_the_log_it_shares_with_the_earlier_attempts(server):
    # No newline after the output: a marker still starts a line of its own.
    script = server.write_script("flaky.sh", 'printf "output of attempt %s" "$JOB_ATTEMPT"\n'
                                             '[ "$JOB_ATTEMPT" -ge 3 ] || exit 3\n')
    server.ok("add_slave", "w1")
    job_id = server.add_job("--retries", "2", script)
    server.ok("wait", "-q", job_id)
    lines = server.ok("logs", job_id).split("\n")
    assert len(lines) == 5, lines
    assert lines[0::2] == ["output of attempt 1", "output of attempt 2", "output of attempt 3"]
    for marker, attempt in zip(lines[1::2], (2, 3)):
        assert re.fullmatch(rf"--- attempt {attempt} on w1 at \d\d:\d\d:\d\d ---", marker), lines


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
    before = time.time()   # (--delay counts from a moment after this one)
    delayed = server.add_job("--delay", "3s", server.script)
    at = datetime.now(timezone.utc) + timedelta(seconds=3)
    timed = server.add_job("--at", at.isoformat(), server.script)
    server.ok("stop")
    server.ok("start")
    # (A lost delay would show as a start right after the restart: see below.)
    server.ok("wait", "-q", delayed, timed)
    assert server.record(delayed)["start"] >= before + 3
    assert server.record(timed)["start"] >= at.timestamp()


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


# --- dependencies -----------------------------------------------------------

def test_after_waits_for_all_and_after_any_for_one(server):
    server.ok("add_slave", "--slots", "4", "w1")
    slow = server.add_job(server.script, env=dict(server.env, SLEEP="1.5"))
    quick = server.add_job(server.script)
    both = server.add_job("--after", f"{slow},{quick}", server.script)
    failing = server.add_job(server.script, env=dict(server.env, EXIT_CODE="1"))
    either = server.add_job("--after-any", f"{failing},{slow}", server.script)
    server.wait_for_counts(succeeded=4, failed=1, timeout=30)
    for dependent in (both, either):
        assert server.record(dependent)["start"] >= server.record(slow)["end"]
    assert server.record(both)["start"] >= server.record(quick)["end"]


def test_a_failed_prerequisite_skips_its_dependents_transitively(server):
    server.ok("add_slave", "w1")
    server.ok("pause")
    failing = server.add_job(server.script, env=dict(server.env, EXIT_CODE="2"))
    child = server.add_job("--after", failing, server.script)
    grandchild = server.add_job("--after-any", child, server.script)
    waiting = [job["id"] for job in server.status()["job_waitlist"]]
    assert waiting == [failing, child, grandchild]
    assert server.status()["job_waitlist"][1]["after"] == [failing]
    server.ok("resume")
    stderr = server.fails("wait", "-q", failing, child, grandchild)
    assert f"job {child}: skipped" in stderr
    jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    assert jobs[child]["result"] == jobs[grandchild]["result"] == "skipped"
    assert f"job {failing}, which it runs --after, ended failed" in jobs[child]["reason"]
    assert server.runs() == [failing]


def test_a_retried_prerequisite_is_not_failed_until_its_retries_run_out(server):
    server.ok("add_slave", "w1")
    flaky = server.write_script("flaky.sh", '[ "$JOB_ATTEMPT" -ge 2 ] || exit 1\n')
    first = server.add_job("--retries", "1", flaky)
    dependent = server.add_job("--after", first, server.script)
    server.ok("wait", "-q", first, dependent)
    assert server.runs() == [dependent]


def test_killing_or_removing_a_prerequisite_skips_its_dependents(server):
    server.ok("pause")
    killed = server.add_job(server.script)
    removed = server.add_job(server.script)
    after_killed = server.add_job("--after", killed, server.script)
    after_removed = server.add_job("--after", removed, server.script)
    server.ok("kill", killed)
    server.ok("remove_job", removed)
    jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    assert jobs[after_killed]["result"] == jobs[after_removed]["result"] == "skipped"
    assert "was killed" in jobs[after_killed]["reason"]
    assert "was removed" in jobs[after_removed]["reason"]


def test_dependencies_on_jobs_that_already_ended(server):
    server.ok("add_slave", "w1")
    good = server.add_job(server.script)
    good_too = server.add_job(server.script)
    bad = server.add_job(server.script, env=dict(server.env, EXIT_CODE="1"))
    server.wait_for_counts(succeeded=2, failed=1)
    runs = server.add_job("--after", good, "--after-any", f"{bad},{good_too}", server.script)
    result = server.run("add_job", "--after", bad, server.script)
    assert result.returncode == 0 and "will not run (skipped)" in result.stderr
    skipped = int(result.stdout)
    server.ok("wait", "-q", runs)
    assert json.loads(server.ok("jobs", skipped, "--json"))["result"] == "skipped"


def test_dependencies_survive_a_restart(server):
    server.ok("add_slave", "--slots", "2", "w1")
    # The first job runs until the test lets it go, so that it outlasts the stop and
    # the start however slow the machine (a 6 s job once ended before the status).
    gate = server.root / "gate"
    gated = server.write_script(
        "gated.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\nexec "{server.script}"\n')
    first = server.add_job(gated)
    second = server.add_job("--after", first, server.script)
    server.wait_for_counts(running=1)
    server.ok("stop")
    server.ok("start")
    assert server.status()["job_waitlist"][0]["after"] == [first]
    gate.touch()
    server.ok("wait", "-q", first, second)
    assert server.record(second)["start"] >= server.record(first)["end"]


def test_bad_dependencies_are_refused(server):
    server.ok("pause")
    existing = server.add_job(server.script)
    before = server.status()
    server.fails("add_job", "--after", "999", server.script, expect="unknown job id 999")
    server.fails("add_job", "--after", str(existing + 1), server.script,
                 expect=f"unknown job id {existing + 1}")   # itself: not queued yet
    server.fails("add_job", "--after", "x", server.script, expect="'x' is not a job id")
    server.fails("add_job", "--after", existing, "--after-any", existing, server.script,
                 expect="in both --after and --after-any")
    assert server.status()["job_waitlist"] == before["job_waitlist"]


def test_load_status_keeps_dependencies_and_refuses_circles(server):
    server.ok("add_slave", "w1")
    server.ok("pause")
    first = server.add_job("--priority", "3", "--retries", "2", server.script)
    second = server.add_job("--after", first, "--timeout", "1h", server.script)
    third = server.add_job("--after-any", f"{first},{second}", server.script)
    document = server.status()
    status_file = server.root / "status.json"
    status_file.write_text(json.dumps(document))
    server.ok("load_status", status_file)
    waitlist = server.status()["job_waitlist"]
    assert [(job["id"], job["after"], job["after_any"]) for job in waitlist] == \
        [(first, [], []), (second, [first], []), (third, [], [first, second])]
    assert (waitlist[0]["priority"], waitlist[0]["retries"], waitlist[1]["timeout"]) == \
        (3, 2, 3600.0)

    circle = json.loads(json.dumps(document))
    circle["job_waitlist"][0]["after"] = [third]
    status_file.write_text(json.dumps(circle))
    server.fails("load_status", status_file, expect="wait on each other in a circle")
    unknown = json.loads(json.dumps(document))
    unknown["job_waitlist"][0]["after"] = [777]
    status_file.write_text(json.dumps(unknown))
    server.fails("load_status", status_file, expect="job 777, which a job waits on")
    assert server.status()["job_waitlist"] == waitlist

    server.ok("resume")
    server.ok("wait", "-q", first, second, third)
    assert server.runs() == [first, second, third]


# --- placement: multi-slot jobs and affinity ----------------------------------

@pytest.mark.alone("its 1 s job must still run when the test looks")
def test_a_multi_slot_job_holds_distinct_slots_and_is_not_starved(server):
    server.ok("add_slave", "--slots", "2", "w1")
    early = server.add_job(server.script, env=dict(server.env, SLEEP="1"))
    server.wait_for_counts(running=1)
    big = server.add_job("--slots", "2", server.script, env=dict(server.env, SLEEP="0.5"))
    small = [server.add_job(server.script, env=dict(server.env, SLEEP="0.5")) for _ in range(3)]
    server.ok("wait", "-q", early, big, *small)
    record = server.record(big)
    assert sorted(record["env"]["SLOTS"].split(",")) == ["0", "1"]
    assert all(server.record(job_id)["start"] >= record["end"] for job_id in small), \
        "small jobs queued after the 2-slot job took the slot it was waiting for"
    assert server.record(big)["start"] >= server.record(early)["end"]


def test_on_prefer_and_exclude_place_jobs(server):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    on = server.add_job("--on", "w2", server.script)
    excluded = server.add_job("--exclude", "w2", server.script)
    preferred = server.add_job("--prefer", "w1", server.script)
    server.ok("wait", "-q", on, excluded, preferred)
    assert [server.record(job_id)["slave"] for job_id in (on, excluded, preferred)] == \
        ["w2", "w1", "w1"]
    job = json.loads(server.ok("jobs", on, "--json"))
    assert (job["on"], job["prefer"], job["exclude"]) == (["w2"], None, None)


def test_placement_mistakes_are_refused(server):
    server.ok("add_slave", "--slots", "4", "w1")
    server.ok("add_slave", "--slots", "2", "w2")
    server.ok("pause")
    before = server.status()
    server.fails("add_job", "--slots", "5", server.script, expect="no worker has 5 slots")
    server.fails("add_job", "--slots", "3", "--on", "w2", server.script,
                 expect="no worker in --on has 3 slots")
    server.fails("add_job", "--slots", "0", server.script, expect="--slots")
    server.fails("add_job", "--on", "nowhere", server.script, expect="unknown worker 'nowhere'")
    server.fails("add_job", "--exclude", "w9", server.script, expect="unknown worker 'w9'")
    server.fails("add_job", "--on", "w1", "--exclude", "w1", server.script,
                 expect="every worker in --on is excluded")
    server.fails("add_job", "--on", "-w1", server.script, expect="--on")
    server.fails("add_job", "--exclude", "w1,w2", server.script,
                 expect="--exclude leaves no worker")
    assert server.status()["job_waitlist"] == before["job_waitlist"]


def test_a_job_whose_workers_are_all_removed_is_skipped(server):
    server.ok("add_slave", "w1", "w2")
    server.ok("pause")
    pinned = server.add_job("--on", "w1,w2", server.script)
    after_it = server.add_job("--after", pinned, server.script)
    server.ok("remove_slave", "w1")
    assert server.status()["counts"].get("skipped", 0) == 0
    server.ok("remove_slave", "w2")
    jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    assert jobs[pinned]["result"] == "skipped"
    assert jobs[pinned]["reason"] == "no allowed worker left (--on)"
    assert jobs[after_it]["result"] == "skipped"


def test_status_says_what_each_waiting_job_waits_for(server):
    server.ok("add_slave", "--slots", "2", "w1")
    server.ok("add_slave", "w2")
    server.ok("pause", "w2")
    blocker = server.add_job(server.script, env=dict(server.env, SLEEP="30"))
    server.wait_for_counts(running=1)
    reasons = {}
    for args in (["--after", blocker], ["--delay", "1h"], ["--slots", "2"], ["--on", "w2"]):
        reasons[server.add_job(*args, server.script)] = args[0]
    waiting = {job["id"]: job["waiting_for"] for job in server.status()["job_waitlist"]}
    by_flag = {flag: waiting[job_id] for job_id, flag in reasons.items()}
    assert by_flag["--after"] == f"after {blocker}"
    assert by_flag["--delay"].startswith("until ")
    assert by_flag["--slots"] == "2 free slots on one worker"
    assert by_flag["--on"] == "every worker on w2 is paused, down or draining"
    table = server.ok("status")
    assert "waiting for" in table and f"after {blocker}" in table
    server.ok("kill", blocker)


# --- worker health checks ---------------------------------------------------------

def slave(cli, name):
    return next(slave for slave in cli.status()["slaves"] if slave["ip"] == name)


def test_a_worker_whose_sshd_stops_is_marked_down_and_comes_back(cli, workers):
    cli.ok("start", "--check-interval", "1s")
    cli.ok("add_slave", "w1", "w2")
    cli.ok("add_slave", "--skip_ssh_auth_check", "w3")
    try:
        wait_until(lambda: slave(cli, "w2")["checked_at"], what="a first health check")
        workers[1].stop()
        wait_until(lambda: slave(cli, "w2")["health"] == "down", what="w2 marked down")
        down = slave(cli, "w2")
        assert down["status"] == "down" and "refused" in down["check_reason"]
        assert "down" in cli.ok("status")
        assert slave(cli, "w3")["checked_at"] is None, "w3 was added without the SSH check"
        ids = cli.ok("add_job", "--exclude", "w3", cli.script, ":::", *range(6)).strip()
        cli.ok("wait", "-q", ids)
        assert {cli.record(job_id)["slave"] for job_id in range(1, 7)} == {"w1"}
        workers[1].start()
        wait_until(lambda: slave(cli, "w2")["health"] == "up", what="w2 back up")
        assert slave(cli, "w2")["check_reason"] is None
        job_id = cli.add_job("--on", "w2", cli.script)
        cli.ok("wait", "-q", job_id)
    finally:
        workers[1].start()


def test_health_checks_keep_one_connection_open(cli, workers):
    cli.ok("start", "--check-interval", "0.3s")
    cli.ok("add_slave", "w3")
    wait_until(lambda: slave(cli, "w3")["checked_at"], what="a first health check")
    opened = workers[2].connections()
    first = slave(cli, "w3")["checked_at"]
    time.sleep(2)
    assert slave(cli, "w3")["checked_at"] != first, "no checks after the first"
    assert workers[2].connections() == opened, "each check opened a new connection"


def test_check_interval_is_checked_and_can_turn_checks_off(cli):
    cli.fails("start", "--check-interval", "often", expect="--check-interval")
    cli.ok("start", "--check-interval", "0")
    cli.ok("add_slave", "w1")
    time.sleep(1)
    assert slave(cli, "w1")["checked_at"] is None


@pytest.mark.alone("its 2 s job must still run when the test looks")
def test_every_policy_survives_a_kill_9_of_the_server(server):
    import os
    import signal
    server.ok("add_slave", "--slots", "4", "w1")
    flaky = server.write_script("flaky.sh", '[ "$JOB_ATTEMPT" -ge 2 ] || exit 1\nsleep 1\n')
    submitted = time.time()
    delayed = server.add_job("--delay", "4s", server.script)
    timed = server.add_job("--timeout", "3s", server.script, env=dict(server.env, SLEEP="60"))
    first = server.add_job(server.script, env=dict(server.env, SLEEP="2"))
    dependent = server.add_job("--after", first, server.script)
    retried = server.add_job("--retries", "2", "--retry-delay", "1s", flaky)
    server.wait_for_counts(running=3)
    pid = server.server_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the server to die")
    server.ok("start")
    server.ok("wait", "-q", delayed, first, dependent, retried)
    server.wait_for_counts(timed_out=1, timeout=15)
    assert server.record(delayed)["start"] >= submitted + 3.5
    assert server.record(dependent)["start"] >= server.record(first)["end"]
    assert [attempt["result"] for attempt in attempts_of(server, retried)] == \
        ["failed", "succeeded"]
    timed_job = json.loads(server.ok("jobs", timed, "--json"))
    assert cli_time(timed_job["ended_at"]) - cli_time(timed_job["started_at"]) < 8
    assert sorted(server.runs()) == sorted([delayed, timed, first, dependent])


def test_a_kill_during_a_timeouts_grace_wins_and_is_not_retried(server):
    server.ok("add_slave", "w1")
    stubborn = server.write_script("stubborn.sh", "trap '' TERM\nsleep 60 & wait\nsleep 60\n")
    job_id = server.add_job("--timeout", "1s", "--retries", "2", stubborn)
    wait_until(lambda: "killing" in (server.log_dir / "server.log").read_text(),
               what="the timeout to start killing")
    started = time.time()
    server.ok("kill", "--grace", "0", job_id)
    assert time.time() - started < 5, "kill waited for the timeout's grace period"
    history = attempts_of(server, job_id)
    assert [attempt["result"] for attempt in history] == ["killed"]


def test_a_new_priority_is_looked_at_at_once(server):
    """A job beyond the scheduler's look-ahead (SCHEDULE_SCAN_LIMIT ready jobs) that
    could run on an idle worker starts as soon as `priority` moves it up."""
    server.ok("add_slave", "w1", "w2")
    gate = server.root / "gate"
    blocker = server.write_script("blocker.sh",
                                  f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n')
    try:
        server.add_job("--on", "w1", blocker)
        server.wait_for_counts(running=1)
        # 2000 jobs that only the busy w1 may run fill the look-ahead: w2 idles.
        server.ok("add_job", "--on", "w1", blocker, ":::", *map(str, range(2000)))
        free_runner = server.add_job(server.script)
        server.ok("pause")
        server.ok("resume")   # a pass of the scheduler that cannot reach it
        assert server.status()["counts"]["running"] == 1
        server.ok("priority", "1", free_runner)
        wait_until(lambda: server.record(free_runner) is not None, timeout=10,
                   what="the job moved up to start on the idle w2")
    finally:
        gate.touch()
