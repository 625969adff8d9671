"""Arrays: many tasks from one add_job, each a job with ARRAY_ID and TASK_ID, named
as a whole by the array's id and one by one as ARRAY.TASK, with a %K limit that
is never exceeded."""
import json
import os
import signal
import time

import pytest

from conftest import process_alive, wait_until


def env_of(cli, job_id):
    return cli.record(job_id)["env"]


def tasks(cli, array):
    return json.loads(cli.ok("jobs", "--array", array, "--json"))


def test_an_array_spec_gives_each_task_its_index_and_the_array_id(server):
    server.ok("add_slave", "--slots", "4", "w1")
    array = server.add_job("--array", "1,4,9-12,20-30:5", server.script, "x")
    server.ok("wait", "-q", array)
    jobs = tasks(server, array)
    assert [job["id"] for job in jobs] == list(range(array, array + 9))
    assert [job["task"] for job in jobs] == [1, 4, 9, 10, 11, 12, 20, 25, 30]
    for job in jobs:
        env = env_of(server, job["id"])
        assert (env["ARRAY_ID"], env["TASK_ID"]) == (str(array), str(job["task"]))
        assert "TASK_ARG" not in env
        assert server.record(job["id"])["args"] == ["x"]
    status = server.status()
    assert status["arrays"] == []          # none left waiting or running
    assert status["counts"]["succeeded"] == 9


def test_colons_and_lines_make_arrays_counted_from_one(server):
    server.ok("add_slave", "--slots", "2", "w1")
    array = server.add_job(server.script, "a", ":::", "x", "y", ":::", "1", "2")
    server.ok("wait", "-q", array)
    jobs = tasks(server, array)
    assert [(job["task"], job["args"]) for job in jobs] == \
        [(1, ["a", "x", "1"]), (2, ["a", "x", "2"]), (3, ["a", "y", "1"]), (4, ["a", "y", "2"])]
    assert env_of(server, array + 3)["TASK_ID"] == "4"
    lines = server.root / "urls.txt"
    lines.write_text("http://one/\n\n  \nsecond line with  spaces \r\nthird\n")
    array = server.add_job("--each-line", lines, server.script, "fetch")
    server.ok("wait", "-q", array)
    seen = [(env_of(server, job["id"])["TASK_ID"], env_of(server, job["id"])["TASK_ARG"],
             server.record(job["id"])["args"]) for job in tasks(server, array)]
    assert seen == [("1", "http://one/", ["fetch"]), ("2", "second line with  spaces ", ["fetch"]),
                    ("3", "third", ["fetch"])]
    shown = server.ok("jobs", f"{array}.2")
    assert f"task:         {array}.2 (TASK_ARG=second line with  spaces )" in shown
    # A plain job added from inside a task does not inherit its task's variables.
    server.ok("add_job", "-e", "TASK_ID=mine", server.script,
              env=dict(server.env, ARRAY_ID="3", TASK_ID="9", TASK_ARG="z"))
    server.ok("wait", "-q")
    plain = max(job["id"] for job in json.loads(server.ok("jobs", "--json")))
    env = env_of(server, plain)
    assert "ARRAY_ID" not in env and "TASK_ARG" not in env and env["TASK_ID"] == "mine"


def test_the_array_id_names_every_task_and_array_dot_task_names_one(server):
    server.ok("add_slave", "w1")
    server.ok("pause")
    array = server.add_job("--array", "0-9", server.script)
    assert server.ok("jobs", f"{array}.0", "--json").count('"id"') == 1
    assert json.loads(server.ok("jobs", f"{array}.3", "--json"))["id"] == array + 3
    assert server.ok("priority", "5", f"{array}.9").strip() == f"job {array + 9}: priority 5"
    assert server.ok("remove_job", f"{array}.8").strip() == f"removed job {array + 8}"
    assert server.ok("kill", f"{array}.7").strip() == f"killed job {array + 7}"
    table = server.ok("jobs", str(array))
    assert f"{array}.9" in table and f"{array}.8" not in table and "task" in table
    assert server.ok("priority", "2", str(array)).strip() == \
        f"jobs {array}-{array + 6}, {array + 9}: priority 2"
    line = [line for line in server.ok("status").splitlines() if line.startswith("array ")]
    assert line == [f"array {array}: 9 tasks, 1 killed, 8 waiting"]
    server.ok("resume")
    assert server.run("wait", "-q", str(array)).returncode == 1    # one was killed
    assert server.status()["counts"]["succeeded"] == 8
    # Bad names: one line each, nothing changed.
    server.fails("jobs", f"{array}.10", expect=f"array {array} has no task 10 (its tasks: 0-9)")
    server.fails("kill", f"{array}.8", expect=f"task {array}.8 (job {array + 8}) was removed")
    server.fails("logs", f"{array + 1}.1", expect=f"there is no array {array + 1}")
    server.fails("wait", "1.x", expect="is not a job id, a range of ids or a task")


def test_retry_of_an_array_runs_its_failed_tasks_again(server):
    server.ok("add_slave", "--slots", "3", "w1")
    script = server.write_script("odd.sh", 'echo "task $TASK_ID"\n'
                                           '[ -e "$RESULTS/fixed" ] && exit 0\n'
                                           'exit $((TASK_ID % 2))\n')
    array = server.add_job("--array", "1-6", script)
    assert server.run("wait", "-q", array).returncode == 1
    failed = json.loads(server.ok("jobs", "--array", array, "--state", "failed", "--json"))
    assert [job["task"] for job in failed] == [1, 3, 5]
    (server.results / "fixed").write_text("")
    assert server.ok("retry", array).strip() == \
        f"retried jobs {array}, {array + 2}, {array + 4}"
    server.ok("wait", "-q", array)
    assert {job["result"] for job in tasks(server, array)} == {"succeeded"}
    logs = server.ok("logs", array)
    assert logs.startswith(f"==> task {array}.1 (job {array}, succeeded) <==\n")
    assert logs.count("==> task") == 6 and "task 6\n" in logs
    server.fails("logs", "-f", array, expect=f"name one task of array {array}, like {array}.1")


def test_after_an_array_waits_for_all_its_tasks_and_after_any_for_one(server):
    server.ok("add_slave", "--slots", "4", "w1")
    slow = server.write_script("slow.sh", 'sleep "$TASK_ID"\n')
    array = server.add_job("--array", "1-3", slow)
    after_all = server.add_job("--after", array, server.script)
    after_any = server.add_job("--after-any", array, server.script)
    server.ok("wait", "-q", after_all, after_any)
    ended = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    last_task_end = max(ended[array + n]["ended_at"] for n in range(3))
    first_task_end = min(ended[array + n]["ended_at"] for n in range(3))
    assert ended[after_all]["started_at"] >= last_task_end
    assert first_task_end <= ended[after_any]["started_at"] < last_task_end


def test_bad_arrays_are_one_line_and_change_nothing(server):
    before = server.status()["counts"]
    for spec, message in [("5-1", "runs backwards: write 1-5"),
                          ("1-10%0", "%K needs a whole number of at least 1"),
                          ("1-2000000", "more than 1000000 tasks"),
                          ("1-3,x", "'x' is not an index")]:
        server.fails("add_job", "--array", spec, server.script, expect=message)
    server.fails("add_job", "--array", "1-3", server.script, ":::", "a",
                 expect="use one (or --array %K to only limit the others)")
    server.fails("add_job", "--array", "%3", server.script,
                 expect="there are none: give the indexes too, like --array 1-100%3")
    empty = server.root / "empty.txt"
    empty.write_text("\n \n")
    server.fails("add_job", "--each-line", empty, server.script, expect="holds no line")
    server.fails("add_job", "--each-line", empty, server.script, ":::", "a",
                 expect="use one of them")
    server.fails("jobs", "--array", "x", expect="is not an array id")
    assert server.status()["counts"] == before


def running_high_water(cli, array, size):
    """The most tasks of ARRAY seen running at once, from what the tasks themselves
    wrote: each appends 'start' and 'end' lines around its run."""
    running = most = 0
    for line in (cli.results / "events.log").read_text().split():
        running += 1 if line == "start" else -1
        most = max(most, running)
    return most


LIMITED_TASK = """
echo start >> "$RESULTS/events.log"
echo "$TASK_ID" >> "$RESULTS/tasks.log"
sleep "${{PAUSE:-0.05}}"
echo end >> "$RESULTS/events.log"
"""


def test_a_limit_is_never_exceeded_and_does_not_hold_up_other_jobs(server):
    server.ok("add_slave", "--slots", "8", "w1", "w2")
    script = server.write_script("limited.sh", LIMITED_TASK.format())
    array = server.add_job("--array", "1-200%5", script)
    other = server.add_job(server.script)    # behind the whole array, and not held by it
    wait_until(lambda: server.record(other), 20, "the job behind the array to run")
    server.ok("wait", "-q", array)
    assert running_high_water(server, array, 200) <= 5
    assert sorted(map(int, (server.results / "tasks.log").read_text().split())) == \
        list(range(1, 201))
    line = server.ok("status")
    assert f"array {array}" not in line      # ended: no longer listed


@pytest.mark.alone("three kill -9 of the server while 1,000 tasks run, timed by their ends")
def test_a_limit_survives_kill_9_of_the_server_and_every_task_runs_once(cli):
    cli.ok("start")
    cli.ok("add_slave", "--slots", "16", "w1", "w2")
    script = cli.write_script("limited.sh", LIMITED_TASK.format())
    array = cli.add_job("--array", "1-1000%20", script)
    line = [line for line in cli.ok("status").splitlines() if line.startswith("array ")]
    assert line and line[0].endswith("(at most 20 at once)")
    for _ in range(3):
        done_before = cli.status()["counts"].get("succeeded", 0)
        wait_until(lambda: cli.status()["counts"].get("succeeded", 0) > done_before + 50, 60,
                   "more tasks to end")
        pid = cli.server_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not process_alive(pid), 10, "the server to die")
        time.sleep(0.3)            # tasks end while no server runs
        cli.ok("start")
        status = cli.status()
        assert len(status["running_jobs"]) <= 20
    cli.ok("wait", "-q", array, timeout=300)
    assert running_high_water(cli, array, 1000) <= 20
    ran = sorted(map(int, (cli.results / "tasks.log").read_text().split()))
    assert ran == list(range(1, 1001))       # each exactly once


def test_a_task_held_back_by_its_limit_says_so(server):
    server.ok("add_slave", "--slots", "4", "w1")
    gate = server.root / "gate"
    gated = server.write_script("gated.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n')
    array = server.add_job("--array", "1-5%2", gated)
    server.wait_for_counts(running=2)
    time.sleep(0.3)                          # room for a third start, were it allowed
    status = server.status()
    assert len(status["running_jobs"]) == 2
    assert {job["waiting_for"] for job in status["job_waitlist"]} == \
        {f"array {array} runs 2 tasks, its limit (%2)"}
    assert status["arrays"] == [{"id": array, "spec": "1-5", "max_running": 2, "tasks": 5,
                                 "counts": {"running": 2, "waiting": 3}}]
    gate.touch()
    server.ok("wait", "-q", array)


def test_load_status_brings_back_the_waiting_tasks_of_an_array(server):
    server.ok("add_slave", "--slots", "4", "w1")
    server.ok("pause")
    array = server.add_job("--array", "3-6%2", server.script)
    lines = server.root / "lines.txt"
    lines.write_text("alpha\nbeta\n")
    each = server.add_job("--each-line", lines, server.script)
    document = server.root / "state.json"
    document.write_text(server.ok("status", "--json"))
    server.ok("load_status", document)
    assert [(job["id"], job["task"]) for job in tasks(server, array)] == \
        [(array + n, 3 + n) for n in range(4)]
    assert server.status()["arrays"][0]["max_running"] == 2
    server.ok("resume")
    server.ok("wait", "-q", array, each)
    assert [env_of(server, array + n)["TASK_ID"] for n in range(4)] == ["3", "4", "5", "6"]
    assert env_of(server, each + 1)["TASK_ARG"] == "beta"
    assert json.loads(server.ok("jobs", f"{array}.5", "--json"))["id"] == array + 2
