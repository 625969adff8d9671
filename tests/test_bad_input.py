"""Bad input: arguments reach jobs byte-exact, and every command refuses what it cannot
take with one line that says what to do, changing nothing."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import CLI, Cli, wait_until

spec = importlib.util.spec_from_file_location(
    "cli", pathlib.Path(__file__).resolve().parent.parent / "cli.py")
cli_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli_module)

RESERVED = cli_module.RESERVED_VARIABLES
MAX_JOB_ID = cli_module.MAX_JOB_ID

# --- what reaches a job ----------------------------------------------------------

# Anything argv and the environment can hold: no NUL; bytes that are not UTF-8
# travel as Python reads them from argv (surrogate escapes) and must come out as
# the same bytes.  A single argv string is at most 128 KiB (MAX_ARG_STRLEN).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=30)
RAW_BYTES = st.binary(max_size=30).map(lambda raw: os.fsdecode(raw.replace(b"\0", b"")))
SHELLISH = st.sampled_from(["", " ", "$(touch /tmp/pwned)", "`id`", "a; rm -rf /", "'", '"',
                            "\\", "*", "~", "$HOME", "--", "-e", "--help", "-", "\n", "a\tb",
                            "|&><", "!!", "#", "%s%n", "=", "A=B", "\x1b[31m", "\r"])
LONG = st.builds(lambda piece, size: os.fsdecode((piece * size)[:size]),
                 st.binary(min_size=1, max_size=8).filter(lambda raw: b"\0" not in raw),
                 st.integers(50_000, 100_000))
# ':::' alone is add_job's bulk operator (documented), not an argument.
ARGUMENT = st.one_of(TEXT, RAW_BYTES, SHELLISH, LONG).filter(lambda arg: arg != ":::")


@settings(max_examples=40, deadline=None, database=None,
          # One server for all examples on purpose: a server per example would cost
          # seconds each, and each example queues a job of its own on it.
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(args=st.lists(ARGUMENT, max_size=4), value=ARGUMENT)
def test_arguments_and_variables_reach_the_job_byte_exact(server, args, value):
    if not getattr(server, "worker_added", False):
        server.ok("add_slave", "--slots", "4", "w1")
        server.worker_added = True
    # "--" after SCRIPT is a separator (the help's own example), so that args may
    # start with "--" themselves.
    job_id = server.add_job("-e", f"VALUE={value}", server.script, "--", *args)
    record = wait_until(lambda: server.record(job_id), what=f"job {job_id}'s record")
    assert [os.fsencode(arg) for arg in record["args"]] == [os.fsencode(arg) for arg in args]
    assert os.fsencode(record["env"]["VALUE"]) == os.fsencode(value)
    assert record["env"]["JOB_ID"] == str(job_id) and record["env"]["SLAVE_IP"] == "w1"
    assert not os.path.exists("/tmp/pwned")


def test_arguments_that_are_not_utf8_are_shown_as_they_were_in_any_locale(server):
    """A locale such as en_US.UTF-8 makes Python's stdout strict: printing the
    surrogate escapes of non-UTF-8 arguments was a UnicodeEncodeError."""
    raw = os.fsdecode(b"caf\xe9 \xff\xfe")
    strict = dict(server.env, PYTHONIOENCODING="utf-8:strict")
    job_id = server.add_job(server.script, raw, env=strict)
    for command in (["jobs", job_id], ["jobs"], ["status"]):
        result = subprocess.run([sys.executable, str(CLI), *map(str, command)], env=strict,
                                cwd=server.root, capture_output=True)
        assert result.returncode == 0 and not result.stderr, result.stderr
        assert os.fsencode(raw) in result.stdout
    assert server.status()["job_waitlist"][0]["args"] == [raw]


def test_start_times_and_timeouts_months_away_keep_the_server_up(server):
    """The server's select() sleep was the time to the next timer: past 24.8 days
    epoll refused it and the server died, on every start again."""
    server.add_job("--delay", "30d", server.script)
    server.add_job("--at", "9999-12-30T00:00:00Z", server.script)
    server.ok("add_slave", "w1")
    running = server.add_job("--timeout", "40d", server.script,
                             env=dict(server.env, SLEEP="60"))
    server.wait_for_counts(running=1, waiting=2)
    server.ok("stop")
    server.ok("start")
    assert [job["id"] for job in server.status()["running_jobs"]] == [running]
    assert server.status()["counts"]["waiting"] == 2


# --- invalid input, command by command ---------------------------------------------

@pytest.fixture(scope="module")
def queue(tmp_path_factory, ssh_sandbox):
    """One server for every row, in a state worth keeping: two workers, a finished,
    a running and three waiting jobs (one after another, one due in a month), a
    paused queue.  Each row must leave it exactly as it was."""
    cli = Cli(tmp_path_factory.mktemp("bad-input"), ssh_sandbox.env())
    cli.ok("start")
    try:
        cli.ok("add_slave", "--skip_ssh_auth_check", "--slots", "2", "-e", "A=1", "w1")
        cli.ok("add_slave", "--skip_ssh_auth_check", "w2")
        finished = cli.add_job(cli.script, "done")
        cli.ok("wait", finished)
        running = cli.add_job(cli.script, "runs", env=dict(cli.env, SLEEP="600"))
        cli.wait_for_counts(running=1)
        cli.ok("pause")
        waiting = cli.add_job(cli.script, "x")
        cli.add_job("--after", waiting, cli.script, "y")
        cli.add_job("--delay", "30d", cli.script, "z")
        plain = cli.write_script("plain.sh", "")
        plain.chmod(0o644)
        (cli.root / "args.txt").write_text("'unclosed\n")
        (cli.root / "afile").write_text("")
        cli.places = {
            "SCRIPT": str(cli.script), "PLAIN": str(plain), "ROOT": str(cli.root),
            "FINISHED": str(finished), "RUNNING": str(running), "WAITING": str(waiting),
            "NEXT_ID": str(waiting + 3), "ARGS_FILE": str(cli.root / "args.txt"),
            "BUSY": cli.status()["running_jobs"][0]["worker"],
            "ELSEWHERE": str(cli.root / "elsewhere"), "A_FILE": str(cli.root / "afile"),
        }
        yield cli
    finally:
        cli.run("stop")
        cli.end_leftover_jobs()


def full_status(cli):
    """What status --json prints, asked of the server in this process (a client
    process for each look would double the file's run time)."""
    return cli_module.request(str(cli.data_dir), "status")


WRONG = {"a": [1, None]}   # a value no parameter of any request takes


@pytest.mark.parametrize("command", sorted(set(cli_module.REQUESTS) - {"stop"}))
def test_each_parameter_of_each_request_refuses_what_it_does_not_take(queue, command):
    """REQUESTS drives this: every parameter of every request, given a value of no
    type it takes, is refused with a message (never an internal error), and the
    queue is left as it was."""
    before = full_status(queue)
    for name in cli_module.REQUESTS[command].params:
        with pytest.raises(cli_module.UserError) as refusal:
            cli_module.request(str(queue.data_dir), command, **{name: WRONG})
        assert "internal error" not in str(refusal.value), (name, str(refusal.value))
    assert full_status(queue) == before


def test_optional_parameters_may_be_left_out(queue):
    """What the table gives a default is optional: `jobs` alone lists every job."""
    jobs = cli_module.request(str(queue.data_dir), "jobs")
    assert [job["id"] for job in jobs] == list(range(1, len(jobs) + 1))


def refused(cli, argv, expect):
    """ARGV fails with one line 'Error: ...' containing EXPECT, and changes nothing."""
    places = re.compile(r"\b(" + "|".join(cli.places) + r")\b")
    argv = [places.sub(lambda match: cli.places[match[1]], word) for word in argv]
    before = full_status(cli)
    stderr = cli.fails(*argv, expect=expect)
    assert len(stderr.strip().splitlines()) == 1, f"more than one line for {argv}: {stderr}"
    assert full_status(cli) == before, f"{argv} changed the state"


def rows(*table):
    return pytest.mark.parametrize("argv, expect", [row[1:] for row in table],
                                   ids=[row[0] for row in table])


def reserved_rows(before, after, names=RESERVED):
    """BEFORE -e NAME=1 AFTER, for each variable that cli.py sets itself."""
    return [(f"reserved-{name}", [*before, "-e", f"{name}=1", *after], "cannot be overridden")
            for name in names]


# Workers' variables go through the same check as jobs' (validate_variable_name):
# two names there, every name where a job's own variables come in.
SOME_RESERVED = ("JOB_ID", "SLOTS")


DASH_HOST = "-oProxyCommand=touch /tmp/pwned"


@rows(
    ("leading-dash", ["add_slave", "--skip_ssh_auth_check", "--", DASH_HOST],
     "cannot start with '-'"),
    ("leading-dash-as-option", ["add_slave", "-oProxyCommand=x"],
     "unrecognized arguments: -oProxyCommand=x"),
    ("empty", ["add_slave", "--skip_ssh_auth_check", ""], "empty worker name"),
    ("space", ["add_slave", "--skip_ssh_auth_check", "a b"], "no spaces"),
    ("control-character", ["add_slave", "--skip_ssh_auth_check", "a\x01"], "invalid worker name"),
    ("already-registered", ["add_slave", "--skip_ssh_auth_check", "w1"], "remove_slave w1"),
    ("named-twice", ["add_slave", "--skip_ssh_auth_check", "w9", "w9"], "named twice"),
    ("slots-0", ["add_slave", "--skip_ssh_auth_check", "--slots", "0", "w9"], "at least 1"),
    ("slots-too-many", ["add_slave", "--skip_ssh_auth_check", "--slots", "100001", "w9"],
     "at most 100000"),
    ("slots-huge", ["add_slave", "--skip_ssh_auth_check", "--slots", "9" * 30, "w9"],
     "at most 100000"),
    ("slots-other-digits", ["add_slave", "--skip_ssh_auth_check", "--slots", "٢", "w9"],
     "at least 1"),
    *reserved_rows(["add_slave", "--skip_ssh_auth_check"], ["w9"], SOME_RESERVED),
    ("variable-without-equals", ["add_slave", "--skip_ssh_auth_check", "-e", "A", "w9"],
     "write -e NAME=VALUE"),
    ("variable-bad-name", ["add_slave", "--skip_ssh_auth_check", "-e", "1A=1", "w9"],
     "invalid variable name"),
    ("timeout-nan", ["add_slave", "--timeout", "nan", "w9"], "not a duration"),
    ("timeout-negative", ["add_slave", "--timeout=-1", "w9"], "not a duration"),
    ("timeout-0", ["add_slave", "--timeout", "0", "w9"], "longer than 0"),
    ("timeout-too-long", ["add_slave", "--timeout", "2d", "w9"], "too long"),
    ("unknown-option", ["add_slave", "--bogus", "w9"], "unrecognized arguments"),
)
def test_add_slave_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["remove_slave", "nope"], "./cli.py status"),
    ("leading-dash", ["remove_slave", "--", DASH_HOST], "cannot start with '-'"),
    ("empty", ["remove_slave", ""], "empty worker name"),
    ("wait-and-kill", ["remove_slave", "--wait", "--kill", "w2"], "choose one"),
    ("busy", ["remove_slave", "BUSY"], "--wait"),
    ("named-twice", ["remove_slave", "w2", "w2"], "named twice"),
    ("one-unknown", ["remove_slave", "w2", "nope"], "unknown worker 'nope'"),
    ("none", ["remove_slave"], "required: HOST"),
)
def test_remove_slave_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["edit_slave", "nope", "--slots", "2"], "./cli.py status"),
    ("leading-dash", ["edit_slave", "--slots", "2", "--", DASH_HOST], "cannot start with '-'"),
    ("empty", ["edit_slave", "", "--slots", "2"], "empty worker name"),
    ("nothing-to-change", ["edit_slave", "w1"], "give --slots"),
    ("slots-0", ["edit_slave", "w1", "--slots", "0"], "at least 1"),
    ("slots-too-many", ["edit_slave", "w1", "--slots", "100001"], "at most 100000"),
    ("slots-huge", ["edit_slave", "w1", "--slots", "9" * 30], "at most 100000"),
    *reserved_rows(["edit_slave", "w1"], [], SOME_RESERVED),
    ("unset-reserved", ["edit_slave", "w1", "--unset", "SLAVE_IP"], "cannot be overridden"),
    ("unset-missing", ["edit_slave", "w1", "--unset", "NOPE"], "no variable NOPE"),
    ("set-and-unset", ["edit_slave", "w1", "-e", "A=2", "--unset", "A"], "choose one"),
    ("variable-bad-name", ["edit_slave", "w1", "-e", "A-B=1"], "invalid variable name"),
)
def test_edit_slave_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    *reserved_rows(["add_job"], ["SCRIPT"]),
    ("variable-without-equals", ["add_job", "-e", "A", "SCRIPT"], "write -e NAME=VALUE"),
    ("variable-bad-name", ["add_job", "-e", "A B=1", "SCRIPT"], "invalid variable name"),
    ("missing-script", ["add_job", "./missing.sh"], "no such script"),
    ("not-executable", ["add_job", "PLAIN"], "chmod +x"),
    ("directory", ["add_job", "ROOT"], "not a file"),
    ("no-script", ["add_job"], "required: SCRIPT"),
    ("empty-script", ["add_job", ""], "empty script name"),
    ("timeout-negative", ["add_job", "--timeout=-5", "SCRIPT"], "not a duration"),
    ("timeout-0", ["add_job", "--timeout", "0", "SCRIPT"], "longer than 0"),
    ("timeout-nan", ["add_job", "--timeout", "nan", "SCRIPT"], "not a duration"),
    ("timeout-too-long", ["add_job", "--timeout", "99999999999w", "SCRIPT"], "too long"),
    ("delay-too-long", ["add_job", "--delay", "1000000d", "SCRIPT"], "too long"),
    ("delay-other-digits", ["add_job", "--delay", "٥m", "SCRIPT"], "not a duration"),
    ("retry-delay-without-retries", ["add_job", "--retry-delay", "5m", "SCRIPT"],
     "needs --retries"),
    ("retry-delay-word", ["add_job", "--retries", "3", "--retry-delay", "x", "SCRIPT"],
     "not a duration"),
    ("retries-negative", ["add_job", "--retries=-1", "SCRIPT"], "from 0 to 10000"),
    ("priority-huge", ["add_job", "--priority", "1000000001", "SCRIPT"],
     "from -1000000000 to 1000000000"),
    ("at-word", ["add_job", "--at", "yesterday", "SCRIPT"], "is not a time"),
    ("at-empty", ["add_job", "--at", "", "SCRIPT"], "is not a time"),
    ("at-year-0-in-utc", ["add_job", "--at", "0001-01-01T00:00:00+14:00", "SCRIPT"],
     "is not a time"),
    ("at-year-10000-in-utc", ["add_job", "--at", "9999-12-31T23:59:59-14:00", "SCRIPT"],
     "is not a time"),
    ("at-and-delay", ["add_job", "--at", "10:00", "--delay", "1m", "SCRIPT"], "choose one"),
    ("after-unknown", ["add_job", "--after", "999", "SCRIPT"], "unknown job id 999"),
    ("after-its-own-id", ["add_job", "--after", "NEXT_ID", "SCRIPT"], "unknown job id"),
    ("after-0", ["add_job", "--after", "0", "SCRIPT"], "job ids run from 1"),
    ("after-huge", ["add_job", "--after", str(MAX_JOB_ID + 1), "SCRIPT"], "job ids run from 1"),
    ("after-5000-digits", ["add_job", "--after", "9" * 5000, "SCRIPT"], "job ids run from 1"),
    ("after-too-many", ["add_job", "--after", "1-2000000", "SCRIPT"], "smaller ranges"),
    ("after-and-after-any", ["add_job", "--after", "WAITING", "--after-any", "WAITING",
                             "SCRIPT"], "choose one"),
    ("slots-0", ["add_job", "--slots", "0", "SCRIPT"], "at least 1"),
    ("slots-more-than-any-worker", ["add_job", "--slots", "3", "SCRIPT"], "add_slave --slots 3"),
    ("slots-too-many", ["add_job", "--slots", "100001", "SCRIPT"], "from 1 to 100000"),
    ("on-unknown", ["add_job", "--on", "nope", "SCRIPT"], "unknown worker 'nope' in --on"),
    ("on-leading-dash", ["add_job", f"--on={DASH_HOST}", "SCRIPT"], "cannot start with '-'"),
    ("prefer-leading-dash", ["add_job", "--prefer=-x", "SCRIPT"], "cannot start with '-'"),
    ("exclude-leading-dash", ["add_job", "--exclude=w1,-x", "SCRIPT"], "cannot start with '-'"),
    ("on-only-commas", ["add_job", "--on", ",", "SCRIPT"], "--on node1,node2"),
    ("exclude-unknown", ["add_job", "--exclude", "nope", "SCRIPT"], "in --exclude"),
    ("exclude-every-worker", ["add_job", "--exclude", "w1,w2", "SCRIPT"], "add_slave HOST"),
    ("on-excluded", ["add_job", "--on", "w1", "--exclude", "w1", "SCRIPT"], "excluded"),
    ("slots-more-than-on", ["add_job", "--on", "w2", "--slots", "2", "SCRIPT"],
     "no worker in --on has 2 slots"),
    ("args-file-missing", ["add_job", "--args-file", "/nonexistent", "SCRIPT"], "cannot read"),
    ("args-file-empty", ["add_job", "--args-file", "/dev/null", "SCRIPT"], "one line"),
    ("args-file-bad-quoting", ["add_job", "--args-file", "ARGS_FILE", "SCRIPT"],
     "fix the quoting"),
    ("args-file-and-groups", ["add_job", "--args-file", "ARGS_FILE", "SCRIPT", ":::", "a"],
     "not both"),
    ("empty-group", ["add_job", "SCRIPT", "a", ":::"], "at least one argument"),
    ("on-end-missing", ["add_job", "--on-end", "/nonexistent/notify", "SCRIPT"],
     "no such --on-end program"),
    ("on-end-empty", ["add_job", "--on-end", "", "SCRIPT"], "--on-end needs a program"),
    ("on-end-bad-quoting", ["add_job", "--on-end", "SCRIPT 'x", "SCRIPT"], "fix its quoting"),
    ("on-end-not-executable", ["add_job", "--on-end", "PLAIN", "SCRIPT"], "chmod +x"),
)
def test_add_job_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["remove_job", "999"], "unknown job id 999"),
    ("id-0", ["remove_job", "0"], "job ids run from 1"),
    ("huge", ["remove_job", "9" * 30], "job ids run from 1"),
    ("largest-id", ["remove_job", str(MAX_JOB_ID)], "never queued"),
    ("finished", ["remove_job", "FINISHED"], "already ended"),
    ("running", ["remove_job", "RUNNING"], "./cli.py kill"),
    ("range-with-unknown", ["remove_job", "WAITING-999"], "nothing was changed"),
    ("backwards", ["remove_job", "5-4"], "write 4-5"),
    ("no-such-command", ["remove_job", "SCRIPT", "nothing-like-this"], "no waiting job"),
    ("other-digits", ["remove_job", "٣"], "no waiting job"),
    ("none", ["remove_job"], "required"),
    ("empty", ["remove_job", ""], "no job ids given"),
)
def test_remove_job_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["kill", "999"], "unknown job id 999"),
    ("unknown-beside-running", ["kill", "RUNNING", "999"], "nothing was changed"),
    ("id-0", ["kill", "0"], "job ids run from 1"),
    ("finished", ["kill", "FINISHED"], "already ended"),
    ("grace-negative", ["kill", "--grace=-1", "WAITING"], "not a duration"),
    ("grace-too-long", ["kill", "--grace", "2d", "WAITING"], "at most 24 hours"),
    ("5000-digits", ["kill", "1-" + "9" * 5000], "job ids run from 1"),
)
def test_kill_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["priority", "5", "999"], "unknown job id 999"),
    ("finished", ["priority", "5", "FINISHED"], "still waiting"),
    ("running", ["priority", "5", "RUNNING"], "still waiting"),
    ("waiting-and-running", ["priority", "5", "WAITING", "RUNNING"], "nothing was changed"),
    ("too-high", ["priority", "1000000001", "WAITING"], "from -1000000000 to 1000000000"),
    ("id-0", ["priority", "5", "0"], "job ids run from 1"),
)
def test_priority_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["jobs", "999"], "unknown job id 999"),
    ("id-0", ["jobs", "0"], "ids run from 1"),
    ("huge", ["jobs", "9" * 30], "ids run from 1"),
    ("other-digits", ["jobs", "١"], "not one job id"),
    ("superscript", ["jobs", "²"], "not one job id"),
    ("state-unknown", ["jobs", "--state", "bogus"], "use waiting, running, done"),
    ("last-0", ["jobs", "--last", "0"], "at least 1"),
    ("last-huge", ["jobs", "--last", "9" * 30], "from 1 to"),
    ("id-and-filter", ["jobs", "FINISHED", "--state", "done"], "not both"),
)
def test_jobs_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["logs", "999"], "unknown job id 999"),
    ("id-0", ["logs", "0"], "ids run from 1"),
    ("other-digits", ["logs", "١"], "not one job id"),
    ("not-started", ["logs", "WAITING"], "logs -f"),
    ("none", ["logs"], "required: ID"),
)
def test_logs_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("unknown", ["wait", "999"], "unknown job id 999"),
    ("unknown-beside-finished", ["wait", "FINISHED", "999"], "unknown job id 999"),
    ("id-0", ["wait", "0"], "job ids run from 1"),
    ("huge", ["wait", "9" * 30], "job ids run from 1"),
)
def test_wait_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("negative", ["purge", "--older-than=-1d"], "not a duration"),
    ("word", ["purge", "--older-than", "old"], "not a duration"),
    ("too-long", ["purge", "--older-than", "1000000d"], "too long"),
)
def test_purge_refuses(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("pause-unknown", ["pause", "nope"], "./cli.py status"),
    ("pause-leading-dash", ["pause", "--", DASH_HOST], "cannot start with '-'"),
    ("pause-named-twice", ["pause", "w1", "w1"], "named twice"),
    ("pause-one-unknown", ["pause", "w1", "nope"], "unknown worker 'nope'"),
    ("resume-unknown", ["resume", "nope"], "./cli.py status"),
    ("resume-leading-dash", ["resume", "--", "-x"], "cannot start with '-'"),
)
def test_pause_and_resume_refuse(queue, argv, expect):
    refused(queue, argv, expect)


@rows(
    ("start-twice", ["start"], "already running"),
    ("start-on-end-missing", ["start", "--on-end", "/nonexistent/notify"],
     "no such --on-end program"),
    ("start-on-end-and-no-on-end", ["start", "--on-end", "SCRIPT", "--no-on-end"],
     "choose one"),
    ("start-hook-timeout-0", ["start", "--hook-timeout", "0", "ELSEWHERE"], "longer than 0"),
    ("start-check-interval-negative", ["start", "--check-interval=-1", "ELSEWHERE"],
     "not a duration"),
    ("start-check-interval-nan", ["start", "--check-interval", "nan", "ELSEWHERE"],
     "not a duration"),
    ("start-data-dir-is-a-file", ["start", "A_FILE"], "cannot start the server"),
    ("start-two-data-dirs", ["start", "ELSEWHERE", "--server_data_dir", "/tmp/other"],
     "use either DATA_DIR or --server_data_dir"),
    ("start-two-log-dirs", ["start", "ELSEWHERE", "/tmp/a", "--log_dir", "/tmp/b"],
     "use either LOG_DIR or --log_dir"),
    ("stop-no-server", ["stop", "--server_data_dir", "ELSEWHERE"], "start it with"),
    ("stop-extra-word", ["stop", "now"], "unrecognized arguments"),
    ("status-no-server", ["status", "--server_data_dir", "ELSEWHERE"], "start it with"),
    ("status-extra-word", ["status", "all"], "unrecognized arguments"),
    ("unknown-command", ["add_worker", "w9"], "invalid choice"),
    ("no-command", [], "required: COMMAND"),
)
def test_server_commands_refuse(queue, argv, expect):
    refused(queue, argv, expect)
    assert not pathlib.Path(queue.places["ELSEWHERE"], "server.pid").exists()


def bad_documents(script):
    """(id, the file's text, what the error says): load_status must refuse each whole."""
    job = {"script": script, "args": []}

    def document(jobs=(), slaves=(), **more):
        return json.dumps({"slaves": list(slaves), "job_waitlist": list(jobs), **more})

    def with_job(**fields):
        return document([dict(job, **fields)])

    def with_slave(**fields):
        return document(slaves=[dict({"ip": "w9"}, **fields)])
    return [
        ("not-json", "{not json", "not valid JSON"),
        ("a-list", "[]", "expected a JSON object"),
        ("too-deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("just-too-deep", '{"slaves": [], "job_waitlist": [], "x": ' + "[" * 990 + "]" * 990
         + "}", "nested too deeply"),
        ("slaves-not-a-list", json.dumps({"slaves": "w1", "job_waitlist": []}),
         "'slaves' must be a list"),
        ("no-waitlist", json.dumps({"slaves": []}), "'job_waitlist' must be a list"),
        ("paused-word", document(paused="yes"), "'paused' must be true or false"),
        ("environments-a-list", document(environments=[]), "'environments' must be an object"),
        ("slave-leading-dash", with_slave(ip=DASH_HOST), "cannot start with '-'"),
        ("slave-space", with_slave(ip="a b"), "no spaces"),
        ("slave-empty", with_slave(ip=""), "empty worker name"),
        ("slave-twice", document(slaves=[{"ip": "w9"}, {"ip": "w9"}]), "listed twice"),
        ("slave-slots-0", with_slave(slots=0), "at least 1"),
        ("slave-slots-huge", with_slave(slots=10 ** 30), "at most 100000"),
        *[(f"slave-reserved-{name}", with_slave(envs={name: "1"}), "cannot be overridden")
          for name in SOME_RESERVED],
        ("slave-envs-number", with_slave(envs={"A": 1}), "must be a string"),
        ("slave-envs-nul", with_slave(envs={"A": "x\0"}), "without NUL"),
        ("slave-ssh-reuse-word", with_slave(ssh_reuse="no"), "true or false"),
        ("job-not-an-object", document([5]), "must be an object"),
        *[(f"job-reserved-{name}", with_job(envs={name: "1"}), "cannot be overridden")
          for name in RESERVED],
        ("job-envs-bad-name", with_job(envs={"A=B": "1"}), "invalid variable name"),
        ("job-id-negative", with_job(id=-1), "from 1 to"),
        ("job-id-huge", with_job(id=10 ** 30), "from 1 to"),
        ("job-id-past-sqlite", with_job(id=MAX_JOB_ID + 1), "from 1 to"),
        # Ids only grow: no later job could get an id.
        ("job-id-largest", with_job(id=MAX_JOB_ID), "from 1 to"),
        ("job-id-text", with_job(id="../../x"), "from 1 to"),
        ("job-id-twice", document([dict(job, id=50), dict(job, id=50)]), "listed twice"),
        ("job-cycle", document([dict(job, id=50, after=[51]), dict(job, id=51, after_any=[50])]),
         "in a circle"),
        ("job-waits-on-itself", with_job(id=50, after=[50]), "in a circle"),
        ("job-after-unknown", with_job(after=[999]), "neither in the document"),
        ("job-after-huge", with_job(after=[10 ** 30]), "list of job ids"),
        ("job-after-and-after-any", with_job(after=[1], after_any=[1]), "both"),
        ("job-script-relative", with_job(script="record.py"), "must be absolute"),
        ("job-script-directory", with_job(script="/tmp"), "not a file"),
        ("job-script-not-executable", with_job(script="/etc/passwd"), "chmod +x"),
        ("job-script-nul", with_job(script=script + "\0x"), "no such script"),
        ("job-args-nul", with_job(args=["a\0b"]), "list of strings"),
        ("job-cwd-relative", with_job(cwd="../.."), "absolute path"),
        ("job-cwd-nul", with_job(cwd="/tmp\0x"), "absolute path"),
        ("job-environment-missing", with_job(environment=9), "not in 'environments'"),
        ("job-environment-number", document([dict(job, environment=1)],
                                            environments={"1": {"A": 1}}), "NAME: VALUE strings"),
        ("job-environment-empty-name", document([dict(job, environment=1)],
                                                environments={"1": {"": "x"}}),
         "NAME: VALUE strings"),
        ("job-umask-too-big", with_job(umask=4096), "0o777"),
        ("job-priority-huge", with_job(priority=10 ** 30), "'priority' must be"),
        ("job-retries-negative", with_job(retries=-1), "'retries' must be"),
        ("job-timeout-0", with_job(timeout=0), "more than 0"),
        ("job-timeout-huge", with_job(timeout=1e300), "'timeout' must be"),
        ("job-timeout-infinity", with_job().replace('"args": []', '"timeout": Infinity'),
         "'timeout' must be"),
        ("job-not-before-word", with_job(not_before="tomorrow"), "not an ISO 8601 time"),
        ("job-not-before-year-0", with_job(not_before="0001-01-01T00:00:00+14:00"),
         "not an ISO 8601 time"),
        ("job-not-before-year-10000", with_job(not_before="9999-12-31T23:59:59-14:00"),
         "not an ISO 8601 time"),
        ("job-submitted-at-year-10000", with_job(submitted_at="9999-12-31T23:59:59-14:00"),
         "not an ISO 8601 time"),
        ("job-slots-wanted-huge", with_job(slots_wanted=10 ** 6), "'slots_wanted' must be"),
        ("job-on-leading-dash", with_job(on=[DASH_HOST]), "cannot start with '-'"),
        ("job-exclude-leading-dash", with_job(exclude=["w1", "-x"]), "cannot start with '-'"),
        ("job-on-empty", with_job(on=[]), "non-empty list"),
    ]


BAD_DOCUMENTS = bad_documents("SCRIPT")


@pytest.mark.parametrize("index", range(len(BAD_DOCUMENTS)),
                         ids=[row[0] for row in BAD_DOCUMENTS])
def test_load_status_refuses(queue, tmp_path, index):
    _, text, expect = BAD_DOCUMENTS[index]
    path = tmp_path / "document.json"
    path.write_text(text.replace('"SCRIPT', json.dumps(queue.places["SCRIPT"])[:-1]))
    refused(queue, ["load_status", str(path)], expect)


def test_load_status_refuses_a_missing_file(queue, tmp_path):
    refused(queue, ["load_status", str(tmp_path / "missing.json")], "cannot read")


# --- what a document cannot reach ---------------------------------------------------

def test_a_document_chooses_neither_where_the_tool_writes_nor_the_reserved_variables(
        server, tmp_path):
    """A job's script and directory may be anywhere (they are the user's), but its
    log goes to LOG_DIR/job_ID.txt whatever the document says, and JOB_ID,
    SLAVE_IP, SLOT... are the server's even in a document's environments."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep")
    environment = dict(server.env, JOB_ID="666", SLAVE_IP="evil", SLOT="9", SLOTS="9",
                       JOB_ATTEMPT="9")
    document = {
        "server": {"pid": 1, "data_dir": str(outside), "log_dir": str(outside)},
        "slaves": [{"ip": "w1", "slots": 1, "running_job": None, "log": str(victim)}],
        "job_waitlist": [{"id": 7, "script": str(server.script), "args": [],
                          "cwd": str(outside), "environment": 1, "log": str(victim),
                          "state": "done", "worker": "w1", "attempt": 5}],
        "environments": {"1": environment},
        "running_jobs": [{"id": 8, "script": str(server.script), "log": str(victim)}],
    }
    path = tmp_path / "document.json"
    path.write_text(json.dumps(document))
    server.ok("load_status", path)
    server.ok("wait", 7)
    status = server.status()
    assert status["server"]["data_dir"] == str(server.data_dir)
    assert status["server"]["log_dir"] == str(server.log_dir)
    assert json.loads(server.ok("jobs", "--json"))[0]["log"] == str(server.log_dir / "job_7.txt")
    record = server.record(7)
    assert (record["env"]["JOB_ID"], record["env"]["SLAVE_IP"]) == ("7", "w1")
    assert (record["env"]["SLOT"], record["env"]["SLOTS"], record["env"]["JOB_ATTEMPT"]) == \
        ("0", "0", "1")
    assert "ran on w1" in (server.log_dir / "job_7.txt").read_text()
    server.ok("purge", "--older-than", "0")
    assert victim.read_text() == "keep"
    assert [entry.name for entry in outside.iterdir()] == ["victim.txt"]
