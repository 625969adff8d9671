"""Bulk submission: ::: groups and --args-file make arrays, all jobs or none; add_job
prints the array's id, its first job's."""
import pytest


def queued_args(cli):
    return [job["args"] for job in cli.status()["job_waitlist"]]


def test_one_group_gives_one_job_per_argument_and_prints_the_array_id(server):
    out = server.ok("add_job", server.script, "--fixed", ":::", "a", "b c", "")
    assert out == "1\n"
    assert queued_args(server) == [["--fixed", "a"], ["--fixed", "b c"], ["--fixed", ""]]


def test_several_groups_give_their_cross_product_in_gnu_parallel_order(server):
    server.ok("add_job", server.script, ":::", "a", "b", ":::", "1", "2", ":::", "x")
    assert queued_args(server) == [["a", "1", "x"], ["a", "2", "x"], ["b", "1", "x"],
                                   ["b", "2", "x"]]


def test_printed_array_id_feeds_wait_and_the_jobs_run(server):
    server.ok("add_slave", "--slots", "2", "w1")
    ids = server.ok("add_job", server.script, ":::", "1", "2", "3").strip()
    assert server.ok("wait", "--quiet", ids) == "all 3 job(s) succeeded\n"
    assert sorted(server.record(job_id)["args"][0] for job_id in (1, 2, 3)) == ["1", "2", "3"]


def test_args_file_splits_lines_like_a_shell_without_running_anything(server):
    arguments = server.root / "params.txt"
    arguments.write_text('plain 1\n'
                         '"two words" \'single $(quoted)\' back\\ slash\n'
                         '\n'
                         '# a comment line\n'
                         '$(touch pwned) `x` ; ; trailing # comment\n')
    assert server.ok("add_job", "--args-file", arguments, server.script, "base") == "1\n"
    assert queued_args(server) == [["base", "plain", "1"],
                                   ["base", "two words", "single $(quoted)", "back slash"],
                                   ["base", "$(touch", "pwned)", "`x`", ";", ";", "trailing"]]
    assert not (server.root / "pwned").exists()


def test_args_file_from_stdin(server):
    assert server.ok("add_job", "--args-file", "-", server.script, input="a\nb\n") == "1\n"
    assert queued_args(server) == [["a"], ["b"]]


@pytest.mark.parametrize("arguments, stdin, message", [
    (["--args-file", "-", "SCRIPT"], "ok\n'unclosed\n", "line 2: No closing quotation"),
    (["--args-file", "-", "SCRIPT"], "\n# nothing\n", "holds no job"),
    (["--args-file", "missing.txt", "SCRIPT"], None, "cannot read missing.txt"),
    (["SCRIPT", ":::"], None, "needs at least one argument"),
    (["SCRIPT", ":::", "a", ":::"], None, "needs at least one argument"),
    (["--args-file", "-", "SCRIPT", ":::", "a"], "b\n", "either ::: or --args-file"),
    (["./missing.sh", ":::", "a", "b"], None, "no such script"),
])
def test_bad_bulk_input_queues_nothing(server, arguments, stdin, message):
    arguments = [str(server.script) if arg == "SCRIPT" else arg for arg in arguments]
    server.fails("add_job", *arguments, input=stdin, expect=message)
    assert server.status()["counts"]["waiting"] == 0
