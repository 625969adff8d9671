#!/usr/bin/env python3
"""cli.py beside GNU parallel and xargs, measured in the same run.

    bench/run                 # installs what it needs, then runs everything (3 runs each)
    bench/run --quick         # smaller sizes, 1 run: under a minute
    bench/run --only B1,B6

Workloads (medians over the runs, min-max beside them):
  B1 dispatch    N jobs of `exit 0`, 4 workers x 4 slots, one add_job ::: call
                 ended by wait; against parallel -j16 and xargs -P16
  B1D dashboard  B1's cli.py figure with no dashboard page open, with its event
                 stream read (a browser elsewhere), and with the page open in a
                 headless Chromium here, each on a fresh queue, in turns (needs
                 chromium: tests/setup.sh installs it)
  B2 SSH jobs    jobs running `ssh "$SLAVE_IP" true` on 4 real sshd workers x 4
                 slots, with and without connection reuse; against parallel
                 -S 4/w1,... with and without -M
  B3 latency     one add_job / status --json / status, run as ./cli.py (its
                 bytecode cached) and as python3 cli.py (compiled each time),
                 next to the floors: python -c pass, ./cli.py --version, and
                 starting Python and compiling cli.py
  B4D dashboard  the dashboard with N jobs waiting: the server's snapshot,
  with a queue   /metrics, a deep page of jobs, the page opened in Chromium
  B5 workers     500 workers x 2 slots, and 2,000 x 5 (registered without the SSH
                 check)
  B6 refill      time from a job's end to the next start on the same slot
  B7 placement   a mixed stream of 1-, 4- and 16-slot jobs of 1 s (every 0.5 s:
                 four 1-slot, one 4-slot, and every other time one 16-slot, ~85%
                 load) on 1x16 + 2x4 + 4x1 slots; median queue wait (start - --at)
                 of the 16-slot jobs and of all jobs, start --placement spread vs pack
  B8 backfill    a batch on 2 workers of 4 (fake) GPUs, N groups of one 4-GPU job
                 of 3 s then six 1-GPU jobs of 1-3 s, queued at once; GPU
                 utilisation, the whole batch's time, and how much later each
                 4-GPU job started than without --estimate: with right
                 estimates, and with 1 in 5 a third short (overrunning by 50%)
  B9 at once     1,000 and 5,000 jobs of `sleep` running at once on one worker:
                 the memory cli.py adds per running job (PSS of the server and
                 every process of ours, the jobs' own left out), processes per
                 job, the server's fds, the time to start them all, and add_job
                 and status --json while they run
It is a benchmark, not a test: it never fails on a number.  B4 (queue size)
is bench/bulk.py.
"""
import argparse
import contextlib
import http.client
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "cli.py"
sys.path.insert(0, str(ROOT / "tests"))
from sshd import SshSandbox  # noqa: E402 - the tests' sshd harness, not a copy of it


class Queue:
    """A cli.py server in a temp dir, driven through this interpreter."""

    def __init__(self, root, env, *start_args):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.env = dict(env, CLI_PY_DATA_DIR=str(root / ".data"))
        self.start_args = start_args

    def __call__(self, *args, check=True):
        result = subprocess.run([sys.executable, str(CLI), *map(str, args)], cwd=self.root,
                                env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise SystemExit(f"cli.py {' '.join(map(str, args[:4]))} failed: {result.stderr}")
        return result.stdout

    def __enter__(self):
        self("start", *self.start_args)
        return self

    def __exit__(self, *exc):
        self("stop", check=False)


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def script(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def numbers(root, count):
    """A file of COUNT lines, one job's argument each."""
    path = root / "numbers.txt"
    path.write_text("".join(f"{n}\n" for n in range(count)))
    return path


def queue_rate(queue, job, arguments, count):
    """Jobs per second from one add_job call to the end of wait."""
    return count / timed(lambda: (queue("add_job", "--args-file", arguments, job),
                                  queue("wait", "--quiet")))


def run_shell(command, env, cwd):
    subprocess.run(command, shell=True, check=True, env=env, cwd=cwd,  # noqa: S602 - our own fixed command
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, executable="/bin/bash")


# --- workloads: each returns {row name: (value, unit)} ------------------------

def b1_dispatch(sandbox, root, jobs):
    job, arguments = script(root, "exit0.sh", "exit 0\n"), numbers(root, jobs)
    figures = {}
    with Queue(root / "b1", sandbox.env()) as queue:
        queue("add_slave", "--skip_ssh_auth_check", "--slots", 4, "w1", "w2", "w3", "w4")
        figures["B1 cli.py (jobs/s)"] = queue_rate(queue, job, arguments, jobs)
    env = sandbox.env()
    figures["B1 GNU parallel -j16 (jobs/s)"] = jobs / timed(
        lambda: run_shell(f"parallel -j16 {job} :::: {arguments}", env, root))
    figures["B1 xargs -P16 (jobs/s)"] = jobs / timed(
        lambda: run_shell(f"xargs -P16 -n1 {job} < {arguments}", env, root))
    return figures


def b1_dashboard(sandbox, root, jobs):
    """B1's rate with no page open, with the page's event stream read by a client here
    (a browser elsewhere, through ssh -L: what the server and the dashboard's web
    server pay), and with the page open in Chromium on this machine (which also
    pays for the browser's drawing).  The order turns from run to run, so that a
    machine getting busier favours none."""
    job, arguments = script(root, "exit0.sh", "exit 0\n"), numbers(root, jobs)
    cases = list(B1D_CASES)
    turn = next(B1D_TURNS) % len(cases)
    figures = {}
    for case in cases[turn:] + cases[:turn]:
        with Queue(root / f"b1d-{len(figures)}", sandbox.env()) as queue:
            queue("add_slave", "--skip_ssh_auth_check", "--slots", 4, "w1", "w2", "w3", "w4")
            with B1D_CASES[case](queue) as browser:
                # CPU time is a steadier witness than the rate on a shared machine.
                processes = {"server": int((queue.root / ".data" / "server.pid").read_text())}
                helper = json.loads(queue("status", "--json"))["dashboard"].get("pid")
                if helper:
                    processes["dashboard's web server"] = helper
                before = {name: process_cpu(pid) for name, pid in processes.items()}
                browser_before = cpu_seconds(browser) if browser else 0.0
                figures[f"B1D {case} (jobs/s)"] = queue_rate(queue, job, arguments, jobs)
                for name, pid in processes.items():
                    figures[f"B1D CPU of the {name}, {case} (ms per 1,000 jobs)"] = \
                        (process_cpu(pid) - before[name]) * 1e6 / jobs
                if browser:
                    figures["B1D CPU of Chromium (ms per 1,000 jobs)"] = \
                        (cpu_seconds(browser) - browser_before) * 1e6 / jobs
    return figures


def process_cpu(pid):
    """CPU seconds of the one process PID (not its children)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def no_page(queue):
    yield None


@contextlib.contextmanager
def event_stream(queue):
    """The dashboard's /events read to the end of the run, as a browser's would be."""
    url = queue("dashboard", "--listen", "127.0.0.1:0").strip()
    base, token = url.split("/?token=")
    parts = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port)
    connection.request("GET", "/events", headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    threading.Thread(target=drain, args=(response,), daemon=True).start()
    yield None
    connection.close()


def drain(response):
    try:
        while response.readline():
            pass
    except (OSError, ValueError):
        pass   # closed at the end of the run


@contextlib.contextmanager
def chromium_page(queue):
    from browser import Browser
    url = queue("dashboard", "--listen", "127.0.0.1:0").strip()
    browser = Browser()
    try:
        page = browser.new_page()
        page.goto(url)
        deadline = time.monotonic() + 30
        while "Workers (4)" not in page.text():
            if time.monotonic() > deadline:
                raise SystemExit("B1D: the dashboard page did not show the workers")
            time.sleep(0.1)
        settle(browser.process.pid)
        yield browser.process.pid
    finally:
        browser.close()


def settle(pid, limit=30.0):
    """Wait (at most LIMIT seconds) until the processes of PID use under 5% of a CPU:
    a browser's start goes on for seconds after its first page, and an open page
    is what is measured, not a start."""
    deadline = time.monotonic() + limit
    used = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - used < 0.05:
            return
        used = now


def process_table():
    """Every process's /proc/PID/stat fields after its name, and {parent: [children]}."""
    stats, children = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    stats[int(entry)] = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(stats[int(entry)][1]), []).append(int(entry))
    return stats, children


def cpu_seconds(pid):
    """CPU time of PID and its descendants, from /proc."""
    stats, children = process_table()
    total, stack = 0.0, [pid]
    while stack:
        process = stack.pop()
        if process in stats:
            total += (int(stats[process][11]) + int(stats[process][12])) / os.sysconf("SC_CLK_TCK")
        stack += children.get(process, [])
    return total


B1D_CASES = {"no page open": no_page, "the event stream read (a browser elsewhere)": event_stream,
             "the page open in Chromium here": chromium_page}
B1D_TURNS = itertools.count()


def b4d_dashboard_queue(sandbox, root, jobs):
    """The dashboard with JOBS waiting: the server's snapshot, /metrics, a deep page
    of the jobs request, and the page in Chromium until it shows the count."""
    sys.path.insert(0, str(ROOT))
    import cli
    from browser import Browser
    with Queue(root / "b4d", sandbox.env()) as queue:
        queue("add_slave", "--skip_ssh_auth_check", "--slots", 4, "w1", "w2", "w3", "w4")
        queue("pause")
        queue("add_job", "--array", f"1-{jobs}", script(root, "exit0.sh", "exit 0\n"))
        url = queue("dashboard", "--listen", "127.0.0.1:0").strip()
        base, token = url.split("/?token=")

        def snapshot():
            with cli.connect(str(queue.root / ".data"), "watch", {}) as connection:
                reader = cli.LineReader()
                while not reader.feed(connection.recv(1 << 20)):
                    pass

        def get(path):
            parts = urllib.parse.urlsplit(base)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            connection.getresponse().read()
            connection.close()
        figures = {}
        for label, action in (("the server's snapshot (watch)", snapshot),
                              ("/metrics", lambda: get("/metrics")),
                              ("a page of 25 at the deepest offset",
                               lambda: get(f"/api/jobs?state=waiting&last=25&offset={jobs - 25}"))):
            times = []
            for _ in range(3):
                time.sleep(1.5)   # past the last snapshot's share of the server's time
                times.append(timed(action) * 1000)
            figures[f"B4D {label} with {jobs:,} waiting (ms)"] = statistics.median(times)
        browser = Browser()
        try:
            page = browser.new_page()
            started = time.perf_counter()
            page.goto(url)
            while f"Waiting ({jobs})" not in page.text():
                time.sleep(0.01)
            figures[f"B4D the page showing its lists with {jobs:,} waiting (ms)"] = \
                (time.perf_counter() - started) * 1000
        finally:
            browser.close()
    return figures


def b2_ssh(sandbox, root, jobs):
    job = script(root, "ssh_true.sh", 'exec ssh "$SLAVE_IP" true\n')
    arguments = numbers(root, jobs)
    figures = {}
    with Queue(root / "b2", sandbox.env()) as queue:
        queue("add_slave", "--slots", 4, "w1", "w2", "w3", "w4")
        figures["B2 cli.py (jobs/s)"] = queue_rate(queue, job, arguments, jobs)
        for worker in ("w1", "w2", "w3", "w4"):
            queue("edit_slave", worker, "--no-ssh-reuse")
        figures["B2 cli.py --no-ssh-reuse (jobs/s)"] = queue_rate(queue, job, arguments, jobs)
    env, logins = sandbox.env(), "4/w1,4/w2,4/w3,4/w4"
    figures["B2 GNU parallel -S (jobs/s)"] = jobs / timed(
        lambda: run_shell(f"parallel -S {logins} true :::: {arguments}", env, root))
    figures["B2 GNU parallel -S -M (jobs/s)"] = jobs / timed(
        lambda: run_shell(f"parallel -M -S {logins} true :::: {arguments}", env, root))
    return figures


def b3_latency(sandbox, root, jobs, samples=15):
    job = script(root, "exit0.sh", "exit 0\n")
    figures = {}

    def median_ms(*command):
        # ./cli.py's python3 is this one, as a user's is the one on PATH.
        env = dict(queue.env, PATH=f"{Path(sys.executable).parent}:{queue.env['PATH']}")
        return statistics.median(timed(lambda: subprocess.run(
            command, cwd=root, env=env, stdout=subprocess.DEVNULL, check=True))
            for _ in range(samples)) * 1000

    with Queue(root / "b3", sandbox.env()) as queue:
        figures["B3 floor: python -c pass (ms)"] = median_ms(sys.executable, "-c", "pass")
        figures["B3 floor: ./cli.py --version, its bytecode cached (ms)"] = median_ms(
            str(CLI), "--version")
        figures["B3 floor: python + compile cli.py (ms)"] = median_ms(
            sys.executable, "-c", f"compile(open({str(CLI)!r}).read(), 'cli.py', 'exec')")
        figures["B3 floor + import tabulate (ms)"] = median_ms(
            sys.executable, "-c", f"compile(open({str(CLI)!r}).read(), 'cli.py', 'exec'); "
                                  "import tabulate")
        queue("pause")   # keep what is queued waiting
        for size in (0, jobs):
            if size:
                queue("add_job", job, ":::", *range(size))
            for label, command in (("add_job", ("add_job", str(job))),
                                   ("status --json", ("status", "--json")),
                                   ("status", ("status",))):
                figures[f"B3 python3 cli.py {label} with {size:,} waiting (ms)"] = \
                    median_ms(sys.executable, str(CLI), *command)
                figures[f"B3 ./cli.py {label} with {size:,} waiting (ms)"] = \
                    median_ms(str(CLI), *command)
    return figures


def b5_many_workers(sandbox, root, jobs):
    job, arguments = script(root, "exit0.sh", "exit 0\n"), numbers(root, jobs)
    figures = {}
    for workers, slots in ((500, 2), (2000, 5)):
        with Queue(root / f"b5-{workers}", sandbox.env()) as queue:
            queue("add_slave", "--skip_ssh_auth_check", "--slots", slots,
                  *(f"node{n}" for n in range(workers)))
            figures[f"B5 cli.py, {workers:,} workers x {slots} slots (jobs/s)"] = \
                queue_rate(queue, job, arguments, jobs)
    return figures


def b6_refill(sandbox, root, jobs):
    figures = {}
    for workers, slots in ((1, 1), (4, 4)):
        gaps = refill_gaps(sandbox, root / f"{workers}x{slots}", jobs, workers, slots)
        label = f"{workers} worker{'s' if workers > 1 else ''} x {slots} slot{'s' if slots > 1 else ''}"
        figures[f"B6 refill latency, {label}, median (ms)"] = statistics.median(gaps)
        figures[f"B6 refill latency, {label}, p99 (ms)"] = gaps[int(len(gaps) * 0.99)]
    return figures


def refill_gaps(sandbox, root, jobs, workers, slots):
    """Milliseconds from each job's end to the next start on its slot, as the jobs saw it."""
    times = root / "times"
    times.mkdir(parents=True)
    job = script(root, "stamp.sh", f'echo "$(date +%s%N) start" >> {times}/$JOB_ID\n'
                                   f'echo "$(date +%s%N) end" >> {times}/$JOB_ID\n')
    with Queue(root / "b6", sandbox.env()) as queue:
        queue("add_slave", "--skip_ssh_auth_check", "--slots", slots,
              *(f"w{n + 1}" for n in range(workers)))
        queue("add_job", job, ":::", *range(jobs))
        queue("wait", "--quiet")
        placed = json.loads(queue("jobs", "--json"))
    by_slot = {}
    for entry in placed:
        stamps = dict(reversed(line.split()) for line in
                      (times / str(entry["id"])).read_text().split("\n") if line)
        by_slot.setdefault((entry["worker"], entry["slot"]), []).append(
            (int(stamps["start"]), int(stamps["end"])))
    gaps = []
    for spans in by_slot.values():
        spans.sort()
        gaps += [(start - previous_end) / 1e6 for (_, previous_end), (start, _)
                 in zip(spans, spans[1:])]
    return sorted(gaps)


def b7_placement(sandbox, root, rounds):
    figures = {}
    for placement in ("spread", "pack"):
        waits = placement_waits(sandbox, root / placement, rounds, placement)
        for size in (16, 4, 1):
            figures[f"B7 {placement}: {size}-slot jobs' median wait (s)"] = \
                statistics.median(waits[size])
        figures[f"B7 {placement}: all jobs' median wait (s)"] = \
            statistics.median([wait for sizes in waits.values() for wait in sizes])
    return figures


def placement_waits(sandbox, root, rounds, placement):
    """{slots: [seconds from each job's start time to its start]} of the B7 stream."""
    from datetime import datetime, timezone
    job = str(script(root.parent, "second.sh", "sleep 1\n"))
    slaves = [{"ip": "big", "slots": 16}, {"ip": "mid1", "slots": 4}, {"ip": "mid2", "slots": 4},
              *({"ip": f"one{n}", "slots": 1} for n in range(1, 5))]
    # The whole stream in one load_status call, each job with its start time: how
    # fast jobs can be submitted (some 50 ms an add_job, far more on a loaded
    # machine) must not shape it.
    base = time.time() + 3
    stream = []
    for number in range(rounds):
        at = datetime.fromtimestamp(base + 0.5 * number, timezone.utc).isoformat()
        sizes = [1, 1, 1, 1, 4] + ([16] if number % 2 == 0 else [])
        stream += [{"script": job, "slots_wanted": size, "not_before": at} for size in sizes]
    document = root.parent / f"{placement}-stream.json"
    document.write_text(json.dumps({"slaves": slaves, "job_waitlist": stream}))
    with Queue(root, sandbox.env(), "--placement", placement) as queue:
        queue("load_status", document)
        if time.time() > base:
            print(f"B7: loading took {time.time() - base + 3:.1f}s, longer than planned; "
                  "the first jobs' waits include it", file=sys.stderr)
        queue("wait", "--quiet")
        placed = json.loads(queue("jobs", "--json"))
    waits = {}
    for entry in placed:
        started = datetime.fromisoformat(entry["started_at"].replace("Z", "+00:00"))
        due = datetime.fromisoformat(entry["not_before"].replace("Z", "+00:00"))
        waits.setdefault(entry["slots_wanted"], []).append((started - due).total_seconds())
    return waits


B9_SAMPLES = 7   # runs of add_job and of status --json while the jobs run


def b9_running_at_once(sandbox, root, counts):
    """What COUNT jobs running at once cost the scheduler host: the memory the tool adds
    (PSS of the server and every process of ours under it, the jobs' own `sleep`s
    left out), its processes and the server's fds per running job, how long they took
    to start, and how fast the server still answers (add_job, status --json)."""
    figures = {}
    job = script(root, "sleep.sh", "exec sleep 3600\n")
    for count in counts:
        with Queue(root / f"b9-{count}", sandbox.env()) as queue:
            queue("add_slave", "--skip_ssh_auth_check", "--slots", count, "w1")
            server = int((queue.root / ".data" / "server.pid").read_text())
            idle = tool_footprint(server, queue.root / ".data" / "run")
            started = time.perf_counter()
            queue("add_job", job, ":::", *range(count))
            while json.loads(queue("status", "--json"))["counts"].get("running", 0) < count:
                time.sleep(0.2)
            label = f"B9 {count:,} running"
            figures[f"{label}: time to start them all (s)"] = time.perf_counter() - started
            time.sleep(2)   # the last supervisors settled
            busy = tool_footprint(server, queue.root / ".data" / "run")
            figures[f"{label}: memory cli.py adds per running job (MB PSS)"] = \
                (busy["pss"] - idle["pss"]) / count / 1024
            figures[f"{label}: memory of the server and its helpers (MB PSS)"] = \
                busy["server pss"] / 1024
            figures[f"{label}: processes per running job, the job's own left out"] = \
                (busy["processes"] - idle["processes"]) / count
            figures[f"{label}: pids per running job, the job's own and zombies in"] = \
                (busy["pids"] - idle["pids"]) / count
            figures[f"{label}: the server's fds"] = busy["server fds"]
            # As a user runs them: ./cli.py, its bytecode cached.
            env = dict(queue.env, PATH=f"{Path(sys.executable).parent}:{queue.env['PATH']}")
            for row, command in (("add_job", ("add_job", job)), ("status --json",
                                                                  ("status", "--json"))):
                figures[f"{label}: {row} meanwhile (ms)"] = 1000 * statistics.median(
                    timed(lambda: subprocess.run([str(CLI), *map(str, command)], env=env,
                                                 stdout=subprocess.DEVNULL, check=True))
                    for _ in range(B9_SAMPLES))
            queue("kill", "--grace", "0", f"1-{count + B9_SAMPLES}")   # (add_job's too)
    return figures


def tool_footprint(server, run_dir):
    """PSS (kB) and count of the server and the processes of ours below it, and the
    server's open fds.  A job's processes are in the session of its supervisor (whose
    pid its .pid file holds): they are the job's, not ours, and are left out."""
    supervisors = set()
    for path in run_dir.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            supervisors.add(int(path.read_text()))
    stats, children = process_table()
    ours, every, stack = [], 0, [server]
    while stack:
        pid = stack.pop()
        every += 1
        if pid in supervisors or pid not in stats or int(stats[pid][3]) not in supervisors:
            ours.append(pid)
        stack += children.get(pid, [])
    return {"pss": sum(pss_kb(pid) for pid in ours), "processes": len(ours), "pids": every,
            "server pss": pss_kb(server) + sum(pss_kb(pid) for pid in children.get(server, [])),
            "server fds": len(os.listdir(f"/proc/{server}/fd"))}


def pss_kb(pid):
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    return 0   # a zombie (a job's group leader) or gone


BACKFILL_CASES = ("no estimates", "right estimates", "1 in 5 estimates short")


def b8_backfill(sandbox, root, groups):
    figures, first_case = {}, None
    for case in BACKFILL_CASES:
        runs, makespan, overrun = backfill_batch(sandbox, root / case.replace(" ", "-"),
                                                 groups, case)
        busy = sum(gpus * (end - start) for gpus, start, end in runs)
        figures[f"B8 {case}: GPU utilisation (%)"] = 100 * busy / (8 * makespan)
        figures[f"B8 {case}: whole batch (s)"] = makespan
        big = [start for gpus, start, _ in runs if gpus == 4]
        if first_case is None:
            first_case = big
        else:
            # Each 4-GPU job against itself without estimates (the same place in the queue).
            figures[f"B8 {case}: most a 4-GPU job started later than with none (s)"] = \
                max(max(mine - theirs for mine, theirs in zip(big, first_case)), 0.0)
        if overrun:
            figures[f"B8 {case}: longest overrun of a short estimate (s)"] = overrun
    return figures


def backfill_batch(sandbox, root, groups, case):
    """The B8 batch in CASE: [(gpus, started, ended)] of its jobs in queue order, in
    seconds from its submission; then its last end, and the longest overrun of an
    estimate."""
    from datetime import datetime
    job = str(script(root.parent, "sleeps.sh", 'sleep "$1"\n'))
    slaves = [{"ip": name, "slots": 16, "resources": {"gpus": ["0", "1", "2", "3"]}}
              for name in ("w1", "w2")]
    batch, overrun = [], 0.0
    for group in range(groups):
        # A 4-GPU job of 3 s, then six 1-GPU jobs of 1, 2 or 3 s: 24 GPU-seconds.
        for number, (gpus, duration) in enumerate([(4, 3)] + [(1, 1 + (group + n) % 3)
                                                              for n in range(6)]):
            estimate = None if case == BACKFILL_CASES[0] else duration
            if case == BACKFILL_CASES[2] and gpus == 1 and (group * 7 + number) % 5 == 0:
                estimate = duration * 2 / 3
                overrun = max(overrun, duration - estimate)
            batch.append({"script": job, "args": [str(duration)], "resources": {"gpus": gpus},
                          "estimate": estimate})
    document = root.parent / f"{root.name}-batch.json"
    document.write_text(json.dumps({"slaves": slaves, "job_waitlist": batch}))
    with Queue(root, sandbox.env()) as queue:
        queue("pause")
        queue("load_status", document)
        submitted = time.time()
        queue("resume")
        queue("wait", "--quiet")
        placed = json.loads(queue("jobs", "--json"))

    def moment(text):
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    # (From the submission: runs of different cases are compared job by job.)
    runs = [(entry["resources"]["gpus"], moment(entry["started_at"]) - submitted,
             moment(entry["ended_at"]) - submitted)
            for entry in sorted(placed, key=lambda entry: entry["id"])]
    return runs, max(end for *_, end in runs), overrun


WORKLOADS = {"B1": (b1_dispatch, 5000, 1000), "B1D": (b1_dashboard, 5000, 1000),
             "B2": (b2_ssh, 500, 100), "B4D": (b4d_dashboard_queue, 100_000, 10_000),
             "B3": (b3_latency, 100_000, 10_000), "B5": (b5_many_workers, 20_000, 2000),
             "B6": (b6_refill, 1000, 200), "B7": (b7_placement, 40, 16),
             "B8": (b8_backfill, 12, 6), "B9": (b9_running_at_once, (1000, 5000), (200,))}
TARGETS = {
    "B1": "cli.py >= 3x GNU parallel, >= 0.5x xargs",
    "B1D": "with a page open >= 0.95x with none (issue 18)",
    "B2": "cli.py >= 3x parallel -S, >= parallel -S -M",
    "B4D": "responsive with 100,000 jobs (issue 18)",
    "B3": "add_job, status --json within 10 ms of the floor; no growth with the queue",
    "B5": "cli.py >= 0.8x its B1 rate",
    "B6": "median < 5 ms, p99 < 20 ms",
    "B7": "pack starts 16-slot jobs sooner than spread (issue 16)",
    "B8": "estimates raise utilisation; no 4-GPU job starts later than without them "
          "by more than the overrun of short estimates (issue 19)",
    "B9": "memory per running job <= 0.2 MB PSS (issue 20)",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one run")
    parser.add_argument("--runs", type=int, help="runs of each workload (default: 3, or 1 "
                                                 "with --quick)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="e.g. B1,B6")
    options = parser.parse_args()
    runs = options.runs or (1 if options.quick else 3)
    for program in ("parallel", "xargs"):
        if not shutil.which(program):
            raise SystemExit(f"{program} not found: run bench/run, which installs it")
    results = {}
    with tempfile.TemporaryDirectory() as scratch, \
            SshSandbox(Path(scratch) / "ssh") as sandbox:
        # The workers' login shells get an empty HOME, so they read no ~/.bashrc,
        # as on a lean server: here root's .bashrc starts pyenv (~100 ms), which
        # would dominate every tool's SSH figures.
        lean_home = Path(scratch) / "worker-home"
        lean_home.mkdir()
        for alias in ("w1", "w2", "w3", "w4"):
            sandbox.start_worker(alias, extra_config=(f"SetEnv HOME={lean_home}",))
        for name in options.only.split(","):
            function, size, quick_size = WORKLOADS[name]
            size = quick_size if options.quick else size
            for run in range(runs):
                unit = {"B7": "rounds", "B8": "groups"}.get(name, "jobs")
                shown = "/".join(f"{n:,}" for n in size) if isinstance(size, tuple) \
                    else f"{size:,}"
                print(f"{name} run {run + 1}/{runs} ({shown} {unit}) ...", file=sys.stderr)
                root = Path(tempfile.mkdtemp(dir=scratch))
                for row, value in function(sandbox, root, size).items():
                    results.setdefault(name, {}).setdefault(row, []).append(value)
    print(f"\n{runs} run(s) each, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{'quick sizes' if options.quick else 'full sizes'}: median (min-max)\n")
    print("| workload | median | min-max |\n|---|---|---|")
    for name, rows in results.items():
        for row, values in rows.items():
            print(f"| {row} | {statistics.median(values):.1f} | "
                  f"{min(values):.1f}-{max(values):.1f} |")
        print(f"| *{name} target: {TARGETS[name]}* | | |")
    print()
    if "B1D" in results:
        alone = results["B1D"]["B1D no page open (jobs/s)"]
        for case in list(B1D_CASES)[1:]:
            # Each run's own ratio first (its three queues ran one after the other),
            # then their median: steadier than a ratio of medians on a shared machine.
            ratios = [value / base for value, base in zip(results["B1D"][f"B1D {case} (jobs/s)"],
                                                          alone)]
            print(f"- B1D: {case} / no page open, run by run: "
                  f"{', '.join(f'{ratio:.3f}' for ratio in ratios)}; median "
                  f"{statistics.median(ratios):.3f}x")
    for name, rows in results.items():
        medians = {row: statistics.median(values) for row, values in rows.items()}
        ours = next((value for row, value in medians.items() if "cli.py" in row), None)
        for row, value in medians.items():
            if ours and "cli.py" not in row and "(jobs/s)" in row:
                print(f"- {name}: cli.py / {row.split(' ', 1)[1].rsplit(' (', 1)[0]} = "
                      f"{ours / value:.2f}x")


if __name__ == "__main__":
    main()
