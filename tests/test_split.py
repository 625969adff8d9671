"""Split jobs (add_job --slots K --split) and start --placement, through real sshd workers."""
import json
import os
import signal
import sys

import importlib.util
import pathlib

import pytest

from conftest import process_alive, wait_until

spec = importlib.util.spec_from_file_location(
    "cli", pathlib.Path(__file__).resolve().parent.parent / "cli.py")
cli_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli_module)

# One part of a split job: records what it saw (results/JOB-PART.json), waits until
# every part has started (a barrier, so that a job whose parts did not run at the
# same time fails), then sleeps $SLEEP or until the file $GATE exists, and exits
# with $EXIT_<PART> (default 0; a part with an exit code first waits for $FAIL_GATE).
PART_JOB = """#!{python}
import json, os, subprocess, sys, time
results = os.environ["RESULTS"]
# Each part reaches its own worker over ssh, as a real part would.
reached = subprocess.run(["ssh", os.environ["SLAVE_IP"], "echo reached $SSH_CONNECTION"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
job, part = os.environ["JOB_ID"], os.environ["SPLIT_PART"]
parts = len(os.environ["SPLIT_HOSTS"].split(","))
record = {{"part": int(part), "slave": os.environ["SLAVE_IP"], "slots": os.environ["SLOTS"],
          "hosts": os.environ["SPLIT_HOSTS"], "pid": os.getpid(), "attempt":
          os.environ["JOB_ATTEMPT"], "reached": reached}}
path = os.path.join(results, f"{{job}}-{{part}}.json")
with open(path + ".tmp", "w") as out:
    json.dump(record, out)
os.replace(path + ".tmp", path)
deadline = time.time() + 20
while not all(os.path.exists(os.path.join(results, f"{{job}}-{{n}}.json"))
              for n in range(parts)):
    if time.time() > deadline:
        print("part", part, "ran alone")
        sys.exit(9)
    time.sleep(0.02)
print("part", part, "of job", job, "on", os.environ["SLAVE_IP"], "slots", os.environ["SLOTS"])
sys.stdout.flush()
code = int(os.environ.get("EXIT_" + part, "0"))
if code:
    while os.environ.get("FAIL_GATE") and not os.path.exists(os.environ["FAIL_GATE"]):
        time.sleep(0.02)
    sys.exit(code)
gate = os.environ.get("GATE")
end = time.time() + float(os.environ.get("SLEEP", "0"))
while (gate and not os.path.exists(gate)) or time.time() < end:
    time.sleep(0.02)
"""


@pytest.fixture
def parts(server):
    """The part script, in SERVER's directory."""
    return server.write_script("part.py", PART_JOB.format(python=sys.executable).split("\n", 1)[1],
                               shell=sys.executable)


def part_records(cli, job_id):
    return sorted((json.loads(path.read_text()) for path in cli.results.glob(f"{job_id}-*.json")),
                  key=lambda record: record["part"])


def job(cli, job_id):
    return json.loads(cli.ok("jobs", job_id, "--json"))


def slots_in_use(cli):
    return {slave["ip"]: slave["slots_in_use"] for slave in cli.status()["slaves"]}


def test_a_split_job_of_6_slots_over_two_workers_of_4_runs_as_4_plus_2_at_once(server, parts):
    server.ok("add_slave", "--slots", "4", "w1", "w2")
    gate = server.root / "gate"
    job_id = server.add_job("--slots", "6", "--split", parts,
                            env=dict(server.env, GATE=str(gate)))
    wait_until(lambda: len(part_records(server, job_id)) == 2, what="both parts to start")
    status = server.status()
    assert slots_in_use(server) == {"w1": 4, "w2": 2}
    assert [slave["running_jobs"][0]["id"] for slave in status["slaves"]] == [job_id, job_id]
    assert "w1+w2" in server.ok("status")
    gate.touch()
    server.ok("wait", "-q", job_id)
    first, second = part_records(server, job_id)
    assert (first["slave"], first["slots"]) == ("w1", "0,1,2,3")
    assert (second["slave"], second["slots"]) == ("w2", "0,1")
    assert first["hosts"] == second["hosts"] == "w1:4,w2:2"
    # w1 and w2 are sshd servers on loopback ports of their own: each part got to its own.
    assert first["reached"].startswith("reached ") and second["reached"].startswith("reached ")
    assert first["reached"].split()[-1] != second["reached"].split()[-1]
    ended = job(server, job_id)
    assert ended["result"] == "succeeded" and ended["split"] is True
    assert ended["parts"] == [["w1", [0, 1, 2, 3]], ["w2", [0, 1]]]
    assert ended["attempts"][0]["parts"] == ended["parts"]
    shown = server.ok("jobs", job_id)
    assert "w1 (4) + w2 (2)" in shown and "succeeded on w1+w2" in shown
    assert [entry["id"] for entry in json.loads(server.ok("jobs", "--worker", "w2", "--json"))] \
        == [job_id]
    log = pathlib_text(ended["log"])
    assert "part 1 of 2 on w1" in log and "part 2 of 2 on w2" in log
    assert slots_in_use(server) == {"w1": 0, "w2": 0}


def pathlib_text(path):
    with open(path) as stream:
        return stream.read()


def test_a_split_job_that_one_worker_holds_runs_there_as_one_part(server, parts):
    server.ok("add_slave", "--slots", "4", "w1")
    server.ok("add_slave", "--slots", "8", "w2")
    job_id = server.add_job("--slots", "6", "--split", parts)
    server.ok("wait", "-q", job_id)
    record, = part_records(server, job_id)
    assert (record["slave"], record["slots"], record["hosts"]) == ("w2", "0,1,2,3,4,5", "w2:6")


def test_one_part_failing_fails_the_job_and_ends_the_others(server, parts):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    job_id = server.add_job("--slots", "4", "--split", parts,
                            env=dict(server.env, SLEEP="60", EXIT_1="3"))
    server.run("wait", "-q", job_id)   # (exits 1: the job failed)
    ended = job(server, job_id)
    assert (ended["result"], ended["exit_code"]) == ("failed", 3)
    assert "part 2 of 2 on w2 exited with status 3" in ended["reason"]
    first, _ = part_records(server, job_id)
    wait_until(lambda: not process_alive(first["pid"]), what="the other part to be ended")
    assert slots_in_use(server) == {"w1": 0, "w2": 0}


def test_kill_ends_every_part(server, parts):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    job_id = server.add_job("--slots", "4", "--split", parts, env=dict(server.env, SLEEP="60"))
    wait_until(lambda: len(part_records(server, job_id)) == 2, what="both parts to start")
    server.ok("kill", "--grace", "1", job_id)
    server.run("wait", "-q", job_id)
    assert job(server, job_id)["result"] == "killed"
    for record in part_records(server, job_id):
        wait_until(lambda: not process_alive(record["pid"]), what=f"part {record['part']} to end")


def test_a_timeout_ends_every_part_and_a_retry_runs_the_whole_job_again(server, parts):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    job_id = server.add_job("--slots", "4", "--split", "--timeout", "1s", "--retries", "1",
                            parts, env=dict(server.env, SLEEP="60"))
    server.run("wait", "-q", job_id, timeout=90)
    ended = job(server, job_id)
    assert [attempt["result"] for attempt in ended["attempts"]] == ["timed_out", "timed_out"]
    assert all(attempt["parts"] == [["w1", [0, 1]], ["w2", [0, 1]]]
               for attempt in ended["attempts"])
    records = part_records(server, job_id)   # (the second attempt's, written over the first's)
    assert {record["attempt"] for record in records} == {"2"}
    for record in records:
        wait_until(lambda: not process_alive(record["pid"]), what=f"part {record['part']} to end")
    assert slots_in_use(server) == {"w1": 0, "w2": 0}


def test_a_split_job_waits_for_all_its_slots_at_once_ahead_of_small_jobs(server, parts):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    gate = server.root / "gate"
    blocker = server.add_job("--on", "w1", server.write_script(
        "blocker.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'))
    server.wait_for_counts(running=1)
    split = server.add_job("--slots", "4", "--split", parts)
    small = [server.add_job(server.script) for _ in range(3)]
    waiting = {entry["id"]: entry for entry in server.status()["job_waitlist"]}
    assert waiting[split]["waiting_for"] == "4 free slots at once (--split)"
    # No part starts alone, and the small jobs behind it do not take the slots it
    # waits for (w1's free one, w2's two).
    assert part_records(server, split) == [] and server.runs() == []
    assert slots_in_use(server) == {"w1": 1, "w2": 0}
    gate.touch()
    server.ok("wait", "-q", blocker, split, *small)
    assert len(part_records(server, split)) == 2
    assert all(job(server, job_id)["result"] == "succeeded" for job_id in [split, *small])
    split_start = iso_seconds(job(server, split)["started_at"])
    assert all(iso_seconds(job(server, job_id)["started_at"]) >= split_start
               for job_id in small)


def iso_seconds(text):
    from datetime import datetime
    return datetime.fromisoformat(text).timestamp()


def test_a_server_killed_mid_job_adopts_the_split_job_and_a_part_failing_meanwhile_fails_it(
        server, parts):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    gate = server.root / "gate"
    adopted = server.add_job("--slots", "4", "--split", parts,
                             env=dict(server.env, GATE=str(gate)))
    wait_until(lambda: len(part_records(server, adopted)) == 2, what="both parts to start")
    os.kill(server.server_pid(), signal.SIGKILL)
    wait_until(lambda: server.run("status").returncode != 0, what="the server to be gone")
    server.ok("start")
    assert slots_in_use(server) == {"w1": 2, "w2": 2}
    assert [entry["id"] for entry in server.status()["running_jobs"]] == [adopted]
    gate.touch()
    server.ok("wait", "-q", adopted)
    assert job(server, adopted)["result"] == "succeeded"

    # A part fails while no server runs: the supervisor ends the other part, and
    # the restarted server records the job as failed.
    fail_gate = server.root / "fail"
    fails = server.add_job("--slots", "4", "--split", parts,
                           env=dict(server.env, SLEEP="60", EXIT_1="5",
                                    FAIL_GATE=str(fail_gate)))
    wait_until(lambda: len(part_records(server, fails)) == 2, what="both parts to start")
    os.kill(server.server_pid(), signal.SIGKILL)
    wait_until(lambda: server.run("status").returncode != 0, what="the server to be gone")
    fail_gate.touch()
    first = part_records(server, fails)[0]
    wait_until(lambda: not process_alive(first["pid"]), what="the other part to be ended")
    server.ok("start")
    server.run("wait", "-q", fails)
    ended = job(server, fails)
    assert (ended["result"], ended["exit_code"]) == ("failed", 5)
    assert slots_in_use(server) == {"w1": 0, "w2": 0}


def test_split_mistakes_are_one_line_and_change_nothing(server, parts):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    server.ok("pause")
    before = server.status()
    server.fails("add_job", "--split", parts, expect="--split needs --slots K of 2 or more")
    server.fails("add_job", "--split", "--slots", "1", parts, expect="--split needs --slots")
    server.fails("add_job", "--split", "--slots", "3", "--on", "w2", parts,
                 expect="the workers in --on have 2 slots together, fewer than --slots 3")
    server.fails("add_job", "--split", "--slots", "5", parts,
                 expect="the workers have 4 slots together, fewer than --slots 5")
    server.fails("start", "--placement", "other", expect="invalid choice: 'other'")
    # The server checks again what a client sends.
    for params, expect in (({"split": True}, "--split needs --slots"),
                           ({"split": "yes", "slots_wanted": 2}, "'split' must be true or false"),
                           ({"split": True, "slots_wanted": 5}, "4 slots together")):
        with pytest.raises(cli_module.UserError, match=expect):
            cli_module.request(str(server.data_dir), "add_job", script=str(parts), args=[],
                               cwd=str(server.root), environment={}, **params)
    after = server.status()
    assert after["job_waitlist"] == before["job_waitlist"] == []
    assert after["placement"] == "spread"


def test_placement_pack_takes_the_smallest_worker_that_holds_a_job_and_is_kept(cli):
    cli.ok("start", "--placement", "pack")
    cli.ok("add_slave", "--slots", "16", "w1")
    cli.ok("add_slave", "--slots", "4", "w2")
    assert cli.status()["placement"] == "pack"
    assert "placement pack" in cli.ok("status")
    packed = cli.add_job("--slots", "4", cli.script)
    cli.ok("wait", "-q", packed)
    assert cli.record(packed)["slave"] == "w2"
    cli.ok("stop")
    cli.ok("start")   # remembered
    assert cli.status()["placement"] == "pack"
    cli.ok("stop")
    cli.ok("start", "--placement", "spread")
    spread = cli.add_job("--slots", "4", cli.script)
    cli.ok("wait", "-q", spread)
    assert cli.record(spread)["slave"] == "w1"


def test_a_split_job_keeps_split_through_status_json_and_load_status(server, parts):
    server.ok("add_slave", "--slots", "2", "w1", "w2")
    server.ok("pause")
    server.add_job("--slots", "4", "--split", parts)
    document = server.root / "state.json"
    document.write_text(server.ok("status", "--json"))
    server.ok("load_status", document)
    loaded, = server.status()["job_waitlist"]
    assert (loaded["split"], loaded["slots_wanted"], loaded["parts"]) == (True, 4, None)
    server.ok("resume")
    server.ok("wait", "-q", loaded["id"])
    assert len(part_records(server, loaded["id"])) == 2
