"""GPUs, memory and named resources (add_slave --gpus/--mem/--resource, add_job --gpus/
--mem/--resource/--estimate), through real sshd workers declared with fake device ids:
no GPU is needed to test the bookkeeping."""
import json
import os
import signal
import sys
import time

import pytest

from conftest import wait_until

# A GPU job: reaches its worker over ssh, then holds each device it was given by
# creating held/WORKER-DEVICE exclusively (a second holder finds it there and
# records a clash), for $SLEEP seconds or until gates/JOB exists; appends what it
# saw to seen.log (one JSON line per attempt) and exits with $EXIT_<ATTEMPT>.
GPU_JOB = """
import json, os, subprocess, sys, time
results = os.environ["RESULTS"]
worker, job = os.environ["SLAVE_IP"], os.environ["JOB_ID"]
reached = subprocess.run(["ssh", worker, "true"], timeout=30).returncode
devices = [device for device in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if device]
share = os.environ.get("SHARE") == "1"
held, clashes = [], []
for device in devices:
    path = os.path.join(results, "held", f"{worker}-{device}")
    try:
        fd = os.open(path if not share else f"{path}-{job}", os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        held.append(path if not share else f"{path}-{job}")
    except FileExistsError:
        clashes.append(device)
record = {"job": int(job), "worker": worker, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "gpu_ids": os.environ.get("GPU_IDS"), "mem": os.environ.get("MEM"),
          "licence": os.environ.get("RESOURCE_LICENCE"), "attempt": os.environ["JOB_ATTEMPT"],
          "part": os.environ.get("SPLIT_PART"), "slots": os.environ["SLOTS"],
          "clashes": clashes, "reached": reached, "start": time.time()}
gate = os.path.join(results, "gates", job)
end = time.time() + float(os.environ.get("SLEEP", "0"))
while time.time() < end or (os.environ.get("GATED") and not os.path.exists(gate)):
    time.sleep(0.02)
record["end"] = time.time()
for path in held:
    os.unlink(path)
with open(os.path.join(results, "seen.log"), "a") as seen:
    seen.write(json.dumps(record) + "\\n")
sys.exit(int(os.environ.get("EXIT_" + os.environ["JOB_ATTEMPT"], "0")))
"""


@pytest.fixture
def gpu(server):
    """The GPU job script, in SERVER's directory (and its held/ and gates/ dirs)."""
    (server.results / "held").mkdir()
    (server.results / "gates").mkdir()
    return str(server.write_script("gpu.py", GPU_JOB, shell=sys.executable))


def seen(cli):
    path = cli.results / "seen.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def started(cli):
    """What the running jobs hold now, from status --json: {job id: grant}."""
    return {job["id"]: job["grant"] for job in cli.status()["running_jobs"]}


def open_gate(cli, job_id):
    (cli.results / "gates" / str(job_id)).write_text("")


def test_50_gpu_jobs_on_two_4_gpu_workers_never_share_a_device(server, gpu):
    server.ok("add_slave", "--slots", "8", "--gpus", "4", "w1", "w2")
    ones = server.add_job("--gpus", "1", "-e", "SLEEP=0.4", gpu, ":::", *range(25))
    twos = server.add_job("--gpus", "2", "-e", "SLEEP=0.4", gpu, ":::", *range(25))
    assert twos == ones + 25
    server.ok("wait", timeout=180)
    records = seen(server)
    assert len(records) == 50
    assert all(record["reached"] == 0 for record in records)
    # What the jobs saw themselves: never a device another job held at the time ...
    assert [record for record in records if record["clashes"]] == []
    intervals = {}
    for record in records:
        for device in record["cuda"].split(","):
            intervals.setdefault((record["worker"], device), []).append(
                (record["start"], record["end"]))
    for key, spans in intervals.items():
        spans.sort()
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), key
    # ... as many ids as asked for, distinct, the same in GPU_IDS, of devices 0-3.
    for record in records:
        devices = record["cuda"].split(",")
        assert len(set(devices)) == len(devices) == (1 if record["job"] < twos else 2)
        assert record["gpu_ids"] == record["cuda"] and set(devices) <= {"0", "1", "2", "3"}
    # Both workers were used, and all 8 devices.
    assert {key for key in intervals} == {(worker, str(device)) for worker in ("w1", "w2")
                                          for device in range(4)}


def test_a_4_gpu_job_starts_in_bounded_time_while_1_gpu_jobs_keep_coming(server, gpu):
    server.ok("add_slave", "--slots", "8", "--gpus", "4", "w1")
    first = server.add_job("--gpus", "1", "-e", "GATED=1", gpu, ":::", 1, 2, 3)
    wait_until(lambda: len(started(server)) == 3, 20, "three 1-GPU jobs running")
    big = server.add_job("--gpus", "4", "-e", "SLEEP=0.5", gpu)
    later = [server.add_job("--gpus", "1", "-e", "SLEEP=1", gpu) for _ in range(2)]
    waiting = {job["id"]: job["waiting_for"] for job in server.status()["job_waitlist"]}
    for job_id in range(first, first + 3):
        open_gate(server, job_id)
    gates_open = time.time()
    while time.time() < gates_open + 3:   # 1-GPU jobs keep coming
        later.append(server.add_job("--gpus", "1", "-e", "SLEEP=1", gpu))
        time.sleep(0.2)
    server.ok("wait", timeout=120)
    records = {record["job"]: record for record in seen(server)}
    # It started as soon as the three that ran before it ended, not after the stream.
    assert records[big]["start"] - gates_open < 2.0
    assert records[big]["cuda"] == "0,1,2,3"
    assert all(records[job_id]["start"] >= records[big]["end"] - 0.05 for job_id in later)
    assert [record for record in records.values() if record["clashes"]] == []
    # While it waited, it said why, and so did the 1-GPU jobs behind it.
    assert waiting[big] == "needs 4 GPUs together; most free on one worker: 1", waiting
    assert waiting[later[0]] == f"room on w1 is kept for job {big}, ahead of it", waiting


def test_a_kill_9_of_the_server_keeps_every_assignment(server, gpu):
    server.ok("add_slave", "--slots", "4", "--gpus", "4", "w1", "w2")
    first = server.add_job("--gpus", "2", "-e", "GATED=1", gpu, ":::", *range(4))
    waiting = server.add_job("--gpus", "1", "-e", "SLEEP=0.2", gpu, ":::", *range(4))
    wait_until(lambda: len(started(server)) == 4, 30, "four 2-GPU jobs running")
    before = started(server)
    assert sorted(device for grant in before.values() for holding in grant.values()
                  for device in holding["gpus"]) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    os.kill(server.server_pid(), signal.SIGKILL)
    server.ok("start")
    assert started(server) == before
    status = server.status()
    assert {job["id"] for job in status["job_waitlist"]} == set(range(waiting, waiting + 4))
    assert all(slave["resources"]["gpus"]["used"] == 4 for slave in status["slaves"])
    for job_id in range(first, first + 4):
        open_gate(server, job_id)
    server.ok("wait", timeout=120)
    records = {record["job"]: record for record in seen(server)}
    assert len(records) == 8
    # Each gated job saw what the server holds for it, before and after the restart.
    for job_id, grant in before.items():
        (worker, holding), = grant.items()
        assert (records[job_id]["worker"], records[job_id]["cuda"]) == \
            (worker, ",".join(holding["gpus"]))
    # The waiting ones started only on devices the gated ones had let go.
    for job_id in range(waiting, waiting + 4):
        record = records[job_id]
        holder = next(records[other] for other, grant in before.items()
                      if record["worker"] in grant and
                      record["cuda"] in grant[record["worker"]]["gpus"])
        assert record["start"] >= holder["end"] - 0.05
    assert [record for record in records.values() if record["clashes"]] == []


def test_fractional_gpus_share_one_device(server, gpu):
    server.ok("add_slave", "--slots", "4", "--gpus", "1", "w1")
    halves = server.add_job("--gpus", "0.5", "-e", "GATED=1", "-e", "SHARE=1", gpu, ":::", 1, 2)
    wait_until(lambda: len(started(server)) == 2, 20, "two half-GPU jobs running")
    third = server.add_job("--gpus", "0.5", "-e", "SHARE=1", gpu)
    whole = server.add_job("--gpus", "1", gpu)
    status = server.status()
    assert status["slaves"][0]["resources"]["gpus"] == {
        "total": 1, "used": 1.0, "ids": ["0"], "in_use": {"0": 1.0}}
    reasons = {job["id"]: job["waiting_for"] for job in status["job_waitlist"]}
    assert reasons[third] == \
        "needs 0.5 GPU of one device; most free on one device: 0 GPU"
    assert reasons[whole] == "needs 1 GPU; most free on one worker: 0"
    assert "gpu 0 (0.5 each)" in server.ok("status")
    for job_id in (halves, halves + 1):
        open_gate(server, job_id)
    server.ok("wait", timeout=60)
    records = {record["job"]: record for record in seen(server)}
    assert records[halves]["cuda"] == records[halves + 1]["cuda"] == "0"
    # The two halves ran at once; the whole GPU waited for both.
    assert records[halves + 1]["start"] < records[halves]["end"]
    assert records[whole]["start"] >= max(records[halves]["end"], records[halves + 1]["end"]) \
        - 0.05
    server.fails("add_job", "--gpus", "1.5", gpu,
                 expect="more than one GPU must be whole GPUs (shares are of one device")


def test_a_worker_edited_down_drains_the_devices_it_lost(server, gpu):
    server.ok("add_slave", "--slots", "8", "--gpus", "4", "w1")
    holders = server.add_job("--gpus", "2", "-e", "GATED=1", gpu, ":::", 1, 2)
    wait_until(lambda: len(started(server)) == 2, 20, "two 2-GPU jobs running")
    held = {job_id: grant["w1"]["gpus"] for job_id, grant in started(server).items()}
    assert held == {holders: ["0", "1"], holders + 1: ["2", "3"]}
    out = server.ok("edit_slave", "w1", "--gpus", "0,1")
    assert "gpus 4/2 (0,1,2,3 in use)" in out
    ones = server.add_job("--gpus", "1", gpu, ":::", 1, 2, 3)
    time.sleep(0.5)
    assert len(started(server)) == 2   # nothing is double-booked on 0 or 1
    open_gate(server, holders + 1)     # lets go of 2 and 3, which w1 no longer has
    wait_until(lambda: len(started(server)) == 1, 20, "the holder of 2,3 ended")
    time.sleep(0.5)
    assert set(started(server)) == {holders}
    status = server.status()
    assert status["slaves"][0]["resources"]["gpus"]["used"] == 2
    open_gate(server, holders)
    server.ok("wait", timeout=60)
    records = {record["job"]: record for record in seen(server)}
    assert {records[job_id]["cuda"] for job_id in range(ones, ones + 3)} <= {"0", "1"}
    assert [record for record in records.values() if record["clashes"]] == []
    assert all(records[job_id]["start"] >= records[holders]["end"] - 0.05
               for job_id in range(ones, ones + 3))


def test_memory_named_resources_and_split_jobs_reach_the_environment(server, gpu):
    server.ok("add_slave", "--slots", "4", "--gpus", "2", "--mem", "64G", "--resource",
              "licence=2", "w1")
    server.ok("add_slave", "--slots", "4", "--gpus", "2", "w2")
    job = server.add_job("--gpus", "1", "--mem", "16G", "--resource", "licence=2", gpu)
    split = server.add_job("--slots", "3", "--split", "--gpus", "1", "--on", "w1,w2", gpu)
    server.ok("wait", timeout=60)
    records = seen(server)
    mine, = [record for record in records if record["job"] == job]
    assert (mine["worker"], mine["mem"], mine["licence"]) == ("w1", str(16 << 30), "2")
    parts = sorted((record["worker"], record["cuda"]) for record in records
                   if record["job"] == split)
    # 1 GPU per slot: 2 slots on one worker with both its devices, 1 on the other.
    assert sorted(len(cuda.split(",")) for _, cuda in parts) == [1, 2]
    assert {worker for worker, _ in parts} == {"w1", "w2"}
    shown = json.loads(server.ok("jobs", job, "--json"))
    assert shown["resources"] == {"gpus": 1, "mem": 16 << 30, "licence": 2}
    assert shown["grant"] == {"w1": {"gpus": [mine["cuda"]], "gpu_share": 1.0,
                                     "mem": 16 << 30, "licence": 2}}
    text = server.ok("jobs", job)
    assert "resources:    1 GPU, 16G memory, licence=2" in text
    assert f"grant:        gpu {mine['cuda']} 16G licence=2" in text


def test_a_retry_keeps_its_devices(server, gpu):
    server.ok("add_slave", "--slots", "4", "--gpus", "4", "w1")
    first = server.add_job("--gpus", "1", "-e", "GATED=1", gpu)
    wait_until(lambda: len(started(server)) == 1, 20, "the 1-GPU job running")
    retried = server.add_job("--gpus", "2", "--retries", "1", "--retry-delay", "1s",
                             "-e", "EXIT_1=3", gpu)
    wait_until(lambda: any(record["job"] == retried for record in seen(server)), 20,
               "the first attempt ended")
    open_gate(server, first)   # device 0 is free again before the retry
    server.ok("wait", retried, timeout=60)
    attempts = [record for record in seen(server) if record["job"] == retried]
    assert [(record["attempt"], record["cuda"]) for record in attempts] == \
        [("1", "1,2"), ("2", "1,2")]


def test_an_estimate_lets_a_short_job_backfill_before_a_reserved_big_one(server, gpu):
    server.ok("add_slave", "--slots", "8", "--gpus", "4", "w1")
    first = server.add_job("--gpus", "2", "--estimate", "1m", "-e", "GATED=1", gpu)
    wait_until(lambda: len(started(server)) == 1, 20, "the first job running")
    big = server.add_job("--gpus", "4", "-e", "SLEEP=0.2", gpu)
    short = server.add_job("--gpus", "1", "--estimate", "5s", "-e", "SLEEP=0.5", gpu)
    long = server.add_job("--gpus", "1", "--estimate", "2m", "-e", "SLEEP=0.5", gpu)
    plain = server.add_job("--gpus", "1", "-e", "SLEEP=0.5", gpu)
    wait_until(lambda: any(record["job"] == short for record in seen(server)), 30,
               "the short job backfilled and ended")
    open_gate(server, first)
    server.ok("wait", timeout=60)
    records = {record["job"]: record for record in seen(server)}
    # The short one ran beside the first, and was done before the big one started;
    # the long one and the one without an estimate waited for the big one.
    assert records[short]["end"] <= records[big]["start"] + 0.05
    assert all(records[job_id]["start"] >= records[big]["end"] - 0.05 for job_id in (long, plain))
    assert json.loads(server.ok("jobs", short, "--json"))["estimate"] == 5.0


def test_resources_survive_status_json_and_load_status(server, gpu, tmp_path):
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "4", "--gpus", "0,2,5", "--mem",
              "256G", "--resource", "licence=2", "w1")
    server.ok("pause")
    job = server.add_job("--gpus", "0.5", "--mem", "1G", "--resource", "licence=1",
                         "--estimate", "5m", gpu)
    document = tmp_path / "state.json"
    document.write_text(server.ok("status", "--json"))
    server.ok("remove_job", job)
    server.ok("remove_slave", "w1")
    server.ok("load_status", document)
    status = server.status()
    assert status["slaves"][0]["resources"] == {
        "gpus": {"total": 3, "used": 0, "ids": ["0", "2", "5"], "in_use": {}},
        "mem": {"total": 256 << 30, "used": 0}, "licence": {"total": 2, "used": 0}}
    loaded, = status["job_waitlist"]
    assert (loaded["resources"], loaded["estimate"]) == \
        ({"gpus": 0.5, "mem": 1 << 30, "licence": 1}, 300.0)
    assert "Resources: gpus 0/3, mem 0/256G, licence 0/2" in server.ok("status")


@pytest.mark.parametrize("args, message", [
    (["add_job", "--gpus", "8", "JOB"], "no worker has 8 GPUs (the most is 4)"),
    (["add_job", "--gpus", "1", "--on", "w2", "JOB"], "no worker in --on has 1 GPU"),
    (["add_job", "--resource", "matlab=1", "JOB"], "unknown resource 'matlab'"),
    (["add_job", "--resource", "licence=3", "JOB"], "no worker has licence=3 (the most is 2)"),
    (["add_job", "--mem", "1T", "JOB"], "no worker has 1T memory (the most is 64G)"),
    (["add_job", "--gpus", "-1", "JOB"], "ask for 1 to 1024 GPUs"),
    (["add_job", "--gpus", "x", "JOB"], "is not a number of GPUs"),
    (["add_job", "--gpus", "1.5", "JOB"], "more than one GPU must be whole GPUs"),
    (["add_job", "--gpus", "0,1", "JOB"], "a job asks for a number of GPUs, not device ids"),
    (["add_job", "--gpus", "0", "JOB"], "ask for 1 to 1024 GPUs"),
    (["add_job", "--mem", "lots", "JOB"], "is not an amount of memory"),
    (["add_job", "--resource", "licence=-1", "JOB"], "COUNT must be a whole number from 1"),
    (["add_job", "--resource", "licence", "JOB"], "write NAME=COUNT"),
    (["add_job", "--slots", "2", "--split", "--gpus", "0.5", "JOB"],
     "a split job takes whole GPUs per slot"),
    (["add_job", "--estimate", "soon", "JOB"], "--estimate"),
    (["add_slave", "--skip_ssh_auth_check", "--gpus", "0", "w3"], "a worker has 1 to 1024 GPUs"),
    (["add_slave", "--skip_ssh_auth_check", "--gpus", "1,1", "w3"], "distinct device ids"),
    (["add_slave", "--skip_ssh_auth_check", "--resource", "gpus=2", "w3"], "use --gpus"),
    (["edit_slave", "w1", "--gpus", "a,b"], "distinct device ids"),
    (["edit_slave", "w1", "--mem", "-"], "is not an amount of memory"),
])
def test_bad_resource_requests_are_refused_and_change_nothing(server, gpu, args, message):
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "2", "--gpus", "4", "--mem", "64G",
              "--resource", "licence=2", "w1")
    server.ok("add_slave", "--skip_ssh_auth_check", "w2")
    before = server.status()
    server.fails(*[gpu if arg == "JOB" else arg for arg in args], expect=message)
    after = server.status()

    def state(status):
        return ([(slave["ip"], slave["slots"], slave["resources"]) for slave in status["slaves"]],
                status["job_waitlist"], status["counts"])
    assert state(after) == state(before)
