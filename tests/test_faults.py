"""Fault injection: the promise that nothing is lost, tried with real faults.

Real server processes, real sshd workers, real kill -9.  Each attempt of each
job appends a line to a file as it starts and as it ends (O_APPEND writes of
a few bytes are atomic), so the tests see exactly what ran, how often and
when, whatever the server recorded.
"""
import json
import os
import random
import signal
import time

import pytest

from conftest import process_alive, wait_until

# MODE decides how the job behaves; every attempt logs "start" and "end" lines.
STORM_JOB = """#!/bin/sh
echo "$JOB_ID $JOB_ATTEMPT start $(date +%s.%N)" >> "$RESULTS/attempts.log"
case "$1" in
    ok)    sleep "$2"; code=0 ;;
    flaky) sleep "$2"; if [ "$JOB_ATTEMPT" -ge 2 ]; then code=0; else code=3; fi ;;
    fail)  sleep "$2"; code=4 ;;
    slow)  sleep 30; code=0 ;;
esac
echo "$JOB_ID $JOB_ATTEMPT end $(date +%s.%N)" >> "$RESULTS/attempts.log"
exit $code
"""


def read_attempts(cli):
    """{job id: [(attempt, start, end or None)]} from what the jobs themselves wrote."""
    runs = {}
    path = cli.results / "attempts.log"
    for line in path.read_text().splitlines() if path.exists() else []:
        job_id, attempt, what, moment = line.split()
        entry = runs.setdefault(int(job_id), {}).setdefault(int(attempt), [None, None])
        entry[0 if what == "start" else 1] = float(moment)
    return {job_id: [(attempt, *times) for attempt, times in sorted(attempts.items())]
            for job_id, attempts in runs.items()}


def kill_server(cli):
    pid = cli.server_pid()
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
               open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z",
               what="the server to die")


def test_kill_9_storm_loses_nothing_and_runs_nothing_twice(server):
    """Fault 1: 500 jobs through 4 workers while the server is killed at random."""
    rng = random.Random(20261123)
    script = server.write_script("storm.sh", STORM_JOB.split("\n", 1)[1])
    server.ok("add_slave", "--slots", "4", "w1", "w2", "w3")
    server.ok("add_slave", "--slots", "4", "--skip_ssh_auth_check", "w4")

    def queue(*args, count, mode):
        sleeps = [f"{rng.uniform(0, 0.3):.2f}" for _ in range(count)]
        array = int(server.ok("add_job", *args, script, mode, ":::", *sleeps))
        for task in range(1, count + 1):   # the array's id is its first job's
            names[array + task - 1] = f"{array}.{task}"
        return list(range(array, array + count))

    names = {}

    plain = queue(count=300, mode="ok")
    flaky = queue("--retries", "2", count=100, mode="flaky")
    failing = queue("--retries", "1", count=50, mode="fail")
    slow = queue("--timeout", "1s", count=25, mode="slow")
    prerequisites = rng.sample(plain[:150], 25)
    dependents = [server.add_job("--after", names[prerequisite], script, "ok", "0")
                  for prerequisite in prerequisites]
    total = 500

    kills = 0
    deadline = time.monotonic() + 240
    while True:
        time.sleep(rng.uniform(0.2, 0.7))
        counts = server.status()["counts"]
        if counts["waiting"] == 0 and counts["running"] == 0 and kills >= 10:
            break
        assert time.monotonic() < deadline, f"still {counts} after {kills} kills"
        kill_server(server)
        kills += 1
        server.ok("start")

    jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    assert len(jobs) == total
    attempts = read_attempts(server)
    expected_runs = {**{job_id: 1 for job_id in plain + slow + dependents},
                     **{job_id: 2 for job_id in flaky + failing}}
    ran = {job_id: len(attempts.get(job_id, [])) for job_id in jobs}
    missing = [job_id for job_id, count in ran.items() if count < expected_runs[job_id]]
    twice = [job_id for job_id, count in ran.items() if count > expected_runs[job_id]]
    assert not missing and not twice, f"{kills} kills: never ran {missing}, ran too often {twice}"
    for job_id, runs in attempts.items():
        assert [attempt for attempt, _, _ in runs] == list(range(1, len(runs) + 1))

    def outcome(job_id):
        job = jobs[job_id]
        return job["result"], job["exit_code"]
    assert {outcome(job_id) for job_id in plain + dependents} == {("succeeded", 0)}
    assert {outcome(job_id) for job_id in flaky} == {("succeeded", 0)}
    assert {outcome(job_id) for job_id in failing} == {("failed", 4)}
    assert {jobs[job_id]["result"] for job_id in slow} == {"timed_out"}
    for job_id in flaky + failing:
        history = json.loads(server.ok("jobs", names[job_id], "--json"))["attempts"]
        codes = [attempt["exit_code"] for attempt in history]
        assert codes == ([3, 0] if job_id in flaky else [4, 4]), (job_id, history)
    for prerequisite, dependent in zip(prerequisites, dependents):
        (_, _, prerequisite_end), = attempts[prerequisite]
        (_, dependent_start, _), = attempts[dependent]
        assert dependent_start >= prerequisite_end, f"job {dependent} ran before {prerequisite}"
    assert kills >= 10


def test_fifty_clients_at_once_are_all_answered_and_nothing_is_recorded_twice(server):
    """Fault 4: 50 clients at once running add_job, status, remove_job and kill."""
    from concurrent.futures import ThreadPoolExecutor
    server.ok("add_slave", "--slots", "4", "w1", "w2")
    slow = dict(server.env, SLEEP="20")

    def client(number):
        kind = number % 4
        if kind == 1:
            result = server.run("status", "--json")
            assert result.returncode == 0, result.stderr
            json.loads(result.stdout)
            return kind, None, None
        added = server.run("add_job", server.script, f"client-{number}",
                           env=slow if kind == 3 else None)
        assert added.returncode == 0, added.stderr
        job_id = int(added.stdout)
        if kind == 0:
            return kind, job_id, None
        follow = server.run("remove_job" if kind == 2 else "kill", job_id)
        assert "Traceback" not in follow.stderr
        # remove_job races the job's start: it may be running, or even done, by then.
        assert follow.returncode == 0 or kind == 2 and (
            "is running" in follow.stderr or "has already ended" in follow.stderr), follow.stderr
        return kind, job_id, "is running" if "is running" in follow.stderr else follow.returncode

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(client, range(50)))
    submitted = [job_id for _, job_id, _ in results if job_id is not None]
    assert len(submitted) == len(set(submitted)) == sum(1 for n in range(50) if n % 4 != 1)
    removed = {job_id for kind, job_id, code in results if kind == 2 and code == 0}
    for kind, job_id, code in results:
        if kind == 2 and code == "is running":
            server.run("kill", job_id)   # (it may have ended meanwhile)
    server.wait_for_counts(waiting=0, running=0, timeout=60)
    recorded = [job["id"] for job in json.loads(server.ok("jobs", "--json"))]
    assert sorted(recorded) == sorted(set(submitted) - removed)
    killed = {job_id for kind, job_id, _ in results if kind == 3}
    results_by_id = {job["id"]: job["result"] for job in json.loads(server.ok("jobs", "--json"))}
    assert {results_by_id[job_id] for job_id in killed} == {"killed"}
    assert len(server.runs()) == len(set(server.runs())), "a job ran twice"


# Forks a TERM-ignoring child and grandchild, prints OUTPUT bytes, then sleeps on.
UNRULY_JOB = """trap '' TERM
( trap '' TERM; sleep 300 & echo $! >> "$RESULTS/$JOB_ID.pids"; sleep 300 ) &
echo $! >> "$RESULTS/$JOB_ID.pids"
echo $$ >> "$RESULTS/$JOB_ID.pids"
yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c "$OUTPUT"
touch "$RESULTS/$JOB_ID.printed"
while :; do sleep 1; done
"""


def resident_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_jobs_that_fork_ignore_term_and_print_a_gigabyte_still_end_and_cost_no_memory(server):
    """Fault 8: kill and --timeout end the whole process group; 1 GB of output is not buffered."""
    server.ok("add_slave", "--slots", "2", "w1")
    script = server.write_script("unruly.sh", UNRULY_JOB)
    server.ok("status")
    before = resident_kb(server.server_pid())
    gigabyte = dict(server.env, OUTPUT=str(10 ** 9))
    killed = server.add_job(script, env=gigabyte)
    timed_out = server.add_job("--timeout", "2s", script, env=dict(server.env, OUTPUT="1000"))
    wait_until((server.results / f"{killed}.printed").exists, timeout=60,
               what="the job to print 1 GB")
    assert server.ok("kill", "--grace", "1s", killed).strip().endswith(f"killed job {killed}")
    server.fails("wait", "-q", timed_out, timeout=30, expect="timed_out")
    jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    assert (jobs[killed]["result"], jobs[killed]["signal"]) == ("killed", 9)
    assert (jobs[timed_out]["result"], jobs[timed_out]["signal"]) == ("timed_out", 9)
    for job_id in (killed, timed_out):
        pids = [int(pid) for pid in (server.results / f"{job_id}.pids").read_text().split()]
        assert len(pids) == 3
        wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=5,
                   what=f"every process of job {job_id} to be gone")
    assert os.path.getsize(jobs[killed]["log"]) >= 10 ** 9
    growth = resident_kb(server.server_pid()) - before
    assert growth < 2048, f"the server grew by {growth} KB while a job printed 1 GB"
    os.unlink(jobs[killed]["log"])


# Logs its start, then reaches its worker over ssh twice, as a real job script does.
SSH_JOB = """#!/bin/sh
echo "$JOB_ID $JOB_ATTEMPT $SLAVE_IP $(date +%s.%N)" >> "$RESULTS/starts.log"
ssh "$SLAVE_IP" true || exit 255
sleep 0.3
ssh "$SLAVE_IP" true || exit 255
"""


def test_a_worker_whose_sshd_dies_mid_run_is_avoided_until_it_returns(cli, workers):
    """Fault 3: w2's sshd (and every connection to it) dies while 200 jobs flow through 3 workers."""
    cli.ok("start", "--check-interval", "0.5s")
    cli.ok("add_slave", "--slots", "2", "w1", "w2", "w3")
    script = cli.write_script("reach.sh", SSH_JOB.split("\n", 1)[1])
    cli.ok("add_job", "--retries", "3", script, ":::", *range(200))

    def done():
        counts = cli.status()["counts"]
        return counts.get("succeeded", 0) + counts.get("failed", 0)

    def health(name):
        return next(slave for slave in cli.status()["slaves"] if slave["ip"] == name)["health"]

    try:
        wait_until(lambda: done() >= 20, what="20 jobs done")
        workers[1].stop()
        wait_until(lambda: health("w2") == "down", timeout=10, what="w2 marked down")
        down_seen = time.time()
        finished_when_down = done()
        wait_until(lambda: done() >= finished_when_down + 40, timeout=30,
                   what="40 more jobs done on the other workers")
        back = time.time()
        workers[1].start()
        wait_until(lambda: health("w2") == "up", timeout=10, what="w2 back up")
    finally:
        workers[1].start()
    cli.wait_for_counts(waiting=0, running=0, timeout=60)
    jobs = json.loads(cli.ok("jobs", "--json"))
    failed = [json.loads(cli.ok("jobs", job["id"], "--json"))["attempts"]
              for job in jobs if job["result"] != "succeeded"]
    assert len(jobs) == 200 and not failed, failed
    starts = [line.split() for line in (cli.results / "starts.log").read_text().splitlines()]
    on_w2 = [float(moment) for _, _, worker, moment in starts if worker == "w2"]
    assert not [moment for moment in on_w2 if down_seen < moment < back], \
        "a job started on w2 while it was marked down"
    assert max(on_w2) > back, "no job went to w2 after it came back"


def server_memory_kb(pid, field):
    """VmRSS (now) or VmHWM (peak) of PID, in KB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.alone("counts the status answers a poller gets during a flood of a few seconds, "
                   "which other tests' load slows more than the flood")
def test_garbage_and_floods_on_the_socket_leave_the_server_serving_with_bounded_memory(server):
    """Fault 5: random bytes, half requests, a 100 MB line, huge requests at once, and
    thousands of connections opened and dropped, while a client keeps asking for status."""
    import socket
    import threading
    rng = random.Random(5)
    path = str(server.data_dir / "server.sock")
    server.ok("add_slave", "--skip_ssh_auth_check", "w9")
    pid = server.server_pid()
    base_rss, base_fds = server_memory_kb(pid, "VmRSS"), open_fds(pid)
    answered, failures, stop = [0], [], threading.Event()

    def poll_status():
        while not stop.is_set():
            result = server.run("status", "--json")
            if result.returncode == 0 and json.loads(result.stdout)["slaves"]:
                answered[0] += 1
            else:
                failures.append(result.stderr)

    def connect():
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(path)   # blocking, as cli.py's: waits while the backlog is full
        connection.settimeout(30)
        return connection

    def flood(size, newline=False):
        """Send SIZE bytes of one line; the server's answer (which may come early, as cli.py's
        client reads it), or b'' if it hung up without one."""
        with connect() as connection:
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(size >> 20):
                    connection.sendall(chunk)
                if newline:
                    connection.sendall(b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                return connection.makefile("rb").readline()
            except ConnectionResetError:
                return b""

    poller = threading.Thread(target=poll_status)
    poller.start()
    try:
        for number in range(300):   # random bytes; every other client leaves without reading
            with connect() as connection:
                blob = rng.randbytes(rng.randrange(1, 5000))
                connection.sendall(blob + b"\n" * (number % 3 == 0))
                if number % 2 == 0 and number % 3 == 0:
                    assert b'"ok": false' in connection.makefile("rb").readline()
        for _ in range(300):        # half a request, then gone
            with connect() as connection:
                connection.sendall(b'{"command": "add_job", "params": {"script": "/bin/tr'[
                    :rng.randrange(1, 45)])
        for _ in range(5):          # thousands opened and dropped, 400 at a time
            held = [connect() for _ in range(400)]
            for connection in held:
                connection.close()
        assert b"request larger than" in flood(100 << 20)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:   # 8 x 60 MB at once: under the limit each
            replies = list(pool.map(lambda _: flood(60 << 20, newline=True), range(8)))
        assert all(reply.startswith(b'{"ok": false') for reply in replies if reply), replies
    finally:
        stop.set()
        poller.join()
    assert not failures, failures[:3]
    assert answered[0] >= 2
    assert server.status()["counts"]["waiting"] == 0, "garbage became a job"
    peak = server_memory_kb(pid, "VmHWM") - base_rss
    assert peak < 300 << 10, f"the server's memory peaked {peak >> 10} MB above its start"
    wait_until(lambda: open_fds(pid) <= base_fds, what="every dropped connection's fd closed")


def process_footprint(pid):
    """Resident KB, open fds, threads, and zombie children of PID."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    zombies = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit():
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                zombies += stat[0] == "Z" and int(stat[1]) == pid
        except OSError:
            continue
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "fds": open_fds(pid),
            "threads": int(fields["Threads"]), "zombies": zombies}


def children_named(pid, name):
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1]
                                        .split()[1]) == pid:
                if open(f"/proc/{entry}/comm").read().strip() == name:
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_soak_of_20000_jobs_leaks_no_memory_fds_threads_or_zombies(server):
    """Fault 10: 20,000 jobs with status and jobs pollers beside them; the server and
    its spawner end where they were after the first 1,000.

    (status --json is left out: it dumps every waiting job, so the server's
    high-water mark follows the queue's size; the README says so.)"""
    import threading
    server.ok("add_slave", "--slots", "4", "w1", "w2")
    server.ok("add_slave", "--slots", "4", "--skip_ssh_auth_check", "w3", "w4")
    script = server.write_script("quick.sh", "exit $(( $1 % 7 == 0 ))\n")
    total = 20000
    server.ok("add_job", script, ":::", *range(total))
    pid = server.server_pid()
    spawner, = children_named(pid, "cli.py spawner")
    stop, answers, failures = threading.Event(), [0], []

    def poll(*command):
        while not stop.is_set():
            result = server.run(*command)
            if result.returncode == 0:
                answers[0] += 1
            else:
                failures.append(result.stderr)

    pollers = [threading.Thread(target=poll, args=command) for command in
               (("status",), ("jobs", "--last", "50"), ("jobs", "3", "--json"))]
    for poller in pollers:
        poller.start()
    try:
        # Waits of 1,000 jobs at a time, so that each costs the server what the
        # first did; they exit 1 because some jobs fail on purpose.
        for first in range(1, total, 1000):
            assert server.run("wait", "-q", f"{first}-{first + 999}",
                              timeout=120).returncode == 1
            if first == 1:
                early = {"server": process_footprint(pid),
                         "spawner": process_footprint(spawner)}
    finally:
        stop.set()
        for poller in pollers:
            poller.join()
    time.sleep(0.5)   # the last supervisors' exits reaped
    late = {"server": process_footprint(pid), "spawner": process_footprint(spawner)}
    assert not failures, failures[:3]
    counts = server.status()["counts"]
    assert (counts["succeeded"], counts["failed"]) == (total - total // 7 - 1, total // 7 + 1)
    report = f"after 1,000 jobs {early}, after {total} {late}, {answers[0]} polls answered"
    print(report)
    for process in ("server", "spawner"):
        assert late[process]["rss_kb"] <= early[process]["rss_kb"] * 1.05 + 1024, report
        assert late[process]["fds"] <= early[process]["fds"], report
        assert late[process]["threads"] <= early[process]["threads"], report
        assert late[process]["zombies"] == 0, report
