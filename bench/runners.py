#!/usr/bin/env python3
"""The shapes a job runner could take, measured side by side (issue 20).

    .venv/bin/python bench/runners.py            # 2,000 jobs each, then 200 running
    .venv/bin/python bench/runners.py --jobs 500 --running 100

Each shape runs JOBS jobs of /bin/true, 16 at once, and reports jobs/s and the CPU
per job of this process and every process it started (all reaped, so counted);
then RUNNING jobs of `sleep` at once, and the memory (PSS) each running job adds
beside its own `sleep`.  These are prototypes of the runner's process structure,
not of cli.py: no database, no log files, no server.  cli.py's runner is shape A.

  A  today's: one forked Python supervisor per job (a session of its own, a
     group leader that exits at once, the script; it waits and writes the outcome)
  S  one shared runner: the runner itself is the parent of every script
     (posix_spawn, a session each) and waits for them through pidfds
  W  a shell per job: /bin/sh runs the script, waits for it, writes `$?`
  Z  a holder per job: a fork that makes the session, starts the script as its
     child and then becomes `sleep` (exec), never reaping it; the runner reads
     the script's wait status from /proc while it is a zombie, then ends the holder
  Z1 Z with one fork: the holder starts the script with posix_spawn before it
     becomes `sleep`
"""
import argparse
import ctypes
import json
import os
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

PR_SET_CHILD_SUBREAPER = 36
LIBC = ctypes.CDLL(None, use_errno=True)
SLEEP = "/bin/sleep"


def start_a(script, outcome):
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            leader = os.posix_spawn("/bin/true", ["true"], {}, setpgroup=0)
            child = os.posix_spawn(script[0], script, os.environ, setpgroup=leader)
            _, status = os.waitpid(child, 0)
            with open(outcome, "w") as stream:
                stream.write(json.dumps({"status": status}))
        finally:
            os._exit(0)
    return pid, pid


def end_a(key, outcome):
    os.waitpid(key, 0)


def start_s(script, outcome):
    pid = os.posix_spawn(script[0], script, os.environ, setsid=True)
    return pid, pid


def end_s(key, outcome):
    _, status = os.waitpid(key, 0)
    with open(outcome, "w") as stream:
        stream.write(json.dumps({"status": status}))


def start_w(script, outcome):
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", '"$@" & wait $!; echo $? > "$0"', outcome,
                                     *script], os.environ, setsid=True)
    return pid, pid


def start_z(script, outcome, one_fork=False):
    """The holder: a fork that makes the job's session, starts the script as its child
    and becomes `sleep`.  Z forks again for the script, which is made the subreaper of
    what it orphans; Z1 (ONE_FORK) starts it with posix_spawn, and the holder is the
    subreaper itself (so the job's orphans, once ended, stay its zombies)."""
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            os.close(read_end)
            os.setsid()
            ignored = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            for number in ignored:
                signal.signal(number, signal.SIG_IGN)
            leader = os.posix_spawn("/bin/true", ["true"], {}, setpgroup=0)
            if one_fork:
                LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                child = os.posix_spawn(script[0], script, os.environ, setpgroup=leader,
                                       setsigdef=ignored)
            else:
                child = os.fork()
                if child == 0:
                    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                    os.setpgid(0, leader)
                    for number in ignored:
                        signal.signal(number, signal.SIG_DFL)
                    os.execve(script[0], script, os.environ)
            os.write(write_end, f"{child}\n".encode())
            os.execv(SLEEP, ["sleep", "2147483647"])
        finally:
            os._exit(1)
    script_pid = read_pid(read_end, write_end)
    return (holder, script_pid), script_pid


def start_z1(script, outcome):
    return start_z(script, outcome, one_fork=True)


def read_pid(read_end, write_end):
    """The script's pid, as the holder writes it before it becomes `sleep`."""
    os.close(write_end)
    data = b""
    while not data.endswith(b"\n"):
        data += os.read(read_end, 64)
    os.close(read_end)
    return int(data)


def end_z(key, outcome):
    holder, script = key
    with open(f"/proc/{script}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    assert fields[0] == "Z", fields[0]
    with open(outcome, "w") as stream:
        stream.write(json.dumps({"status": int(fields[49])}))   # exit_code: a wait status
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)


SHAPES = {"A": (start_a, end_a), "S": (start_s, end_s), "W": (start_w, end_a),
          "Z": (start_z, end_z), "Z1": (start_z1, end_z)}


def run(shape, jobs, at_once, outdir):
    """Jobs/s and CPU ms per job of SHAPE, in a child process of its own (for rusage)."""
    start, end = SHAPES[shape]
    poller, running, started, done = select.epoll(), {}, 0, 0
    began = time.perf_counter()
    while done < jobs:
        while started < jobs and len(running) < at_once:
            key, watched = start(["/bin/true"], f"{outdir}/{started}")
            pidfd = os.pidfd_open(watched)
            running[pidfd] = (key, f"{outdir}/{started}")
            poller.register(pidfd, select.EPOLLIN)
            started += 1
        for pidfd, _ in poller.poll():
            key, outcome = running.pop(pidfd)
            poller.unregister(pidfd)
            os.close(pidfd)
            end(key, outcome)
            done += 1
    reap_all()
    wall = time.perf_counter() - began
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return jobs / wall, 1000 * cpu / jobs


def reap_all():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def memory(shape, count, outdir):
    """kB of PSS per running job, its own `sleep` left out."""
    start, _ = SHAPES[shape]
    before = tree_pss(os.getpid(), exclude="sleep-job")
    keys = [start([SLEEP, "1000"], f"{outdir}/{n}")[0] for n in range(count)]
    time.sleep(1.0)
    after = tree_pss(os.getpid(), exclude="sleep-job")
    for key in keys:   # end the jobs' sleeps and our holders
        for pid in (key if isinstance(key, tuple) else (key,)):
            with_children_killed(pid)
    reap_all()
    return (after - before) / count


def with_children_killed(pid):
    for child in children(pid):
        with_children_killed(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(word) for word in listing.read().split()]
    except OSError:
        return []


def tree_pss(root, exclude):
    """PSS (kB) of ROOT and its descendants; the jobs' own `sleep 1000`s left out
    (a holder's `sleep 2147483647` is the runner's, and counts)."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if cmdline.read() == b"/bin/sleep\x001000\x00":
                    continue
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) for line in rollup
                              if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shape", help=argparse.SUPPRESS)   # (one measurement, in a child)
    options = parser.parse_args()
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)   # as cli.py's spawner's children are
    if options.shape:
        with tempfile.TemporaryDirectory() as outdir:
            rate, cpu = run(options.shape, options.jobs, 16, outdir)
            pss = memory(options.shape, options.running, outdir)
        print(json.dumps([rate, cpu, pss]))
        return
    print(f"{options.runs} runs of each, in turns; {options.jobs:,} jobs of /bin/true "
          f"16 at once, then {options.running} of sleep at once; medians (min-max)\n")
    print("| shape | jobs/s | CPU per job (ms) | PSS per running job (kB) |\n|---|---|---|---|")
    results = {shape: [] for shape in SHAPES}
    for _ in range(options.runs):
        for shape in SHAPES:
            output = subprocess.run([sys.executable, __file__, "--shape", shape, "--jobs",
                                     str(options.jobs), "--running", str(options.running)],
                                    capture_output=True, text=True, check=True).stdout
            results[shape].append(json.loads(output))
    for shape, rows in results.items():
        cells = []
        for column in range(3):
            values = [row[column] for row in rows]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
