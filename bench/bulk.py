#!/usr/bin/env python3
"""How cli.py copes with a big queue: 100,000 jobs in one add_job call (each of
--args-file, :::, --array and --array with a limit: four arrays), then how
quickly the other commands answer at that size.

    python3 bench/bulk.py            # 100,000 jobs, 3 runs
    python3 bench/bulk.py --quick    # 10,000 jobs, 1 run (under a minute)
    python3 bench/bulk.py --against de33222   # beside that commit's cli.py, run for run

Each run starts a fresh server in a temp dir with no worker, so the jobs stay
queued: this measures the queue, not the jobs.  Prints a markdown table of
medians with min-max over the runs.  It is a benchmark, not a test: it never
fails on a number.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def cli(program, data_dir, *args, stdin=None):
    """Run PROGRAM (a cli.py) through this interpreter (not a shim) and return seconds
    taken."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(program), *map(str, args)],
                            env=dict(os.environ, CLI_PY_DATA_DIR=str(data_dir)),
                            cwd=data_dir.parent, stdin=stdin, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"cli.py {' '.join(map(str, args))} failed: {result.stderr}")
    return elapsed


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def has_arrays(program):
    return "--array" in subprocess.run([sys.executable, str(program), "add_job", "--help"],
                                       capture_output=True, text=True).stdout


def one_run(program, jobs, with_json=True):
    """Seconds (or MB) for each step, in a fresh data dir."""
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        data_dir = root / ".data"
        script = root / "job.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        arguments = root / "args.txt"
        arguments.write_text("".join(f"input-{number}.dat\n" for number in range(jobs)))
        cli(program, data_dir, "start")
        try:
            figures = {}
            figures[f"add_job --args-file ({jobs:,} lines)"] = \
                cli(program, data_dir, "add_job", "--args-file", arguments, script)
            # (At most 100,000: a million arguments would pass the kernel's ARG_MAX.)
            arguments_given = min(jobs, 100_000)
            figures[f"add_job ::: ({arguments_given:,} arguments)"] = \
                cli(program, data_dir, "add_job", script, ":::",
                    *(f"x{n}" for n in range(arguments_given)))
            arrays = has_arrays(program)
            if arrays:
                figures[f"add_job --array 1-{jobs} ({jobs:,} tasks)"] = \
                    cli(program, data_dir, "add_job", "--array", f"1-{jobs}", script)
                figures[f"add_job --array 1-{jobs}%50 ({jobs:,} tasks, a limit)"] = \
                    cli(program, data_dir, "add_job", "--array", f"1-{jobs}%50", script)
            queued = (3 if arrays else 1) * jobs + arguments_given
            figures["jobs waiting (the queue full)"] = queued
            figures["status with the queue full"] = cli(program, data_dir, "status")
            if with_json:
                figures["status --json with the queue full"] = \
                    cli(program, data_dir, "status", "--json")
            figures["jobs --last 20 with the queue full"] = \
                cli(program, data_dir, "jobs", "--last", 20)
            figures["add_job (one more) with the queue full"] = \
                cli(program, data_dir, "add_job", script)
            pid = int((data_dir / "server.pid").read_text())
            figures["server memory (RSS, MB)"] = rss_mb(pid)
            # Dispatch with the whole queue waiting: each start looks at its head.
            cli(program, data_dir, "add_slave", "--skip_ssh_auth_check", "--slots", "16", "w1")
            ran = min(2000, jobs)
            figures[f"run {ran:,} of them with the queue full (jobs/s)"] = \
                ran / cli(program, data_dir, "wait", f"1-{ran}")
            cli(program, data_dir, "pause")
            # wait for every job while all of them are killed: one push per batch of ends
            log = root / "logs" / "server.log"
            waiters_before = log.read_text().count("a client waits for")
            waiter = subprocess.Popen([sys.executable, str(program), "wait", "--quiet"],
                                      env=dict(os.environ, CLI_PY_DATA_DIR=str(data_dir)),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while log.read_text().count("a client waits for") == waiters_before:
                time.sleep(0.01)
            started = time.perf_counter()
            # One kill per array (the array's id names its tasks; at most a million
            # ids per command), and the one more job; a range before arrays.
            firsts = [1, jobs + 1, jobs + arguments_given + 1, 2 * jobs + arguments_given + 1,
                      queued + 1] if arrays else \
                [f"{first}-{min(first + 999_999, queued + 1)}"
                 for first in range(1, queued + 2, 1_000_000)]
            figures["kill every job left"] = sum(
                cli(program, data_dir, "kill", first) for first in firsts)
            waiter.wait()
            figures["wait (all) returns after that kill"] = time.perf_counter() - started
            return figures
        finally:
            cli(program, data_dir, "stop")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs per add_job call")
    parser.add_argument("--runs", type=int, default=3, help="runs (each in a fresh data dir)")
    parser.add_argument("--quick", action="store_true", help="10,000 jobs, 1 run")
    parser.add_argument("--against", metavar="COMMIT",
                        help="also run that commit's cli.py, run for run, in a second column")
    parser.add_argument("--no-json", action="store_true",
                        help="skip status --json (it prints every waiting job: minutes for "
                             "millions)")
    options = parser.parse_args()
    if options.quick:
        options.jobs, options.runs = 10_000, 1
    programs = {"cli.py": CLI}
    if options.against:
        programs[options.against] = earlier_cli(options.against)
    runs = {name: [] for name in programs}
    for number in range(options.runs):
        for name, program in programs.items():   # alternating: the same noise for both
            print(f"run {number + 1} of {options.runs}: {name} ...", file=sys.stderr)
            runs[name].append(one_run(program, options.jobs, not options.no_json))
    print(f"\n{options.runs} run(s), {os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]}, median (min-max)\n")
    print("| step | " + " | ".join(programs) + " |\n|---|" + "---|" * len(programs))
    steps = list(dict.fromkeys(step for name in programs for step in runs[name][0]))
    for step in steps:
        unit = "" if step.startswith("jobs waiting") else "MB" if "MB" in step else \
            "jobs/s" if "jobs/s" in step else "s"
        cells = []
        for name in programs:
            values = [run[step] for run in runs[name] if step in run]
            cells.append("-" if not values else
                         f"{statistics.median(values):,.2f} {unit} "
                         f"({min(values):,.2f}-{max(values):,.2f})".replace(".00 ", " ")
                         if unit else f"{int(statistics.median(values)):,}")
        print(f"| {step} | " + " | ".join(cells) + " |")


def earlier_cli(commit):
    """That commit's cli.py, from this repository's history, in a temp file."""
    shown = subprocess.run(["git", "-C", str(CLI.parent), "show", f"{commit}:cli.py"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"--against {commit}: {shown.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "cli.py"
    path.write_text(shown.stdout)
    return path


if __name__ == "__main__":
    main()
