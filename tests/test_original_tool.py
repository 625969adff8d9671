"""Users of the tool cli.py grew out of: their command lines work as written."""
import json

from conftest import process_alive, wait_until


def test_the_original_readmes_command_lines_work_as_written(cli):
    """start DATA_DIR LOG_DIR, add_slave --skip_ssh_auth_check, add_job with a script
    named without ./, remove_job SCRIPT ARGS..., remove_slave --wait and --kill."""
    gate = cli.root / "gate"
    cli.write_script("job_script.sh",
                     f'while [ ! -e "{gate}" ]; do sleep 0.05; done\necho "$1 on $SLAVE_IP"\n')
    cli.ok("start", cli.data_dir, cli.log_dir)
    try:
        cli.ok("add_slave", "--skip_ssh_auth_check", "w1")
        cli.ok("add_slave", "--skip_ssh_auth_check", "w2")
        first = cli.add_job("job_script.sh", "data_1")
        second = cli.add_job("job_script.sh", "data_2")
        cli.wait_for_counts(running=2)
        third = cli.add_job("job_script.sh", "data_3")
        out = cli.ok("remove_job", "job_script.sh", "data_3")
        assert str(third) in out
        workers = {job["id"]: job["worker"] for job in cli.status()["running_jobs"]}
        cli.ok("remove_slave", "--kill", workers[second])
        assert cli.status()["counts"].get("killed") == 1
        cli.ok("remove_slave", "--wait", workers[first])
        gate.touch()
        wait_until(lambda: not cli.status()["slaves"], what="the drained worker to go")
        log = (cli.log_dir / f"job_{first}.txt").read_text()
        assert f"data_1 on {workers[first]}" in log
        assert cli.status()["counts"] == {"waiting": 0, "running": 0, "succeeded": 1,
                                          "killed": 1}
    finally:
        gate.touch()
        cli.run("stop")


# The first line of the original tool's example job script: at exit it sends
# SIGTERM to the process group whose id is its own pid.
ORIGINAL_TRAP = 'trap "trap - SIGTERM && kill -- -$$" SIGINT SIGTERM EXIT\n'


def job(cli, job_id):
    return json.loads(cli.ok("jobs", job_id, "--json"))


def test_a_script_with_the_original_exit_trap_ends_with_its_own_exit_status(server):
    server.ok("add_slave", "w1")
    fine = server.write_script("fine.sh", ORIGINAL_TRAP + "sleep 0.2 &\necho done\n",
                               shell="/bin/bash")
    three = server.write_script("three.sh", ORIGINAL_TRAP + "exit 3\n", shell="/bin/bash")
    succeeded, failed = server.add_job(fine), server.add_job(three)
    server.run("wait", "-q", succeeded, failed)
    assert (job(server, succeeded)["result"], job(server, succeeded)["exit_code"]) == \
        ("succeeded", 0)
    assert (job(server, failed)["result"], job(server, failed)["exit_code"],
            job(server, failed)["signal"]) == ("failed", 3, None)
    assert len(job(server, failed)["attempts"]) == 1


def test_kill_still_ends_a_script_with_the_original_exit_trap_and_what_it_started(server):
    """Its trap makes SIGTERM a no-op for the script itself (the kill finds no group):
    the grace's SIGKILL ends it, and the group's SIGTERM what it started."""
    server.ok("add_slave", "w1")
    marker = server.root / "child.pid"
    script = server.write_script(
        "trapped.sh", ORIGINAL_TRAP + f"sleep 301 &\necho $! > {marker}\n"
                                      "while true; do sleep 0.1; done\n", shell="/bin/bash")
    job_id = server.add_job(script)
    wait_until(marker.exists, what="the job to start")
    server.ok("kill", "--grace", "1s", job_id)
    assert job(server, job_id)["result"] == "killed"
    assert not process_alive(int(marker.read_text()))


def test_a_trapped_script_that_ends_while_the_server_is_down_is_recorded_as_succeeded(
        server):
    server.ok("add_slave", "w1")
    gate, pid_file = server.root / "gate", server.root / "script.pid"
    script = server.write_script(
        "gated.sh", ORIGINAL_TRAP + f'echo $$ > {pid_file}\n'
                                    f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n',
        shell="/bin/bash")
    job_id = server.add_job(script)
    wait_until(pid_file.exists, what="the job to start")
    server.ok("stop")
    gate.touch()
    wait_until(lambda: not process_alive(int(pid_file.read_text())), what="the script to end")
    server.ok("start")
    server.run("wait", "-q", job_id)
    assert (job(server, job_id)["result"], job(server, job_id)["exit_code"]) == ("succeeded", 0)
