"""add_job and remove_job: what a job sees, where it runs, order, slots, bad input."""
import os
import subprocess
import sys

import pytest

from conftest import CLI, process_alive, wait_until

TRICKY_ARGS = ["two words", "", "it's \"quoted\"", "$(touch /tmp/pwned)", "a; rm -rf /",
               "ünïcödé ✓", "*", "--flag", "-e", "new\nline", "back\\slash"]


def test_job_sees_its_id_worker_cwd_environment_and_verbatim_arguments(server):
    server.ok("add_slave", "-e", "FROM_WORKER=w", "-e", "BOTH=worker", "w1")
    workdir = server.root / "work dir"
    workdir.mkdir()
    env = dict(server.env, FROM_CALLER="caller", BOTH="caller")
    job_id = server.add_job("-e", "FROM_JOB=a=b", "-e", "BOTH=job", server.script, "--",
                            *TRICKY_ARGS, env=env, cwd=workdir)
    record = wait_until(lambda: server.record(job_id), what="the job's record")
    assert record["job_id"] == str(job_id)
    assert record["slave"] == "w1"
    assert record["cwd"] == str(workdir)
    assert record["args"] == TRICKY_ARGS
    assert record["env"]["FROM_CALLER"] == "caller"
    assert record["env"]["FROM_WORKER"] == "w"
    assert record["env"]["FROM_JOB"] == "a=b"
    assert record["env"]["BOTH"] == "job"      # caller < worker < job
    assert not os.path.exists("/tmp/pwned")
    log = server.log_dir / f"job_{job_id}.txt"
    wait_until(lambda: log.exists() and "ran on w1" in log.read_text(), what="the job log")


def test_job_gets_the_submitters_umask(server):
    server.ok("add_slave", "w1")
    script = server.write_script("touch.sh", "touch created\n")
    server.add_job(script, env=server.env, umask=0o027)
    server.wait_for_counts(succeeded=1)
    assert oct((server.root / "created").stat().st_mode & 0o777) == oct(0o640)


def test_processes_a_job_leaves_behind_are_ended_with_it(server):
    server.ok("add_slave", "w1")
    marker = server.root / "child.pid"
    script = server.write_script("leaves_child.sh", f"sleep 300 &\necho $! > {marker}\nexit 0\n")
    server.add_job(script)
    server.wait_for_counts(succeeded=1, running=0)
    child = int(marker.read_text())
    wait_until(lambda: not process_alive(child), what="the leftover child to be ended")


def test_script_is_found_on_path_and_relative_paths_are_made_absolute(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job("true")
    server.wait_for_counts(succeeded=1)
    status = server.status()
    assert status["counts"]["succeeded"] == 1
    server.add_job("./record.py")   # relative to the caller's directory
    server.wait_for_counts(succeeded=2)
    assert job_id == 1


def test_example_job_copies_works_remotely_and_brings_the_result_back(example_job_dirs, server):
    server.ok("add_slave", "w1")
    example = CLI.parent / "example_job.sh"
    data = server.root / "input file.txt"
    data.write_text("hello from the queue\n")
    job_id = server.add_job(example, data.name)
    server.wait_for_counts(succeeded=1, timeout=60)
    result = server.root / "results" / "input file.txt.out"
    assert result.read_text().strip() == "HELLO FROM THE QUEUE"
    log = (server.log_dir / f"job_{job_id}.txt").read_text()
    assert "done" in log
    assert not os.path.exists(f"/tmp/cli-py-job-{job_id}"), "remote scratch dir not cleaned up"


def test_cancelling_example_job_stops_the_remote_work_and_cleans_up(example_job_dirs, server):
    server.ok("add_slave", "w1")
    example = (CLI.parent / "example_job.sh").read_text()
    work = 'work=$(printf \'cd %q && tr "[:lower:]" "[:upper:]" < %q > %q\' "$remote_dir" "$name" "$name.out")'
    assert work in example, "the example's work line changed: update this test"
    slow = server.write_script("slow_example.sh",
                               example.replace(work, 'work="cd $remote_dir && sleep 301.5"')
                               .split("\n", 1)[1], shell="/usr/bin/env bash")
    data = server.root / "input.txt"
    data.write_text("x\n")
    job_id = server.add_job(slow, data.name)
    # The remote process itself, not the local ssh whose command line also holds it.
    remote_sleep = lambda: subprocess.run(["pgrep", "-f", "^sleep 301.5"],
                                          capture_output=True).returncode == 0
    wait_until(remote_sleep, what="the remote work to start")
    assert os.path.isdir(f"/tmp/cli-py-job-{job_id}")
    server.ok("remove_slave", "--kill", "w1")
    assert server.status()["counts"]["killed"] == 1
    wait_until(lambda: not remote_sleep(), what="the remote work to stop")
    wait_until(lambda: not os.path.exists(f"/tmp/cli-py-job-{job_id}"),
               what="the remote scratch dir to be removed")
    assert "cancelled, cleaning up" in (server.log_dir / f"job_{job_id}.txt").read_text()


def test_example_job_fails_loudly(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job(CLI.parent / "example_job.sh", "missing.txt")
    server.wait_for_counts(failed=1)
    assert "cannot read input file" in (server.log_dir / f"job_{job_id}.txt").read_text()


def test_exit_codes_are_recorded(server):
    server.ok("add_slave", "--slots", "2", "w1")
    ok_id = server.add_job(server.script)
    bad_id = server.add_job(server.script, env=dict(server.env, EXIT_CODE="3"))
    server.wait_for_counts(succeeded=1, failed=1)
    assert ok_id < bad_id


def test_jobs_start_in_submission_order(server):
    ids = [server.add_job(server.script) for _ in range(6)]
    server.ok("add_slave", "w1")
    server.wait_for_counts(succeeded=6)
    assert server.runs() == ids


@pytest.mark.alone("each 0.4 s job must still run when the next is added")
def test_slots_are_never_exceeded_and_load_spreads_across_workers(server):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    env = dict(server.env, SLEEP="0.4")
    ids = [server.add_job(server.script, env=env) for _ in range(10)]
    server.wait_for_counts(succeeded=10, timeout=60)
    records = [server.record(job_id) for job_id in ids]
    for worker in ("w1", "w2"):
        spans = [(record["start"], record["end"]) for record in records
                 if record["slave"] == worker]
        assert spans, f"no job ran on {worker}"
        for start, _ in spans:
            overlapping = sum(1 for other_start, other_end in spans
                              if other_start <= start < other_end)
            assert overlapping <= 2, f"more than 2 jobs at once on {worker}"
    # Four slots for ten jobs: some jobs really did run side by side.
    assert max(sum(1 for r in records if r["start"] <= record["start"] < r["end"])
               for record in records) >= 3


def test_first_jobs_spread_to_the_emptiest_workers(server):
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "3", "w1")
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "3", "w2")
    env = dict(server.env, SLEEP="30")
    for _ in range(2):
        server.add_job(server.script, env=env)
    server.wait_for_counts(running=2)
    assert sorted(job["worker"] for job in server.status()["running_jobs"]) == ["w1", "w2"]


def test_twenty_concurrent_add_jobs_give_twenty_distinct_jobs(server):
    submitters = [subprocess.Popen([sys.executable, str(CLI), "add_job", str(server.script),
                                    str(number)], cwd=server.root, env=server.env,
                                   stdout=subprocess.PIPE, text=True) for number in range(20)]
    ids = [int(submitter.communicate(timeout=60)[0]) for submitter in submitters]
    assert len(set(ids)) == 20
    waiting = server.status()["job_waitlist"]
    assert sorted(job["id"] for job in waiting) == sorted(ids)
    assert sorted(job["args"][0] for job in waiting) == sorted(map(str, range(20)))
    assert len(server.status()["environments"]) == 1   # one environment, stored once


def test_ids_ascend_and_are_never_reused(server):
    first = server.add_job(server.script)
    second = server.add_job(server.script)
    server.ok("remove_job", second)
    third = server.add_job(server.script)
    assert first < second < third


def test_remove_job_by_id_and_by_script_and_arguments(server):
    a = server.add_job(server.script, "x")
    b = server.add_job(server.script, "x")
    c = server.add_job(server.script, "y")
    d = server.add_job(server.script)
    assert "removed job" in server.ok("remove_job", d)
    out = server.ok("remove_job", "./record.py", "x")
    assert f"removed jobs {a}-{b}" in out
    assert [job["id"] for job in server.status()["job_waitlist"]] == [c]
    server.fails("remove_job", "./record.py", "nothing-like-this", expect="no waiting job")


def test_option_like_arguments_go_to_the_script_for_add_and_remove(server):
    server.add_job(server.script, "-x", "--help")
    server.add_job(server.script, "-x")
    result = server.run("add_job", server.script, "-e", "A=1")
    assert result.returncode == 0 and "goes to the script as an argument" in result.stderr
    assert [job["args"] for job in server.status()["job_waitlist"]] == \
        [["-x", "--help"], ["-x"], ["-e", "A=1"]]
    assert "removed job 2" in server.ok("remove_job", "./record.py", "-x")


def test_remove_job_refuses_unknown_running_and_finished_jobs(server):
    server.ok("add_slave", "w1")
    running = server.add_job(server.script, env=dict(server.env, SLEEP="30"))
    server.wait_for_counts(running=1)
    waiting = server.add_job(server.script)
    server.fails("remove_job", running, expect=f"./cli.py kill {running}")
    server.fails("remove_job", waiting, 999, expect="unknown job id 999")
    assert [job["id"] for job in server.status()["job_waitlist"]] == [waiting]


def test_finished_job_cannot_be_removed(server):
    server.ok("add_slave", "w1")
    done = server.add_job(server.script)
    server.wait_for_counts(succeeded=1)
    server.fails("remove_job", done, expect="already ended")


@pytest.fixture
def not_executable(server):
    path = server.write_script("plain.sh", "")
    path.chmod(0o644)
    return path


@pytest.mark.parametrize("arguments, message", [
    (["./missing.sh"], "no such script"),
    (["NOT_EXECUTABLE"], "not executable"),
    (["-e", "NOEQUALS", "./record.py"], "has no '='"),
    (["-e", "=x", "./record.py"], "invalid variable name"),
    (["-e", "BAD-NAME=x", "./record.py"], "invalid variable name"),
    (["-e", "JOB_ID=7", "./record.py"], "cannot be overridden"),
    (["-e", "SLAVE_IP=h", "./record.py"], "cannot be overridden"),
    ([".."], "not a file"),
])
def test_bad_add_job_input_changes_nothing(server, not_executable, arguments, message):
    arguments = [str(not_executable) if arg == "NOT_EXECUTABLE" else arg for arg in arguments]
    before = server.status()
    server.fails("add_job", *arguments, expect=message)
    after = server.status()
    assert after["job_waitlist"] == before["job_waitlist"]
    assert after["counts"] == before["counts"]


def test_job_whose_directory_vanished_fails_with_a_reason(server):
    gone = server.root / "gone"
    gone.mkdir()
    job_id = server.add_job(server.script, cwd=gone)
    gone.rmdir()
    server.ok("add_slave", "w1")
    server.wait_for_counts(failed=1)
    assert "cannot enter" in (server.log_dir / f"job_{job_id}.txt").read_text()


def test_status_table_shows_the_head_of_a_long_queue(server):
    for _ in range(15):
        server.add_job(server.script)
    table = server.ok("status")
    assert "Waiting (15)" in table
    assert "... and 5 more" in table
    assert table.count("record.py") == 10


def test_control_characters_in_arguments_are_shown_escaped_on_one_row(server):
    server.ok("pause")
    job_id = server.add_job(server.script, "a\nb", "tab\there", "bell\x07")
    shown = "./record.py $'a\\nb' $'tab\\there' $'bell\\x07'"
    for command in ("jobs", "status"):
        output = server.ok(command)
        rows = [line for line in output.splitlines() if "record.py" in line]
        assert len(rows) == 1 and rows[0].rstrip().endswith(shown), output
    arguments = server.status()["job_waitlist"][0]["args"]
    assert (server.status()["job_waitlist"][0]["id"], arguments) == \
        (job_id, ["a\nb", "tab\there", "bell\x07"])
