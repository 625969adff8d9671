"""Schedules: a job template that queues a normal job every D, at times of day, on a
cron line, or after each success of another schedule; no overlap by default, missed
times run once, and no due time fires twice, kill -9 of the server included."""
import json
import os
import signal
import time
from datetime import datetime

import pytest

from conftest import wait_until


def schedules(cli):
    return {entry["name"]: entry for entry in json.loads(cli.ok("schedules", "--json"))}


def runs_of(cli, name):
    return json.loads(cli.ok("jobs", "--schedule", name, "--json"))


def due_times(cli, name):
    return [datetime.fromisoformat(job["envs"]["SCHEDULED_FOR"]).timestamp()
            for job in runs_of(cli, name)]


def let_time_pass(seconds):
    """The schedule's own clock is what is under test: let it run for SECONDS."""
    end = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= end, seconds + 5, f"{seconds}s to pass")


def test_every_second_over_5s_runs_4_to_6_times_each_a_job_of_its_own(server):
    server.ok("add_slave", "--slots", "2", "w1")
    shown = server.ok("add_schedule", "tick", "--every", "1s", "-e", "MINE=1", "--",
                      server.script, "an arg")
    assert shown.startswith("schedule tick: every 1s, next run ")
    let_time_pass(5)
    server.ok("pause_schedule", "tick")
    tick = schedules(server)["tick"]
    assert 4 <= tick["runs"] <= 6, tick
    assert tick["paused"] and tick["skipped"] == 0
    server.wait_for_counts(succeeded=tick["runs"], waiting=0, running=0)
    jobs = runs_of(server, "tick")
    assert len(jobs) == tick["runs"] and tick["last_job"] == jobs[-1]["id"]
    records = [server.record(job["id"]) for job in jobs]
    assert all(record["args"] == ["an arg"] for record in records)
    assert {record["env"]["SCHEDULE"] for record in records} == {"tick"}
    assert all(record["env"]["MINE"] == "1" for record in records)
    due = [datetime.fromisoformat(record["env"]["SCHEDULED_FOR"]) for record in records]
    assert all(moment.tzinfo is not None for moment in due)   # local time, with its offset
    assert sorted(set(due)) == due
    assert all(0.9 <= (later - earlier).total_seconds() <= 2.5
               for earlier, later in zip(due, due[1:])), due
    assert "schedule:" in server.ok("jobs", jobs[0]["id"])


def test_a_slow_run_is_never_overlapped_and_the_skipped_times_are_counted(server):
    server.ok("add_slave", "--slots", "4", "w1")
    server.ok("add_schedule", "slow", "--every", "1s", "-e", "SLEEP=2.5", "--", server.script)
    wait_until(lambda: schedules(server)["slow"]["runs"] >= 3, 30, "three runs")
    server.ok("pause_schedule", "slow")
    slow = schedules(server)["slow"]
    assert slow["skipped"] >= 2, slow
    server.wait_for_counts(running=0, waiting=0)
    spans = sorted((record["start"], record["end"]) for record in
                   (server.record(job["id"]) for job in runs_of(server, "slow")))
    assert len(spans) == slow["runs"]
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans


def test_overlap_lets_runs_overlap(server):
    server.ok("add_slave", "--slots", "4", "w1")
    server.ok("add_schedule", "many", "--every", "1s", "--overlap", "-e", "SLEEP=3", "--",
              server.script)
    wait_until(lambda: server.status()["counts"].get("running", 0) >= 2, 20,
               "two runs at once")
    server.ok("remove_schedule", "many")
    assert schedules(server) == {}
    assert runs_of(server, "many")   # its jobs stay


def posix_zone_ahead(seconds_past_minute):
    """A TZ 5 hours ahead of UTC (and some seconds) in which the local time is now
    SECONDS_PAST_MINUTE seconds past a whole minute."""
    offset = 5 * 3600 + int((seconds_past_minute - time.time()) % 60)
    hours, rest = divmod(offset, 3600)
    return f"XYZ-{hours:02}:{rest // 60:02}:{rest % 60:02}", offset   # POSIX: west is +


def next_local_minute(offset, margin=3):
    """The next whole minute of local time (UTC + OFFSET) at least MARGIN seconds away,
    as HH:MM."""
    local = time.time() + offset + margin
    return time.strftime("%H:%M", time.gmtime(local - local % 60 + 60))


def test_a_daily_time_a_minute_ahead_fires_once_in_the_servers_zone(cli):
    zone, offset = posix_zone_ahead(40)
    cli.ok("start", env=dict(cli.env, TZ=zone))
    cli.ok("add_slave", "w1")
    minute = next_local_minute(offset)
    cli.ok("add_schedule", "daily", "--daily", minute, "--", cli.script)
    first_due = datetime.fromisoformat(schedules(cli)["daily"]["next_due"].replace("Z", "+00:00"))
    assert 0 < first_due.timestamp() - time.time() < 65
    assert time.strftime("%H:%M", time.gmtime(first_due.timestamp() + offset)) == minute
    wait_until(lambda: schedules(cli)["daily"]["runs"] == 1, 90, "the daily run")
    cli.wait_for_counts(succeeded=1)
    record = cli.record(runs_of(cli, "daily")[0]["id"])
    assert record["env"]["SCHEDULED_FOR"].startswith(
        time.strftime("%Y-%m-%d", time.gmtime(first_due.timestamp() + offset)) +
        f"T{minute}:00+05:")
    let_time_pass(2)
    daily = schedules(cli)["daily"]
    assert daily["runs"] == 1
    next_due = datetime.fromisoformat(daily["next_due"].replace("Z", "+00:00"))
    assert abs((next_due - first_due).total_seconds() - 86400) < 1


@pytest.mark.parametrize("skip_missed", [False, True])
def test_times_missed_during_a_3s_stop_run_once_unless_skip_missed(server, skip_missed):
    server.ok("add_slave", "--slots", "2", "w1")
    server.ok("add_schedule", "tick", "--every", "1s", *["--skip-missed"] * skip_missed,
              "--", server.script)
    wait_until(lambda: schedules(server)["tick"]["runs"] >= 2, 20, "two runs")
    server.ok("stop")
    stopped = time.time()
    let_time_pass(3)
    server.ok("start")
    started = time.time()
    wait_until(lambda: any(due > started for due in due_times(server, "tick")), 20,
               "a run due after the start")
    server.ok("pause_schedule", "tick")
    # A time missed fires 2s late or more (the stop lasted 3s; the time fell due
    # at most 1s into it); the others fire when due.
    late = [job["envs"]["SCHEDULED_FOR"] for job in runs_of(server, "tick")
            if iso_seconds(job["submitted_at"]) -
            datetime.fromisoformat(job["envs"]["SCHEDULED_FOR"]).timestamp() > 1.5]
    assert len(late) == (0 if skip_missed else 1), late
    if late:
        assert stopped - 1 < datetime.fromisoformat(late[0]).timestamp() < started


def iso_seconds(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.slow   # (the file takes two minutes of mostly waiting: hand it out first)
def test_kill_9_of_the_server_never_fires_a_due_time_twice(server):
    server.ok("add_slave", "--slots", "4", "w1")
    server.ok("add_schedule", "tick", "--every", "1s", "--overlap", "--", server.script)
    for round_number in range(3):
        runs = schedules(server)["tick"]["runs"]
        wait_until(lambda: schedules(server)["tick"]["runs"] > runs, 20, "a run")
        # Right at the next firing, as near as a test can aim.
        due = datetime.fromisoformat(schedules(server)["tick"]["next_due"].replace("Z", "+00:00"))
        wait_until(lambda: time.time() >= due.timestamp() - 0.002 * round_number, 5,
                   "the due time")
        os.kill(server.server_pid(), signal.SIGKILL)
        wait_until(lambda: server.run("status").returncode != 0, 10, "the server to die")
        server.ok("start")
    server.ok("pause_schedule", "tick")
    due = due_times(server, "tick")
    assert len(due) == len(set(due)) == schedules(server)["tick"]["runs"]


def test_run_pause_resume_and_the_refusals_that_keep_runs_apart(server):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    gated = server.write_script("gated.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n')
    server.ok("add_schedule", "nightly", "--cron", "0 3 * * *", "--", gated)
    nightly = schedules(server)["nightly"]
    assert nightly["rule"] == {"cron": "0 3 * * *"} and nightly["runs"] == 0
    assert datetime.fromisoformat(nightly["next_due"].replace("Z", "+00:00")).astimezone() \
        .strftime("%H:%M") == "03:00"
    job_id = int(server.ok("run_schedule", "nightly"))
    assert runs_of(server, "nightly")[0]["id"] == job_id
    server.fails("run_schedule", "nightly", expect=f"previous run, job {job_id}, has not ended")
    gate.write_text("")
    server.ok("wait", job_id)
    server.ok("pause_schedule", "nightly")
    server.fails("pause_schedule", "nightly", expect="already paused")
    assert "paused" in server.ok("schedules")
    second = int(server.ok("run_schedule", "nightly"))   # paused: by hand still
    server.ok("wait", second)
    server.ok("resume_schedule", "nightly")
    nightly = schedules(server)["nightly"]
    assert (nightly["runs"], nightly["last_job"], nightly["last_result"], nightly["paused"]) == \
        (2, second, "succeeded", False)
    table = server.ok("schedules")
    assert "nightly" in table and "cron 0 3 * * *" in table and f"job {second}" in table
    assert "Schedules (1)" in server.ok("status")
    server.fails("remove_schedule", "nope", expect="unknown schedule 'nope'")
    server.ok("remove_schedule", "nightly")
    assert schedules(server) == {} and len(runs_of(server, "nightly")) == 2


def test_after_schedule_fires_once_per_success_of_the_other(server):
    server.ok("add_slave", "--slots", "2", "w1")
    verdict = server.root / "verdict"
    step = server.write_script("step.sh", f'exit $(cat "{verdict}")\n')
    server.ok("add_schedule", "build", "--every", "1d", "--", step)
    server.ok("add_schedule", "publish", "--after-schedule", "build", "--", server.script)
    assert schedules(server)["publish"]["next_due"] is None
    verdict.write_text("1")
    assert server.run("wait", server.ok("run_schedule", "build").strip()).returncode == 1
    verdict.write_text("0")
    build = int(server.ok("run_schedule", "build"))
    wait_until(lambda: schedules(server)["publish"]["runs"] == 1, 20, "publish to follow")
    server.wait_for_counts(running=0, waiting=0)
    publish, = runs_of(server, "publish")
    ended = json.loads(server.ok("jobs", build, "--json"))["ended_at"]
    assert datetime.fromisoformat(publish["envs"]["SCHEDULED_FOR"]).timestamp() == \
        pytest.approx(datetime.fromisoformat(ended.replace("Z", "+00:00")).timestamp(), abs=1)
    server.fails("remove_schedule", "build", expect="schedule publish follows build")
    # A success while the server is down is followed once it is back.
    server.ok("stop")
    server.ok("start")
    assert schedules(server)["publish"]["runs"] == 1


def test_schedules_are_in_status_json_and_come_back_with_load_status(server, tmp_path):
    server.ok("add_slave", "w1")
    server.ok("add_schedule", "report", "--daily", "07:30,19:00", "--days", "mon-fri",
              "--retries", "2", "--priority", "5", "-e", "KIND=weekly", "--", server.script,
              "x")
    document = server.status()
    report, = document["schedules"]
    assert report["rule"] == {"daily": "07:30,19:00", "days": "mon,tue,wed,thu,fri"}
    assert (report["retries"], report["priority"], report["envs"]) == (2, 5, {"KIND": "weekly"})
    path = tmp_path / "status.json"
    path.write_text(json.dumps(document))
    server.ok("remove_schedule", "report")
    server.ok("load_status", path)
    loaded = schedules(server)["report"]
    assert {key: loaded[key] for key in report if key != "environment"} == \
        {key: report[key] for key in report if key != "environment"}
    job_id = int(server.ok("run_schedule", "report"))
    server.ok("wait", job_id)
    record = server.record(job_id)
    assert (record["args"], record["env"]["KIND"], record["env"]["SCHEDULE"]) == \
        (["x"], "weekly", "report")


BAD_RULES = [
    (["--every", "0"], "--every must be longer than 0"),
    (["--every", "0.5s"], "--every must be from 1s"),
    (["--daily", "25:00"], "'25:00' is not a time of day"),
    (["--cron", "0 0 * * * *"], "a cron line has 5 fields"),
    (["--cron", "61 * * * *"], "is not in the minute field's range"),
    (["--cron", "0 0 30 2 *"], "never fires"),
    (["--days", "mon"], "--days goes with --daily"),
    (["--daily", "07:00", "--days", "mon-xyz"], "day of week"),
    (["--every", "1h", "--cron", "* * * * *"], "two rules"),
    ([], "a schedule needs a rule"),
    (["--after-schedule", "nope"], "no such schedule"),
    (["--every", "1h", "-e", "SCHEDULE=x"], "SCHEDULE is set by the schedule"),
]


def test_bad_rules_get_one_line_and_change_nothing(server):
    server.ok("add_slave", "w1")
    server.ok("add_schedule", "kept", "--every", "1h", "--", server.script)
    before = schedules(server)
    for args, expect in BAD_RULES:
        server.fails("add_schedule", "new", *args, "--", server.script, expect=expect)
    server.fails("add_schedule", "kept", "--every", "2h", "--", server.script,
                 expect="exists already")
    assert schedules(server) == before


def test_a_run_whose_on_workers_are_gone_is_skipped_with_the_reason(server):
    server.ok("add_slave", "w1", "w2")
    server.ok("add_schedule", "pinned", "--every", "1h", "--on", "w2", "--", server.script)
    server.ok("remove_slave", "w2")
    job_id = int(server.ok("run_schedule", "pinned"))
    wait_until(lambda: json.loads(server.ok("jobs", job_id, "--json"))["result"] == "skipped",
               20, "the run to be skipped")
    assert "no allowed worker left" in json.loads(server.ok("jobs", job_id, "--json"))["reason"]


def test_a_schedules_on_end_hook_runs_for_each_run(server, tmp_path):
    server.ok("add_slave", "w1")
    seen = server.root / "hook.seen"
    hook = server.write_script("hook.sh", f'echo "$JOB_ID $JOB_RESULT" >> "{seen}"\n')
    server.ok("add_schedule", "hooked", "--every", "1h", "--on-end", str(hook), "--",
              server.script)
    assert schedules(server)["hooked"]["on_end"] == [str(hook)]
    job_id = int(server.ok("run_schedule", "hooked"))
    server.ok("wait", job_id)
    wait_until(lambda: seen.exists() and seen.read_text() == f"{job_id} succeeded\n",
               20, "the hook")
    path = tmp_path / "status.json"
    path.write_text(server.ok("status", "--json"))
    server.ok("remove_schedule", "hooked")
    server.ok("load_status", path)
    assert schedules(server)["hooked"]["on_end"] == [str(hook)]
