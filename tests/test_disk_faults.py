"""Disk faults: a full disk, a read-only disk, a corrupt or truncated database.

Real faults, no mocks: the data dir lives on a small tmpfs that a filler file
fills up, on a tmpfs remounted read-only, or on an ext4 image that is made to
fail as a dying disk does (errors=remount-ro).  Mounting needs root; these
tests fail, not skip, without it.  Everything mounted is unmounted in the
fixture's teardown, even when a test fails.

The promise under test: commands fail with a one-line error that says what to
do, nothing already recorded is lost or reset, and the server recovers by
itself once the disk is usable again.
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import proc_stat, process_alive, wait_until

# Ends with CODE once GATE exists (or at once without one); each run leaves a line.
GATED_JOB = """#!/bin/sh
while [ -n "$GATE" ] && [ ! -e "$GATE" ]; do sleep 0.05; done
echo "$JOB_ID $CODE" >> "$RESULTS/ran.log"
exit "$CODE"
"""


def sh(*command):
    subprocess.run(command, check=True, capture_output=True, text=True)


@pytest.fixture
def disk(cli, tmp_path):
    """Mounts for the test (mount(...) returns the mount point); the server and its
    jobs are stopped and every mount is lazily unmounted at the end, whatever happened."""
    assert os.geteuid() == 0, "these tests mount file systems: run them as root"
    mounts = []

    def mount(*options, source="tmpfs", name="disk"):
        point = tmp_path / name
        point.mkdir(exist_ok=True)
        sh("mount", *options, source, str(point))
        mounts.append(point)
        return point
    try:
        yield mount
    finally:
        stop_everything(cli)
        for point in reversed(mounts):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def stop_everything(cli):
    """The server, then every process of its supervisors' sessions (the supervisor's
    pid is its job's session id).  Nothing here writes to the disk, which may still
    be full or read-only, and a supervisor that keeps an outcome ignores SIGTERM:
    SIGKILL for all of them, once they are known to be ours."""
    def ours(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                return os.fsencode(cli.data_dir) in cmdline.read()
        return False
    pid = cli.server_pid()
    if pid and ours(pid):
        with contextlib.suppress(Exception):
            cli.run("stop", timeout=30)
        if ours(pid):
            os.kill(pid, signal.SIGKILL)
    supervisors = set()
    for path in (cli.data_dir / "run").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            supervisors.add(int(path.read_text()))
    supervisors = {pid for pid in supervisors if ours(pid)}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.isdigit() and int(proc_stat(entry)[3]) in supervisors:
                os.kill(int(entry), signal.SIGKILL)


def use_data_dir(cli, data_dir, log_dir):
    cli.data_dir, cli.log_dir = data_dir, log_dir
    cli.env["CLI_PY_DATA_DIR"] = str(data_dir)


def fill(directory):
    """Write a filler file until the file system is full; return its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
        with pytest.raises(OSError) as full:
            os.write(fd, b"\0")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def queue(cli, code, gate=None):
    env = dict(cli.env, CODE=str(code), GATE=str(gate) if gate else "")
    return cli.add_job(cli.root / "gated.sh", env=env)


def recorded_jobs(cli):
    return json.loads(cli.ok("jobs", "--json"))


def ran(cli):
    """[(job id, exit code)] in the order the jobs themselves wrote them."""
    path = cli.results / "ran.log"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] \
        if path.exists() else []


def assert_every_job_once_with_its_true_exit_code(cli, expected):
    jobs = recorded_jobs(cli)
    assert sorted(job["id"] for job in jobs) == sorted(expected), jobs
    wrong = {job["id"]: (job["result"], job["exit_code"]) for job in jobs
             if job["exit_code"] != expected[job["id"]]}
    assert not wrong, f"jobs recorded with a wrong outcome: {wrong}"
    runs = ran(cli)
    assert sorted(runs) == sorted(expected.items()), "a job ran twice, or never"
    counts = cli.status()["counts"]
    assert {name: counts.get(name, 0) for name in ("waiting", "running", "succeeded", "failed")} \
        == {"waiting": 0, "running": 0,
            "succeeded": sum(1 for code in expected.values() if code == 0),
            "failed": sum(1 for code in expected.values() if code != 0)}, counts


def checksums(directory):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in directory.iterdir() if path.is_file()}


# --- fault 9: the disk fills up ---------------------------------------------


def test_a_full_disk_refuses_new_work_loses_no_outcome_and_recovers_by_itself(cli, disk):
    # 8 MB: room for the database and its WAL (SQLite checkpoints at 4 MB), then filled.
    mount_point = disk("-t", "tmpfs", "-o", "size=8m")
    use_data_dir(cli, mount_point / "data", mount_point / "logs")
    cli.write_script("gated.sh", GATED_JOB.split("\n", 1)[1])
    cli.ok("start", cli.data_dir, cli.log_dir)
    pid = cli.server_pid()
    cli.ok("add_slave", "--slots", "3", "w1")
    expected = {}
    for number in range(12):   # some history, failures included
        expected[queue(cli, number % 4)] = number % 4
    cli.wait_for_counts(waiting=0, running=0)
    gate = cli.results / "gate"
    for code in (5, 6, 0):   # these end while the disk is full
        expected[queue(cli, code, gate)] = code
    cli.wait_for_counts(running=3)
    waiting = {queue(cli, code): code for code in (0, 3, 0, 9)}   # no slot free
    expected.update(waiting)
    before = cli.status()["counts"]

    filler = fill(mount_point)
    cli.fails("add_job", cli.root / "gated.sh", expect="no space left on device")
    error = cli.fails("add_job", cli.root / "gated.sh", ":::", *map(str, range(50)))
    assert "free some space" in error and len(error.strip().splitlines()) == 1, error
    assert cli.status()["counts"] == before

    gate.touch()
    run_dir = cli.data_dir / "run"
    wait_until(lambda: len(list(run_dir.glob("*.exit"))) == 3, what="the outcomes on disk")
    assert cli.status()["counts"] == before   # not recorded yet, and nothing recorded wrong
    cli.fails("add_job", cli.root / "gated.sh", expect="no space left on device")
    assert cli.server_pid() == pid and process_alive(pid)

    filler.unlink()
    # A kill that comes after a job ended, while saving its end is still held up,
    # must not rewrite that end as killed (the server retries saves on a timer).
    ended_unsaved = next(job_id for job_id, code in expected.items() if code == 5)
    assert "Traceback" not in cli.run("kill", "--grace", "1s", ended_unsaved).stderr
    # Nothing but the server's own retries brings it back: no other client command.
    wait_until(lambda: len(ran(cli)) == len(expected), timeout=40,
               what="the waiting jobs to start by themselves")
    cli.wait_for_counts(waiting=0, running=0, timeout=20)
    expected[queue(cli, 4)] = 4
    cli.wait_for_counts(waiting=0, running=0)
    assert_every_job_once_with_its_true_exit_code(cli, expected)
    assert cli.server_pid() == pid and process_alive(pid)
    assert not list(run_dir.iterdir()), "run files left behind"
    log = (cli.log_dir / "server.log").read_text()
    assert "Traceback" not in log, log


def test_a_job_whose_supervisor_finds_no_room_is_queued_again_and_starts_later(cli, disk):
    """The run files' disk is full but the database's is not: the supervisor cannot
    reserve room for the outcome, so the script must not start, and the job must
    neither fail nor wait for an unrelated event once there is room again."""
    cli.data_dir.mkdir(mode=0o700)
    run_dir = disk("-t", "tmpfs", "-o", "size=64k,mode=0700", name=".data/run")
    cli.write_script("gated.sh", GATED_JOB.split("\n", 1)[1])
    cli.ok("start")
    cli.ok("add_slave", "w1")
    expected = {queue(cli, 1): 1}
    cli.wait_for_counts(waiting=0, running=0)

    filler = fill(run_dir)
    job = queue(cli, 3)
    log = cli.log_dir / "server.log"
    wait_until(lambda: f"job {job}: its script never started; queued again" in log.read_text(),
               what="the job to be queued again")
    assert cli.status()["counts"]["failed"] == 1 and (job, 3) not in ran(cli)
    filler.unlink()
    wait_until(lambda: (job, 3) in ran(cli), timeout=30, what="the job to start by itself")
    expected[job] = 3
    cli.wait_for_counts(waiting=0, running=0)
    assert_every_job_once_with_its_true_exit_code(cli, expected)


def test_a_job_that_cannot_start_is_tried_again_after_pauses_not_in_a_loop(cli, disk):
    """While the supervisor finds no room for its run files, each try fails at once:
    the next must come after a pause (0.5 s, 1 s, 2 s ...), not in a loop of forks."""
    cli.data_dir.mkdir(mode=0o700)
    run_dir = disk("-t", "tmpfs", "-o", "size=64k,mode=0700", name=".data/run")
    cli.write_script("gated.sh", GATED_JOB.split("\n", 1)[1])
    cli.ok("start")
    cli.ok("add_slave", "w1")
    queue(cli, 1)
    cli.wait_for_counts(waiting=0, running=0)
    filler = fill(run_dir)
    job = queue(cli, 3)
    log = cli.log_dir / "server.log"
    tried = f"job {job}: its script never started; queued again"
    wait_until(lambda: tried in log.read_text(), what="the first try")
    time.sleep(4)   # a count over a while: there is no condition to wait for
    tries = log.read_text().count(tried)
    filler.unlink()
    assert 2 <= tries <= 6, f"tried {tries} times in 4 s"
    wait_until(lambda: (job, 3) in ran(cli), timeout=30, what="the job to start by itself")


# --- fault 6: the disk goes read-only ---------------------------------------


def test_a_read_only_data_dir_is_refused_at_start_and_left_as_it_was(cli, disk):
    mount_point = disk("-t", "tmpfs", "-o", "size=8m")
    use_data_dir(cli, mount_point / "data", cli.root / "logs")
    cli.write_script("gated.sh", GATED_JOB.split("\n", 1)[1])
    cli.ok("start", cli.data_dir, cli.log_dir)
    cli.ok("add_slave", "w1")
    expected = {queue(cli, code): code for code in (0, 2)}
    cli.wait_for_counts(waiting=0, running=0)
    cli.ok("stop")
    before = checksums(cli.data_dir)

    sh("mount", "-o", "remount,ro", str(mount_point))
    error = cli.fails("start", cli.data_dir, cli.log_dir, expect="read-only")
    assert "make it writable again" in error and len(error.strip().splitlines()) == 1, error
    assert checksums(cli.data_dir) == before
    cli.fails("status", expect="no server running")

    sh("mount", "-o", "remount,rw", str(mount_point))
    cli.ok("start", cli.data_dir, cli.log_dir)
    expected[queue(cli, 1)] = 1
    cli.wait_for_counts(waiting=0, running=0)
    assert_every_job_once_with_its_true_exit_code(cli, expected)


def test_a_disk_that_turns_read_only_under_the_server_loses_nothing(cli, disk, tmp_path):
    """The data dir's disk fails as ext4 does (errors=remount-ro) while jobs run.

    A tmpfs cannot be remounted read-only while the server holds its database
    open for writing (EBUSY), so the fault is ext4's own: `remount,abort`.
    Such a disk does not come back by itself: the server refuses work, keeps
    serving, stops cleanly; the disk is checked (a copy of the image, since the
    failed one stays attached until its last file closes) and mounted again;
    the job that ended meanwhile is recorded with its true exit code.
    """
    for tool in ("mkfs.ext4", "e2fsck", "losetup"):
        assert shutil.which(tool), f"{tool} is needed: apt-get install e2fsprogs mount"
    image = tmp_path / "disk.img"
    with open(image, "wb") as stream:
        stream.truncate(32 << 20)
    sh("mkfs.ext4", "-q", "-F", str(image))
    mount_point = disk("-o", "loop,errors=remount-ro", source=str(image))
    use_data_dir(cli, mount_point / "data", cli.root / "logs")
    cli.write_script("gated.sh", GATED_JOB.split("\n", 1)[1])
    cli.ok("start", cli.data_dir, cli.log_dir)
    cli.ok("add_slave", "w1")
    expected = {queue(cli, code): code for code in (0, 1, 2)}
    cli.wait_for_counts(waiting=0, running=0)
    gate = cli.results / "gate"
    ends_while_read_only = queue(cli, 7, gate)
    cli.wait_for_counts(running=1)
    expected.update({ends_while_read_only: 7, queue(cli, 0): 0, queue(cli, 3): 3})
    before = cli.status()["counts"]
    os.sync()   # what was committed is on the disk before it fails (synchronous=NORMAL)

    sh("mount", "-o", "remount,abort", str(mount_point))
    error = cli.fails("add_job", cli.root / "gated.sh", expect="read-only")
    assert "make it writable again" in error, error
    assert cli.status()["counts"] == before
    gate.touch()
    wait_until(lambda: (ends_while_read_only, 7) in ran(cli), what="the job to end")
    assert cli.status()["counts"] == before   # its end cannot be saved: still running
    cli.fails("add_job", cli.root / "gated.sh", expect="read-only")
    assert "server stopped" in cli.ok("stop")

    # Repair: fsck a copy and mount it where the failed disk was.
    subprocess.run(["umount", "-l", str(mount_point)], check=True)
    repaired = tmp_path / "repaired.img"
    shutil.copyfile(image, repaired)
    fsck = subprocess.run(["e2fsck", "-f", "-y", str(repaired)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    disk("-o", "loop", source=str(repaired))
    # The supervisor still holds the outcome, and writes it once it can.
    exit_file = cli.data_dir / "run" / f"{ends_while_read_only}-1.exit"
    wait_until(exit_file.exists, timeout=30, what="the supervisor to write its outcome")
    cli.ok("start", cli.data_dir, cli.log_dir)
    cli.wait_for_counts(waiting=0, running=0)
    assert_every_job_once_with_its_true_exit_code(cli, expected)


# --- fault 6: the database goes bad -----------------------------------------


def test_a_database_corrupted_under_the_running_server_is_never_reset(server):
    server.env["CODE"] = "0"   # for the add_job below that may or may not be taken
    server.ok("add_slave", "w1")
    server.write_script("gated.sh", GATED_JOB.split("\n", 1)[1])
    for code in (0, 1, 2) * 4:
        queue(server, code)
    server.wait_for_counts(waiting=0, running=0)
    gate = server.results / "gate"
    queue(server, 0, gate)
    server.wait_for_counts(running=1)
    database = server.data_dir / "state.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        # Every page into state.db, and an empty WAL: the garbage below is what
        # the server reads once it drops its page cache.
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = database.stat().st_size
        assert size > 8 * 4096
        with open(database, "r+b") as handle:   # every page but the header
            handle.seek(4096)
            handle.write(os.urandom(size - 4096))
        # A change by another connection (page 1 only, the same value) makes the
        # server's connection drop its cache, as a second process's write would.
        connection.execute("PRAGMA user_version = 3")
    pid = server.server_pid()
    for command in (["status"], ["jobs"], ["add_job", server.root / "gated.sh"]):
        error = server.fails(*command, expect="is corrupt")
        assert "restore it from a backup" in error and len(error.strip().splitlines()) == 1
    gate.touch()
    wait_until(lambda: (13, 0) in ran(server), what="the gated job to end")
    server.fails("status", expect="is corrupt")
    assert process_alive(pid), "the server died"
    assert "server stopped" in server.ok("stop")
    assert not (server.data_dir / "state.db-journal").exists()
    assert database.stat().st_size >= size, "the database shrank: reset?"

    kept = checksums(server.data_dir)
    server.fails("start", expect="corrupt")
    assert checksums(server.data_dir) == kept   # state.db, and any -wal, untouched
    assert "refusing to start" in server.fails("start")


def test_a_database_truncated_to_nothing_is_refused_not_taken_for_a_new_one(cli):
    cli.ok("start")
    cli.add_job(cli.script)
    cli.ok("stop")
    database = cli.data_dir / "state.db"
    assert not (cli.data_dir / "state.db-wal").exists()   # checkpointed at stop
    database.write_bytes(b"")
    cli.fails("start", expect="empty (0 bytes)")
    assert database.stat().st_size == 0
    cli.fails("status", expect="no server running")
