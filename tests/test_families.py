"""Parent and child jobs: a job added from inside a running job is its child, ends
with it unless --nohup, is killed with it, and can be waited for with wait --children."""
import json
import os
import signal
import sqlite3
import sys

from conftest import CLI, process_alive, wait_until


def family_env(cli, **more):
    """What job scripts need to call cli.py themselves (the submitter's environment
    reaches them, CLI_PY_DATA_DIR included)."""
    return dict(cli.env, PY=sys.executable, CLI=str(CLI), **more)


def child_script(cli):
    """A child that records its pid and runs until killed (or for $RUN seconds)."""
    return cli.write_script("child.sh", 'echo $$ > "$RESULTS/child-$JOB_ID.pid"\n'
                                        'sleep "${RUN:-300}"\n')


def driver_script(cli, body):
    return cli.write_script("driver.sh", 'add() { "$PY" "$CLI" add_job "$@"; }\n' + body)


def job(cli, job_id):
    return json.loads(cli.ok("jobs", job_id, "--json"))


def jobs_by_id(cli):
    return {entry["id"]: entry for entry in json.loads(cli.ok("jobs", "--json"))}


def child_pid(cli, job_id):
    path = cli.results / f"child-{job_id}.pid"
    text = path.read_text() if path.exists() else ""
    return int(text) if text.strip() else None   # (the shell may not have written it yet)


def test_a_driver_that_adds_5_children_and_exits_leaves_none_running(server):
    server.ok("add_slave", "--slots", "4", "w1")
    child = child_script(server)
    driver = driver_script(server, f'for n in 1 2 3 4 5; do add {child} $n; done\n'
                                   # Some children start (3 free slots) before it ends.
                                   f'while [ $(ls "$RESULTS" | grep -c child-) -lt 3 ]; do '
                                   f'sleep 0.05; done\n')
    parent = server.add_job(driver, env=family_env(server))
    server.ok("wait", "-q", parent)
    children = [entry for entry in jobs_by_id(server).values() if entry["parent"] == parent]
    assert len(children) == 5
    server.wait_for_counts(killed=5, succeeded=1)
    started = [entry["id"] for entry in children if child_pid(server, entry["id"])]
    assert len(started) >= 3
    for entry in jobs_by_id(server).values():
        if entry["id"] != parent:
            assert (entry["result"], entry["reason"]) == ("killed", f"parent {parent} ended")
    for job_id in started:
        wait_until(lambda: not process_alive(child_pid(server, job_id)),
                   what=f"child {job_id}'s process to end")
    assert job(server, parent)["children"] == sorted(entry["id"] for entry in children)
    shown = server.ok("jobs", parent)
    assert ["children:", ", ".join(str(child["id"]) for child in children)] in \
        [line.split(None, 1) for line in shown.splitlines()]
    assert ["parent:", str(parent)] in [line.split() for line in
                                        server.ok("jobs", children[0]["id"]).splitlines()]


def test_nohup_children_run_to_completion(server):
    server.ok("add_slave", "--slots", "3", "w1")
    child = child_script(server)
    driver = driver_script(server, f'add --nohup -e RUN=1 {child} a\n'
                                   f'add --nohup -e RUN=1 {child} b\nadd {child} c\n')
    parent = server.add_job(driver, env=family_env(server))
    server.wait_for_counts(succeeded=3, killed=1, timeout=40)
    children = sorted((entry for entry in jobs_by_id(server).values()
                       if entry["parent"] == parent), key=lambda entry: entry["id"])
    assert [(entry["result"], entry["nohup"]) for entry in children] == \
        [("succeeded", True), ("succeeded", True), ("killed", False)]
    tree = server.ok("jobs", "--tree", parent)
    assert tree.splitlines()[0].startswith(f"{parent}  succeeded")
    assert "[nohup]" in tree and f"(parent {parent} ended)" in tree
    assert tree.count("─ ") == 3


def test_a_process_outside_the_job_cannot_claim_it_as_parent(server):
    server.ok("add_slave", "--slots", "3", "w1")
    gate = server.root / "gate"
    holder = server.write_script("holder.sh", f'while [ ! -e {gate} ]; do sleep 0.05; done\n')
    running = server.add_job(holder)
    server.wait_for_counts(running=1)
    claimed = server.run("add_job", server.script,
                         env=dict(server.env, JOB_ID=str(running), SLEEP="300"))
    assert claimed.returncode == 0, claimed.stderr
    assert f"JOB_ID={running} is set, but this add_job does not come from a process" \
        in claimed.stderr
    orphan = int(claimed.stdout)
    # Nor from inside another running job: JOB_ID names the job, the process must be its.
    liar = driver_script(server, f'JOB_ID={running} add {server.script} > "$RESULTS/liar.out"\n')
    liar_id = server.add_job(liar, env=family_env(server, SLEEP="300"))
    server.ok("wait", "-q", liar_id)
    lied = int((server.results / "liar.out").read_text())
    gate.touch()
    server.ok("wait", "-q", running)
    jobs = jobs_by_id(server)
    assert jobs[orphan]["parent"] is None and jobs[lied]["parent"] is None
    assert jobs[orphan]["state"] == jobs[lied]["state"] == "running"   # not killed with it
    assert jobs[running]["children"] == []
    server.ok("kill", "--grace", "0", orphan, lied)


def test_kill_of_a_parent_kills_its_family_nohup_children_too(server):
    server.ok("add_slave", "--slots", "3", "w1")
    child = child_script(server)
    grandchild = driver_script(server, f'add {child} g\nsleep 300\n')
    driver = server.write_script(
        "parent.sh", f'"$PY" "$CLI" add_job --nohup {child} n\n"$PY" "$CLI" add_job {grandchild}\n'
                     f'"$PY" "$CLI" add_job {child} waits\nsleep 300\n')
    parent = server.add_job(driver, env=family_env(server))
    wait_until(lambda: len(jobs_by_id(server)) == 5, what="the family to be added")
    server.wait_for_counts(running=3, waiting=2)
    out = server.ok("kill", "--grace", "1s", parent)
    assert out.startswith("killed jobs")
    jobs = jobs_by_id(server)
    assert {entry["result"] for entry in jobs.values()} == {"killed"}, jobs
    for entry in jobs.values():
        pid = child_pid(server, entry["id"])
        assert pid is None or not process_alive(pid)
    server.fails("kill", parent, expect=f"job {parent} and its family have already ended")


def test_wait_children_exits_non_zero_if_a_child_failed(server):
    server.ok("add_slave", "--slots", "3", "w1")
    outcome = server.write_script("outcome.sh", 'exit "$1"\n')
    waiter = driver_script(server, f'add {outcome} "$1" > /dev/null\nadd {outcome} 0 > /dev/null\n'
                                   '"$PY" "$CLI" wait --children\n'
                                   'echo "wait: $?" > "$RESULTS/wait-$JOB_ID"\n')
    good = server.add_job(waiter, "0", env=family_env(server))
    bad = server.add_job(waiter, "3", env=family_env(server))
    server.ok("wait", "-q", good)
    server.run("wait", "-q", bad)
    assert (server.results / f"wait-{good}").read_text() == "wait: 0\n"
    assert (server.results / f"wait-{bad}").read_text() == "wait: 1\n"
    log = (server.log_dir / f"job_{bad}.txt").read_text()
    assert "did not succeed" in log and "failed (exit code 3)" in log
    jobs = jobs_by_id(server)
    assert sorted(entry["result"] for entry in jobs.values() if entry["parent"] == bad) == \
        ["failed", "succeeded"]   # waited for: neither was killed by its parent's end


def test_children_of_a_parent_that_ended_while_the_server_was_down_are_settled_on_start(
        server):
    server.ok("add_slave", "--slots", "4", "w1")
    child = child_script(server)
    gate = server.root / "gate"
    driver = driver_script(server, f'add {child} a\nadd {child} b\nadd --delay 1h {child} later\n'
                                   'touch "$RESULTS/added"\n'
                                   f'while [ ! -e {gate} ]; do sleep 0.05; done\n')
    parent = server.add_job(driver, env=family_env(server))
    wait_until(lambda: child_pid(server, parent + 1) and child_pid(server, parent + 2) and
               (server.results / "added").exists(), what="two children to run, one to wait")
    pid = server.server_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not process_alive(pid), what="the server to die")
    gate.touch()
    wait_until((server.data_dir / "run" / f"{parent}-1.exit").exists,
               what="the parent to end while the server is down")
    assert process_alive(child_pid(server, parent + 1))
    server.ok("start")
    server.wait_for_counts(succeeded=1, killed=3)
    jobs = jobs_by_id(server)
    assert [jobs[job_id]["reason"] for job_id in (parent + 1, parent + 2, parent + 3)] == \
        [f"parent {parent} ended"] * 3
    for job_id in (parent + 1, parent + 2):
        wait_until(lambda: not process_alive(child_pid(server, job_id)),
                   what=f"child {job_id} to end")


def test_bad_family_input_is_one_line_and_changes_nothing(server):
    server.fails("wait", "--children", expect="JOB_ID is not set")
    server.fails("add_job", "--nohup", server.script, expect="--nohup is for jobs added")
    server.fails("wait", "--children", "1", expect="either job ids or --children")
    server.fails("wait", "--children", env=dict(server.env, JOB_ID="1"),
                 expect="not one of running job 1's")
    server.fails("jobs", "--tree", "--last", "3", expect="--tree shows whole families")
    assert server.status()["counts"]["waiting"] == 0
    assert json.loads(server.ok("jobs", "--json")) == []
    assert "no families" in server.ok("jobs", "--tree")


def test_children_whose_parent_ended_without_settling_them_are_settled_on_start(server):
    # What a data dir edited by hand, or written by a cli.py that stopped between a
    # parent's end and its children's, looks like: settled by the sweep at start.
    server.ok("pause")
    parent = server.add_job(server.script)
    child = server.add_job(server.script)
    server.ok("kill", parent)
    server.ok("stop")
    database = sqlite3.connect(server.data_dir / "state.db")
    with database:
        database.execute("UPDATE jobs SET parent = ? WHERE id = ?", (parent, child))
    database.close()
    server.ok("start")
    shown = job(server, child)
    assert (shown["result"], shown["reason"], shown["parent"]) == \
        ("killed", f"parent {parent} ended", parent)


def test_a_child_retried_after_its_parent_ended_runs_on_its_own(server):
    server.ok("add_slave", "--slots", "2", "w1")
    gate = server.root / "gate"
    child = server.write_script("gated.sh", f'while [ ! -e {gate} ]; do sleep 0.05; done\n')
    driver = driver_script(server, f'add {child} a\n')
    parent = server.add_job(driver, env=family_env(server))
    server.wait_for_counts(succeeded=1, killed=1)
    killed = parent + 1
    assert job(server, killed)["reason"] == f"parent {parent} ended"
    gate.touch()
    server.ok("pause")
    server.ok("retry", killed)
    server.ok("stop")
    server.ok("start")   # the sweep at start leaves it waiting
    assert job(server, killed)["state"] == "waiting"
    server.ok("resume")
    server.ok("wait", "-q", killed)
    shown = job(server, killed)
    assert (shown["result"], shown["parent"], shown["nohup"]) == ("succeeded", parent, True)


def test_a_child_added_by_a_process_that_left_the_jobs_session_is_still_a_child(server):
    # Out of the job's session (setsid) and orphaned (its parent, a subshell, has
    # exited): what it descends from now is the job's supervisor, a subreaper.
    server.ok("add_slave", "--slots", "2", "w1")
    child = child_script(server)
    done = server.results / "added"
    driver = driver_script(server, f'( setsid sh -c \'"$PY" "$CLI" add_job -e RUN=0 {child} x '
                                   f'> "$RESULTS/out"; touch {done}\' & )\n'
                                   f'while [ ! -e {done} ]; do sleep 0.05; done\n')
    parent = server.add_job(driver, env=family_env(server))
    server.ok("wait", "-q", parent)
    added = int((server.results / "out").read_text())
    assert job(server, added)["parent"] == parent


def test_a_child_after_its_parent_runs_once_the_parent_succeeded_as_usual(server):
    server.ok("add_slave", "--slots", "3", "w1")
    child = child_script(server)
    outcome = server.write_script("outcome.sh", 'exit "$1"\n')
    # The --after child is not waited for by wait --children: it could never start.
    driver = driver_script(server, f'add -e RUN=0 --after "$JOB_ID" {child} collect\n'
                                   f'add {outcome} 0\n"$PY" "$CLI" wait --children || exit 9\n'
                                   f'add {child} cut-off\nexit "$1"\n')
    good = server.add_job(driver, "0", env=family_env(server))
    server.ok("wait", "-q", good)
    bad = server.add_job(driver, "4", env=family_env(server))
    server.run("wait", "-q", bad)
    jobs = jobs_by_id(server)
    assert jobs[good]["result"] == "succeeded"
    collect, step, cut_off = jobs[good]["children"]
    wait_until(lambda: jobs_by_id(server)[collect]["state"] == "done",
               what="the --after child to run")
    jobs = jobs_by_id(server)
    assert [jobs[job_id]["result"] for job_id in (collect, step, cut_off)] == \
        ["succeeded", "succeeded", "killed"]
    collect, _, cut_off = jobs[bad]["children"]
    assert jobs[bad]["result"] == "failed"
    assert (jobs[collect]["result"], jobs[collect]["reason"]) == \
        ("skipped", f"job {bad}, which it runs --after, ended failed")
    assert (jobs[cut_off]["result"], jobs[cut_off]["reason"]) == \
        ("killed", f"parent {bad} ended")
