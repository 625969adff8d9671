#!/usr/bin/env python3
"""Where a job's CPU goes: the server, the spawner, the supervisors and scripts.

    .venv/bin/python bench/cpu.py [--jobs 2000] [--runs 3] [--against OLD/cli.py]

Runs JOBS `exit 0` jobs on 4 workers x 4 slots (registered without the SSH
check, so no SSH is involved) and reports, per job, the CPU time of the
server, of the spawner, of the spawner's children (supervisors and the
scripts they start) and of the whole machine (/proc/stat), as medians over
the runs.  It is what the README's B1 explanation quotes.  --against runs
another cli.py (say, a checkout of an earlier commit) in turns with this one,
first one then the other, so that both see the same machine, and adds the
median of the ratios of each turn.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 - bench/run.py's helpers
from run import Queue, numbers, script, timed  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid):
    """(own, reaped children's) CPU seconds of PID."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS, (int(fields[13]) + int(fields[14])) / TICKS


def machine_cpu():
    """Busy CPU seconds of the whole machine (all but idle and iowait)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


def one_run(root, jobs):
    job, arguments = script(root, "exit0.sh", "exit 0\n"), numbers(root, jobs)
    with Queue(root / "cpu", dict(os.environ)) as queue:
        server = int((root / "cpu" / ".data" / "server.pid").read_text())
        spawner = int(subprocess.run(["pgrep", "-P", str(server)], capture_output=True,
                                     text=True, check=True).stdout.split()[0])
        queue("add_slave", "--skip_ssh_auth_check", "--slots", 4, "w1", "w2", "w3", "w4")
        before = process_cpu(server), process_cpu(spawner), machine_cpu()
        seconds = timed(lambda: (queue("add_job", "--args-file", arguments, job),
                                 queue("wait", "--quiet")))
        after = process_cpu(server), process_cpu(spawner), machine_cpu()
    per_job = lambda a, b: (b - a) / jobs * 1000   # noqa: E731 - ms per job
    return {
        "jobs/s": jobs / seconds,
        "server (ms/job)": per_job(before[0][0], after[0][0]),
        "spawner (ms/job)": per_job(before[1][0], after[1][0]),
        "supervisors + scripts (ms/job)": per_job(before[1][1], after[1][1]),
        "whole machine (ms/job)": per_job(before[2], after[2]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", type=Path, metavar="CLI_PY",
                        help="another cli.py, run in turns with this one")
    options = parser.parse_args()
    versions = {"this cli.py": run.CLI}
    if options.against:
        versions[str(options.against)] = options.against.resolve()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(options.runs):
            # The order alternates: whichever runs first in a turn is slower here.
            turn = list(versions.items())
            for label, cli in (turn if number % 2 == 0 else turn[::-1]):
                print(f"{label}: run {number + 1}/{options.runs} ({options.jobs:,} jobs) ...",
                      file=sys.stderr)
                run.CLI = cli
                root = Path(scratch) / f"{len(results)}-{number}-{hash(label)}"
                root.mkdir()
                for row, value in one_run(root, options.jobs).items():
                    results.setdefault(label, {}).setdefault(row, []).append(value)
    print(f"\n{options.runs} run(s) each, {os.cpu_count()} CPUs: median (min-max)\n")
    print("| cli.py | measure | median | min-max |\n|---|---|---|---|")
    for label, rows in results.items():
        for row, values in rows.items():
            print(f"| {label} | {row} | {statistics.median(values):.2f} | "
                  f"{min(values):.2f}-{max(values):.2f} |")
    if len(results) == 2:
        # Each turn ran both on the same machine at nearly the same time: the
        # median of their ratios sees through the drift of a shared machine.
        (label, this), (other_label, other) = results.items()
        print(f"\n| measure | {label} / {other_label}: median of the ratios of each turn |"
              "\n|---|---|")
        for row in this:
            ratios = [mine / theirs for mine, theirs in zip(this[row], other[row]) if theirs]
            print(f"| {row} | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
