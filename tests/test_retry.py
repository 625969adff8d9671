"""retry: ended jobs run again under their ids, with their skipped dependents."""
import json
from datetime import datetime
import os
import signal

import pytest

from conftest import wait_until


def job(cli, job_id):
    return json.loads(cli.ok("jobs", job_id, "--json"))


def results(cli, *job_ids):
    return [job(cli, job_id)["result"] for job_id in job_ids]


def switchable(cli, name="switch.sh"):
    """A job that exits with the number in the file `exit` (0 once it is gone)."""
    exit_file = cli.root / "exit"
    exit_file.write_text("3")
    script = cli.write_script(
        name, f'echo "attempt $JOB_ATTEMPT of job $JOB_ID"\n'
              f'[ -e "{exit_file}" ] && exit "$(cat "{exit_file}")"\nexit 0\n')
    return script, exit_file


def test_a_failed_job_runs_again_under_its_id_as_a_new_attempt(server):
    server.ok("add_slave", "w1")
    script, exit_file = switchable(server)
    job_id = server.add_job("--retries", 1, script)
    server.run("wait", "-q", job_id)
    before = job(server, job_id)
    assert (before["result"], before["exit_code"], len(before["attempts"])) == ("failed", 3, 2)
    exit_file.write_text("4")
    # Its --retries is afresh: two more attempts, numbered on from the last.
    assert server.ok("retry", job_id).strip() == f"retried job {job_id}"
    server.run("wait", "-q", job_id)
    after = job(server, job_id)
    assert (after["result"], after["exit_code"], after["attempt"]) == ("failed", 4, 4)
    assert [attempt["exit_code"] for attempt in after["attempts"]] == [3, 3, 4, 4]
    exit_file.unlink()
    server.ok("retry", job_id)
    server.run("wait", "-q", job_id)
    assert (job(server, job_id)["result"], job(server, job_id)["attempt"]) == ("succeeded", 5)
    log = (server.log_dir / f"job_{job_id}.txt").read_text()
    assert [f"attempt {n} of job {job_id}" in log for n in range(1, 6)] == [True] * 5
    assert "--- attempt 5 on w1 at " in log
    assert server.status()["counts"] == {"waiting": 0, "running": 0, "succeeded": 1}


def test_the_dependents_its_failure_skipped_come_back_and_run_after_it(server):
    server.ok("add_slave", "w1", "w2")
    script, exit_file = switchable(server)
    first = server.add_job(script)
    server.run("wait", "-q", first)
    second = server.add_job("--after", first, server.script)        # skipped at once
    third = server.add_job("--after", second, server.script)        # skipped in turn
    either = server.add_job("--after-any", first, server.script)    # its last hope
    unrelated = server.add_job(server.script)
    server.run("wait", "-q")
    assert results(server, first, second, third, either, unrelated) == \
        ["failed", "skipped", "skipped", "skipped", "succeeded"]
    exit_file.unlink()
    out = server.ok("retry", first)
    assert out.strip() == (f"retried job {first}; back with them, the dependents they had "
                           f"skipped: jobs {second}-{either}")
    server.run("wait", "-q")
    assert results(server, first, second, third, either, unrelated) == ["succeeded"] * 5
    # They ran after it, and each once.
    first_ended = datetime.fromisoformat(job(server, first)["ended_at"]).timestamp()
    assert min(server.record(job_id)["start"] for job_id in (second, either)) >= first_ended
    assert sorted(server.runs()) == sorted([unrelated, second, third, either])


def test_a_dependent_held_by_another_failure_stays_skipped_and_is_refused_by_name(server):
    server.ok("add_slave", "w1")
    script, exit_file = switchable(server)
    fails_for_good = server.write_script("three.sh", "exit 3\n")
    first, other = server.add_job(script), server.add_job(fails_for_good)
    server.run("wait", "-q")
    both = server.add_job("--after", f"{first},{other}", server.script)
    chained = server.add_job("--after", both, server.script)
    server.fails("retry", both, expect=f"job {both} would be skipped again: it runs --after "
                 f"job {first}, which ended failed; retry job {first} and it comes back with "
                 "that job; nothing was changed")
    server.fails("retry", chained, expect=f"(after job {first} ended failed); retry job {first}")
    exit_file.unlink()
    out = server.ok("retry", "--failed", first)
    assert out.strip() == f"retried job {first}; still skipped (another job they wait for " \
                          f"failed): jobs {both}-{chained}"
    server.run("wait", "-q")
    assert results(server, first, other, both, chained) == \
        ["succeeded", "failed", "skipped", "skipped"]


def test_retry_failed_picks_failed_and_timed_out_jobs_within_the_filters(server):
    server.ok("add_slave", "--slots", 4, "w1")
    fail = server.write_script("fail.sh", "exit 1\n")
    other_fail = server.write_script("other.sh", "exit 1\n")
    slow = server.write_script("slow.sh", "sleep 30\n")
    failed = server.add_job(fail)
    timed_out = server.add_job("--timeout", "1s", slow)
    other = server.add_job(other_fail)
    succeeded = server.add_job(server.script)
    killed = server.add_job(slow)
    server.wait_for_counts(running=1, failed=2, succeeded=1, timeout=30)
    server.ok("kill", "--grace", "0s", killed)
    server.run("wait", "-q")
    assert results(server, failed, timed_out, other, succeeded, killed) == \
        ["failed", "timed_out", "failed", "succeeded", "killed"]
    assert server.ok("retry", "--failed", "--script", "fail.sh").strip() == \
        f"retried job {failed}"
    server.run("wait", "-q")
    out = server.ok("retry", "--failed", f"{timed_out}-{succeeded}")
    assert out.strip() == f"retried jobs {timed_out},{other}" or \
        out.strip() == f"retried jobs {timed_out}-{other}"
    server.run("wait", "-q")
    assert server.ok("retry", "--state", "killed").strip() == f"retried job {killed}"
    server.ok("kill", "--grace", "0s", killed)
    assert [len(job(server, job_id)["attempts"]) for job_id in
            (failed, timed_out, other, succeeded, killed)] == [2, 2, 2, 1, 2]
    assert server.ok("retry", "--state", "succeeded", "--script", "nothing.sh").strip() == \
        "nothing to retry: no ended job matches"


@pytest.mark.parametrize("arguments, message", [
    ([], "name the jobs to retry: IDS (like 12 or 12-20), or --failed, --state S or --script P"),
    (["--failed", "--state", "failed"], "--failed is --state failed plus timed_out"),
    (["--state", "running"], "only ended jobs can be retried: --state takes done or how"),
    (["--state", "bogus"], "unknown state 'bogus'"),
    (["x1"], "'x1' is not a job id"),
    (["99"], "unknown job id 99 (never queued, or purged); nothing was changed"),
    (["--failed", "99"], "unknown job id 99"),
])
def test_bad_retry_input_changes_nothing(server, arguments, message):
    server.ok("add_slave", "w1")
    failed = server.add_job(server.write_script("fail.sh", "exit 1\n"))
    server.run("wait", "-q")
    server.fails("retry", *arguments, expect=message)
    assert len(job(server, failed)["attempts"]) == 1
    assert server.status()["counts"] == {"waiting": 0, "running": 0, "failed": 1}


def test_waiting_and_running_jobs_are_refused_with_what_to_do(server):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    blocking = server.add_job(server.write_script(
        "gate.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'))
    waiting = server.add_job(server.script)
    failed = server.add_job("--after", waiting, server.script)
    server.wait_for_counts(running=1, waiting=2)
    server.fails("retry", blocking, expect=f"job {blocking} is running: only ended jobs can be "
                 "retried (kill it first to run it again); nothing was changed")
    server.fails("retry", f"{blocking}-{failed}", expect=f"job {blocking} is running")
    server.fails("retry", waiting, expect=f"job {waiting} is waiting")
    gate.touch()
    server.run("wait", "-q")
    assert server.status()["counts"] == {"waiting": 0, "running": 0, "succeeded": 3}


def test_a_retried_job_survives_a_kill_9_of_the_server_and_runs_once(server):
    server.ok("add_slave", "w1")
    script, exit_file = switchable(server)
    job_id = server.add_job(script)
    server.run("wait", "-q", job_id)
    server.ok("pause")
    exit_file.unlink()
    server.ok("retry", job_id)
    os.kill(server.server_pid(), signal.SIGKILL)
    wait_until(lambda: server.run("status").returncode != 0, what="the server to die")
    server.ok("start")
    assert [row["id"] for row in server.status()["job_waitlist"]] == [job_id]
    server.ok("resume")
    server.run("wait", "-q", job_id)
    found = job(server, job_id)
    assert (found["result"], len(found["attempts"])) == ("succeeded", 2)
