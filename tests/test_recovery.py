"""Restarts and crashes: running jobs are adopted, finished ones recorded, none run twice."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import proc_stat, process_alive, wait_until


def jobs_by_id(cli):
    status = cli.status()
    return {job["id"]: job for job in status["running_jobs"] + status["job_waitlist"]}


def test_jobs_finishing_while_the_server_is_stopped_keep_their_exit_codes(server):
    server.ok("add_slave", "--slots", "4", "w1")
    gate = server.root / "gate"
    # Each job ends only once the test opens the gate, i.e. while the server is down.
    waiter = server.write_script("wait_for_gate.sh",
                                 f"while [ ! -e {gate} ]; do sleep 0.05; done\n"
                                 "[ -n \"$SIGNAL_SELF\" ] && kill -$SIGNAL_SELF $$\nexit $CODE\n")
    codes = {server.add_job(waiter, env=dict(server.env, CODE=str(code))): code
             for code in (0, 3, 42)}
    by_signal = server.add_job(waiter, env=dict(server.env, CODE="0", SIGNAL_SELF="USR1"))
    server.wait_for_counts(running=4)
    server.ok("stop")
    gate.touch()
    wait_until(lambda: len(list((server.data_dir / "run").glob("*.exit"))) == 4,
               what="the jobs to end while the server is down")
    server.ok("start")
    status = server.status()
    assert status["counts"] == {"waiting": 0, "running": 0, "succeeded": 1, "failed": 3}
    log = (server.log_dir / "server.log").read_text()
    for job_id, code in codes.items():
        assert f"job {job_id}: {'succeeded' if code == 0 else 'failed'} (exit code {code}," \
            in log
    assert f"job {by_signal}: failed (exit code None, signal {int(signal.SIGUSR1)})" in log


def test_jobs_still_running_after_a_restart_are_adopted_and_recorded_when_they_end(server):
    server.ok("add_slave", "--slots", "2", "w1")
    gated = gated_script(server)
    first = server.add_job(gated, "0")
    second = server.add_job(gated, "5")
    server.wait_for_counts(running=2)
    server.ok("stop")
    server.ok("start")
    running = jobs_by_id(server)
    assert running[first]["state"] == "running" and running[second]["state"] == "running"
    assert server.status()["slaves"][0]["slots_in_use"] == 2   # slots still held
    (server.root / "gate").touch()
    server.wait_for_counts(succeeded=1, failed=1, running=0)
    assert sorted(server.runs()) == [first, second]


def gated_script(cli):
    """A job that logs its id to runs.log, waits for the file 'gate', and exits with $1."""
    return cli.write_script("gated.sh", 'echo "$JOB_ID" >> "$RESULTS/runs.log"\n'
                            f'while [ ! -e {cli.root / "gate"} ]; do sleep 0.05; done\n'
                            'touch "$RESULTS/$JOB_ID.done"\nexit "$1"\n')


def test_an_adopted_job_can_still_be_killed(server):
    server.ok("add_slave", "w1")
    server.add_job(server.script, env=dict(server.env, SLEEP="300"))
    server.wait_for_counts(running=1)
    server.ok("stop")
    server.ok("start")
    result = server.run("remove_slave", "--kill", "w1", timeout=60)
    assert result.returncode == 0, result.stderr
    assert server.status()["counts"]["killed"] == 1


def test_kill_9_of_the_server_again_and_again_runs_every_job_exactly_once(server):
    server.ok("add_slave", "--slots", "3", "w1", "w2")
    total = 40
    ids = [server.add_job(server.script, env=dict(server.env, SLEEP=f"{0.05 * (n % 4)}"))
           for n in range(total)]
    rng = random.Random(7)
    for _ in range(5):
        time.sleep(rng.uniform(0.05, 0.4))
        pid = server.server_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not process_alive(pid), what="the server to die")
        server.ok("start")
    server.wait_for_counts(succeeded=total, timeout=90)
    runs = server.runs()
    assert sorted(runs) == sorted(ids), "a job ran twice or never"
    records = [server.record(job_id) for job_id in ids]
    assert all(records)


def supervisor_of(cli, job_id, attempt=1):
    return int((cli.data_dir / "run" / f"{job_id}-{attempt}.pid").read_text())


def test_a_draining_worker_is_kept_while_recovery_adopts_its_other_jobs(server):
    server.ok("add_slave", "--slots", "2", "w1")
    short = server.add_job(gated_script(server), "0")
    long = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=2)
    server.ok("remove_slave", "--wait", "w1")
    server.ok("stop")
    (server.root / "gate").touch()
    wait_until((server.data_dir / "run" / f"{short}-1.exit").exists,
               what="the short job to end while stopped")
    server.ok("start")
    status = server.status()
    assert [(slave["ip"], slave["status"], slave["slots_in_use"])
            for slave in status["slaves"]] == [("w1", "draining", 1)]
    assert [job["id"] for job in status["running_jobs"]] == [long]


def test_a_kill_cut_off_by_a_crash_is_finished_after_the_restart(server):
    server.ok("add_slave", "w1")
    job_id = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    server.ok("stop")
    # What a server killed between recording the kill and signalling leaves behind.
    database = sqlite3.connect(server.data_dir / "state.db")
    with database:
        database.execute("UPDATE jobs SET kill_requested_at = 1, kill_grace = 1 WHERE id = ?",
                         (job_id,))
    database.close()
    server.ok("start")
    server.wait_for_counts(killed=1, running=0, timeout=15)


def test_a_killed_supervisor_takes_its_job_along_and_frees_the_slot_honestly(server):
    server.ok("add_slave", "w1")
    marker = server.root / "job.pid"
    script = server.write_script("long.sh", f"sleep 300 &\necho $$ $! > {marker}\nwait\n")
    job_id = server.add_job(script)
    wait_until(marker.exists, what="the job to start")
    job_pids = [int(pid) for pid in marker.read_text().split()]
    os.kill(supervisor_of(server, job_id), signal.SIGKILL)
    server.wait_for_counts(failed=1, running=0)
    assert f"job {job_id}: failed" in (server.log_dir / "server.log").read_text()
    assert "supervisor vanished" in (server.log_dir / "server.log").read_text()
    wait_until(lambda: not any(process_alive(pid) for pid in job_pids),
               what="the job's processes to be gone")


def children_of(pid):
    """{child pid: (name, state)} of the processes whose parent is PID."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(proc_stat(entry)[1]) == pid:
                with open(f"/proc/{entry}/comm") as comm:
                    children[int(entry)] = (comm.read().strip(), proc_stat(entry)[0])
        except OSError:
            continue
    return children


def spawner_of(server):
    spawner, = [child for child, (name, _) in children_of(server.server_pid()).items()
                if name == "cli.py spawner"]
    return spawner


def test_a_killed_spawner_is_reaped_logged_and_replaced(server):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    server.ok("wait", "-q", server.add_job(server.script))
    pid = server.server_pid()
    spawner = spawner_of(server)
    os.kill(spawner, signal.SIGKILL)
    wait_until(lambda: children_of(pid).get(spawner, (None, "gone"))[1] in ("Z", "gone"),
               what="the spawner to die")
    server.ok("wait", "-q", server.add_job(server.script))   # started by a new spawner
    children = children_of(pid)
    assert [state for state in children.values() if state[1] == "Z"] == [], children
    assert [name for name, _ in children.values()].count("cli.py spawner") == 1, children
    assert f"the spawner (pid {spawner}) was killed by SIGKILL; starting a new one" in \
        (server.log_dir / "server.log").read_text()


def kill_spawner_at_its_answer(server, *before):
    """strace, attached to SERVER's spawner, kills it as it hands its first new
    supervisor over (its first sendmsg), after the faults BEFORE (strace -e inject
    rules).  Returns (the spawner's pid, the strace process)."""
    spawner = spawner_of(server)
    rules = [argument for rule in (*before, "sendmsg:signal=SIGKILL:when=1")
             for argument in ("-e", f"inject={rule}")]
    tracer = subprocess.Popen(["strace", "-o", os.devnull, *rules, "-p", str(spawner)],
                              stderr=subprocess.PIPE, text=True)
    assert "attached" in tracer.stderr.readline()
    return spawner, tracer


def test_a_spawner_killed_right_after_its_fork_neither_doubles_the_job_nor_hangs(server):
    """The server asks a new spawner, which must not start the attempt again, and
    adopts the supervisor that runs, without waiting for it to end."""
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    spawner, tracer = kill_spawner_at_its_answer(server)
    try:
        job = server.add_job(gated_script(server), "3")
        wait_until(lambda: (server.results / "runs.log").exists(), what="the job to start")
        try:   # (the server used to wait for that job to end)
            answer = server.run("status", "--json", timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the server does not answer while the job runs")
        assert json.loads(answer.stdout)["counts"]["running"] == 1
        (server.root / "gate").touch()
        server.wait_for_counts(failed=1, running=0)
    finally:
        tracer.kill()
        tracer.wait()
    assert server.runs() == [job]   # once
    log = (server.log_dir / "server.log").read_text()
    assert f"job {job}: failed (exit code 3," in log   # the true exit code of that one run
    assert f"the spawner (pid {spawner}) was killed by SIGKILL; starting a new one" in log
    assert f"job {job}: it has a supervisor already; its supervisor adopted" in log


def test_a_job_that_ended_before_its_dead_spawner_could_answer_is_recorded_once(server):
    """The spawner is held up for 3 s after its fork (its pidfd_open), long enough
    for the job to end, and then killed: the new spawner finds the attempt's pid
    file, and the server records what its supervisor wrote."""
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    spawner, tracer = kill_spawner_at_its_answer(server, "pidfd_open:delay_exit=3000000:when=1")
    try:
        job = server.add_job(server.write_script("quick.sh", 'echo "$JOB_ID" >> '
                                                 '"$RESULTS/runs.log"\nexit 3\n'))
        server.wait_for_counts(failed=1, running=0)
    finally:
        tracer.kill()
        tracer.wait()
    assert server.runs() == [job]
    log = (server.log_dir / "server.log").read_text()
    assert f"job {job}: it has had a supervisor already; settled" in log
    assert f"job {job}: failed (exit code 3," in log


def test_a_held_lock_without_pid_file_is_never_queued_again_until_released(server):
    """A supervisor that has its lock but not yet its pid file may be about to run the script."""
    server.ok("add_slave", "w1")
    job_id = server.add_job(server.script, env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1)
    supervisor = supervisor_of(server, job_id)
    server.ok("stop")
    run_dir = server.data_dir / "run"
    # The state a supervisor leaves when it dies with its job between taking
    # its lock and writing its pid file.
    for pid in [supervisor] + session_members(supervisor):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(process_alive(pid) for pid in session_members(supervisor)),
               what="the job and its supervisor to die")
    lock = run_dir / f"{job_id}-1.lock"
    (run_dir / f"{job_id}-1.pid").unlink()
    holder = subprocess.Popen(["flock", str(lock), "sleep", "1.5"])
    try:
        wait_until(lambda: subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 1,
                   what="the lock to be held")
        server.ok("start")
        assert holder.poll() is not None, "start queued the job again while its lock was held"
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: server.runs() == [job_id, job_id], what="the job to run again")


def session_members(session):
    members = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(proc_stat(entry)[3]) == session:
                members.append(int(entry))
        except OSError:
            continue
    return members


def take_pid(pid, attempts=20):
    """Start an unrelated session leader (`sleep 300`) whose pid is PID, as a busy machine might.

    Linux hands out pids in order after /proc/sys/kernel/ns_last_pid (writable
    by root); another process may take the pid first, hence a few attempts.
    """
    for _ in range(attempts):
        with open("/proc/sys/kernel/ns_last_pid", "w") as last_pid:
            last_pid.write(str(pid - 1))
        stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
        if stranger.pid == pid:
            return stranger
        stranger.kill()
        stranger.wait()
    raise AssertionError(f"could not get pid {pid} for the unrelated process")


@pytest.mark.alone("take_pid rewinds the kernel's next pid for every process: others' new "
                   "processes would get the pids of processes that just ended")
def test_a_pid_reused_while_the_server_was_down_is_not_mistaken_for_the_job(server):
    """Fault 2: the supervisors' pids now belong to unrelated session leaders.

    One job ended while the server was down (its exit code is on disk); the
    other's supervisor was killed with its job, so its outcome is unknown and
    recovery kills whatever is left of that job's session.  Neither stranger
    may be taken for the job: not adopted, not killed.
    """
    server.ok("add_slave", "--slots", "2", "w1")
    gate = server.root / "gate"
    ends_later = server.add_job(server.write_script(
        "gated.sh", f"while [ ! -e {gate} ]; do sleep 0.05; done\nexit 7\n"))
    vanishes = server.add_job(server.script, env=dict(server.env, SLEEP="300"))
    server.wait_for_counts(running=2)
    ended_supervisor = supervisor_of(server, ends_later)
    lost_supervisor = supervisor_of(server, vanishes)
    server.ok("stop")
    gate.touch()
    wait_until(lambda: not process_alive(ended_supervisor), what="the gated job to end")
    for pid in session_members(lost_supervisor):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not session_members(lost_supervisor), what="the lost job to die")
    strangers = [take_pid(ended_supervisor), take_pid(lost_supervisor)]
    try:
        server.ok("start")
        jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
        assert jobs[ends_later]["result"] == "failed" and jobs[ends_later]["exit_code"] == 7
        assert jobs[vanishes]["result"] == "failed" and jobs[vanishes]["exit_code"] is None
        assert [stranger.poll() for stranger in strangers] == [None, None], \
            "recovery signalled an unrelated process that reused a supervisor's pid"
        assert server.status()["slaves"][0]["slots_in_use"] == 0
    finally:
        for stranger in strangers:
            stranger.kill()
            stranger.wait()
