"""Upgrades mid-batch: a data dir written by an earlier commit of main opens under
this cli.py, its running jobs adopted, its queue and history kept."""
import json
import pathlib
import subprocess
import sys

import pytest

from conftest import wait_until

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent

# The newest commit of main with each earlier database schema (migrations 1 to 5).
EARLIER = {1: "3e5da3d", 2: "621b81c", 3: "48153f9", 4: "232af9c", 5: "fc47386",
           6: "de33222", 7: "f8f1638", 8: "106921d"}


def earlier_cli(commit, directory):
    """That commit's cli.py, from the repository's history (a full clone has it)."""
    shown = subprocess.run(["git", "-C", str(REPOSITORY), "show", f"{commit}:cli.py"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, \
        f"commit {commit} is not in this clone's history (a shallow clone?): {shown.stderr}"
    path = directory / f"cli-{commit}.py"
    path.write_text(shown.stdout)
    return path


@pytest.mark.parametrize("schema", sorted(EARLIER))
def test_a_data_dir_of_an_earlier_commit_opens_with_its_running_job_adopted(cli, schema):
    old = earlier_cli(EARLIER[schema], cli.root)

    def old_ok(*args):
        result = subprocess.run([sys.executable, str(old), *map(str, args)], cwd=cli.root,
                                env=cli.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{old.name} {args}: {result.stderr}"
        return result.stdout

    gate = cli.root / "gate"
    gated = cli.write_script("gated.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'
                                         'echo "job $JOB_ID ended"\n')
    failing = cli.write_script("failing.sh", "exit 3\n")
    old_ok("start")
    old_ok("add_slave", "--skip_ssh_auth_check", "w1")
    failed = int(old_ok("add_job", failing).strip())
    wait_until(lambda: json.loads(old_ok("status", "--json"))["slaves"][0]["status"] == "idle",
               what="the failing job to end")
    running = int(old_ok("add_job", gated).strip())
    wait_until(lambda: json.loads(old_ok("status", "--json"))["slaves"][0]["status"] == "busy",
               what="the gated job to start")
    waiting = int(old_ok("add_job", cli.script).strip())
    old_ok("stop")

    cli.ok("start")
    status = cli.status()
    assert [job["id"] for job in status["running_jobs"]] == [running]
    assert [job["id"] for job in status["job_waitlist"]] == [waiting]
    gate.touch()
    cli.ok("wait", "-q", running, waiting)
    jobs = {job["id"]: job for job in json.loads(cli.ok("jobs", "--json"))}
    assert {job_id: jobs[job_id]["result"] for job_id in (failed, running, waiting)} == \
        {failed: "failed", running: "succeeded", waiting: "succeeded"}
    assert (cli.log_dir / f"job_{running}.txt").read_text().count(f"job {running} ended") == 1
    # What the new schema brings works on the old rows: retry, with its history.
    cli.ok("retry", failed)
    cli.run("wait", "-q", failed)
    assert len(json.loads(cli.ok("jobs", failed, "--json"))["attempts"]) == \
        (2 if schema >= 3 else 1)   # (attempts were not kept before migration 3)
