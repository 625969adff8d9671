"""Users of the tool cli.py grew out of: their command lines work as written."""
from conftest import wait_until


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
