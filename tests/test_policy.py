"""Pure functions: scheduling decisions, environments, validation, state transitions."""
import importlib.util
import pathlib
import re
import zoneinfo

import pytest

spec = importlib.util.spec_from_file_location(
    "cli", pathlib.Path(__file__).resolve().parent.parent / "cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def worker(name, slots, busy=(), accepting=True):
    return cli.WorkerCapacity(name, slots, busy, accepting)


def jobs(*ids, **needs):
    return [cli.JobNeeds(job_id, **needs) for job_id in ids]


def plan(job_list, workers, placement="spread"):
    return cli.plan_starts(job_list, workers, placement)


def test_fifo_and_most_free_slots_first():
    starts = plan(jobs(1, 2, 3, 4), [worker("a", 2), worker("b", 3)])
    assert starts == [(1, "b", [0]), (2, "a", [0]), (3, "b", [1]), (4, "a", [1])]


def test_ties_go_to_the_worker_added_first():
    assert plan(jobs(7), [worker("a", 1), worker("b", 1)]) == [(7, "a", [0])]


def test_never_more_jobs_than_free_slots():
    starts = plan(jobs(*range(10)), [worker("a", 2, busy={0}), worker("b", 1)])
    assert len(starts) == 2
    assert (0, "a", [1]) in starts or (1, "a", [1]) in starts


def test_busy_slot_numbers_are_skipped():
    assert plan(jobs(1), [worker("a", 3, busy={0, 1})]) == [(1, "a", [2])]


def test_draining_workers_take_nothing():
    assert plan(jobs(1), [worker("a", 4, accepting=False)]) == []


def test_a_worker_over_its_slots_after_a_change_takes_nothing():
    assert plan(jobs(1), [worker("a", 1, busy={0, 1})]) == []


def test_inputs_are_not_modified():
    busy = {0}
    workers = [worker("a", 2, busy=busy)]
    plan(jobs(1), workers)
    assert workers[0].busy_slots == {0}


def test_the_queue_order_is_kept_whatever_the_ids():
    # plan_starts takes the order it is given (priority first): ids do not matter.
    starts = plan(jobs(9, 3, 5), [worker("a", 1), worker("b", 1)])
    assert [job_id for job_id, _, _ in starts] == [9, 3]


def test_multi_slot_jobs_take_the_lowest_free_slots_of_one_worker():
    starts = plan(jobs(1, slots=3), [worker("a", 2), worker("b", 4, busy={1})])
    assert starts == [(1, "b", [0, 2, 3])]
    assert plan(jobs(1, slots=3), [worker("a", 2), worker("b", 4, busy={1, 3})]) == []


def test_a_multi_slot_job_is_not_starved_by_small_ones_behind_it():
    # b is busy in 2 of its 4 slots; a 4-slot job waits for it, and the 1-slot
    # jobs behind it must not take b's free slots (they go to a, or wait).
    workers = [worker("a", 2), worker("b", 4, busy={0, 1})]
    starts = plan([cli.JobNeeds(1, slots=4), *jobs(2, 3, 4, 5)], workers)
    assert starts == [(2, "a", [0]), (3, "a", [1])]
    # Once b is free the big job starts there, ahead of the small ones.
    starts = plan([cli.JobNeeds(1, slots=4), *jobs(4, 5)], [worker("a", 2, busy={0, 1}),
                                                             worker("b", 4)])
    assert starts == [(1, "b", [0, 1, 2, 3])]


def test_a_reservation_goes_to_the_worker_closest_to_fitting():
    workers = [worker("a", 4, busy={0, 1, 2}), worker("b", 4, busy={0})]
    starts = plan([cli.JobNeeds(1, slots=4), *jobs(2, 3, 4)], workers)
    # b (3 free) is reserved; a's one free slot still serves a small job.
    assert starts == [(2, "a", [3])]


def test_priority_beats_fifo_because_the_caller_orders_the_jobs():
    urgent, old = cli.JobNeeds(50), cli.JobNeeds(1)
    assert plan([urgent, old], [worker("a", 1)]) == [(50, "a", [0])]


def test_on_restricts_and_prefer_only_prefers():
    workers = [worker("a", 2), worker("b", 2), worker("c", 1)]
    assert plan(jobs(1, on=["c"]), workers) == [(1, "c", [0])]
    assert plan(jobs(1, prefer=["c"]), workers) == [(1, "c", [0])]
    full_c = [worker("a", 2), worker("b", 2), worker("c", 1, busy={0})]
    assert plan(jobs(1, on=["c"]), full_c) == []
    assert plan(jobs(1, prefer=["c"]), full_c) == [(1, "a", [0])]


def test_exclude_is_never_broken():
    assert plan(jobs(1, exclude=["a"]), [worker("a", 4), worker("b", 1)]) == [(1, "b", [0])]
    assert plan(jobs(1, exclude=["a", "b"]), [worker("a", 4), worker("b", 1)]) == []


def test_affinity_with_all_allowed_workers_down_waits_and_reserves_nothing():
    workers = [worker("a", 4, accepting=False), worker("b", 2)]
    assert plan(jobs(1, on=["a"]), workers) == []
    starts = plan([cli.JobNeeds(1, slots=2, on=["a"]), *jobs(2, 3)], workers)
    assert starts == [(2, "b", [0]), (3, "b", [1])]


def test_retries_wait_for_a_worker_they_have_not_failed_on():
    workers = [worker("a", 4), worker("b", 1)]
    assert plan(jobs(1, avoid=["a"]), workers) == [(1, "b", [0])]
    # A broken worker would take every retry at once: wait for b instead ...
    assert plan(jobs(1, avoid=["a"]) + jobs(2), [worker("a", 4), worker("b", 1, busy={0})]) \
        == [(2, "a", [0])]
    # ... unless b cannot take it: down, too small, or failed on too.
    assert plan(jobs(1, avoid=["a"]), [worker("a", 4), worker("b", 1, accepting=False)]) == \
        [(1, "a", [0])]
    assert plan([cli.JobNeeds(1, slots=2, avoid=["a"])], [worker("a", 4), worker("b", 1)]) == \
        [(1, "a", [0, 1])]
    assert plan(jobs(1, avoid=["a", "b"]), [worker("a", 4), worker("b", 1)]) == \
        [(1, "a", [0])]


def test_a_retry_says_it_waits_for_a_worker_it_has_not_failed_on():
    job = {"after": [], "after_any": [], "not_before": None, "on": None, "exclude": None,
           "slots_wanted": 1}
    workers = [worker("a", 4), worker("b", 1, busy={0})]
    assert cli.waiting_reason(job, workers, False, 0, failed_on=["a"]) == \
        "a worker it has not failed on (b)"
    assert cli.waiting_reason(job, workers, False, 0) == "a free slot on any worker"


def test_unknown_workers_in_on_are_ignored():
    assert plan(jobs(1, on=["gone", "b"]), [worker("b", 1)]) == [(1, "b", [0])]


def test_many_workers_fill_every_slot_once():
    workers = [worker(f"n{number}", 2) for number in range(500)]
    starts = plan(jobs(*range(1200)), workers)
    assert len(starts) == 1000
    assert len({(name, tuple(slots)) for _, name, slots in starts}) == 1000


def test_job_environment_precedence_and_reserved_names():
    environment = cli.job_environment({"A": "caller", "B": "caller", "JOB_ID": "spoof"},
                                      {"B": "worker", "C": "worker"}, {"C": "job"}, 5, "w1")
    assert environment == {"A": "caller", "B": "worker", "C": "job", "JOB_ID": "5",
                           "SLAVE_IP": "w1", "JOB_ATTEMPT": "1", "SLOT": "0", "SLOTS": "0"}
    several = cli.job_environment({}, {}, {}, 5, "w1", attempt=3, slots=[2, 3, 5])
    assert (several["JOB_ATTEMPT"], several["SLOT"], several["SLOTS"]) == ("3", "2", "2,3,5")


def test_job_environment_puts_the_ssh_shim_first_on_path():
    environment = cli.job_environment({"PATH": "/usr/bin:/bin"}, {}, {"PATH": "/opt/bin"}, 5, "w1",
                                      ssh_shim=("/data/ssh/bin", "/data/ssh/1234abcd/%C", None))
    assert environment["PATH"] == "/data/ssh/bin:/opt/bin"
    assert environment["CLI_PY_SSH_SHIM_DIR"] == "/data/ssh/bin"
    assert environment["CLI_PY_SSH_CONTROL_PATH"] == "/data/ssh/1234abcd/%C"
    no_path = cli.job_environment({}, {}, {}, 5, "w1", ssh_shim=("/s", "/c/%C", None))
    assert no_path["PATH"] == "/s:" + cli.os.defpath


def test_ssh_control_paths_fit_a_unix_socket():
    for data_dir in ["/d", "/home/alice/a-rather-long/project/path/.data",
                     "/tmp/with space/.data", "/tmp/100%/.data", "/x/" + "y" * 200]:
        root = cli.ssh_reuse_root(data_dir)
        control_dir = cli.ssh_control_dir(root, "alice@node-1.example.org")
        # ssh adds a 17-byte suffix to %C (40 hex digits) while it sets up a master.
        assert len(control_dir + "/" + "c" * 40 + "." + "r" * 16) <= 107
        assert cli.PLAIN_PATH.match(control_dir)
    assert cli.ssh_reuse_root("/d") == "/d/ssh"


@pytest.mark.parametrize("text, expected", [
    ("A=b", ("A", "b")), ("A=", ("A", "")), ("A=b=c", ("A", "b=c")), ("_x1=y", ("_x1", "y"))])
def test_assignments(text, expected):
    assert cli.parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["A", "=b", "1A=b", "A-B=c", "JOB_ID=1", "SLAVE_IP=h", "A B=c"])
def test_bad_assignments(text):
    with pytest.raises(cli.UserError):
        cli.parse_assignment(text)


@pytest.mark.parametrize("name", ["node1", "10.0.0.7", "alice@node.example.org", "::1",
                                  "gpu_box-2", "fe80::1%eth0", "[::1]", "[::1]:2222",
                                  "root@127.0.0.1:22101", "alice@[fd00::5]:22", "node:2222"])
def test_good_host_names(name):
    assert cli.validate_host_name(name) == name


@pytest.mark.parametrize("name", ["", "-oProxyCommand=x", "a b", "a\tb", "a\nb", "a;b", "$(x)",
                                  "a/b", "\x07", "node[1-3]", "[::1", "x]", "[::1]x", "[node]:22",
                                  "node:ssh", "node:0", "node:65536", "@node", "a:b@node",
                                  "[::1]:22:22", "node:22:"])
def test_bad_host_names(name):
    with pytest.raises(cli.UserError):
        cli.validate_host_name(name)


@pytest.mark.parametrize("name, destination, entry", [
    ("node1", "node1", ""),
    ("alice@10.0.0.7", "alice@10.0.0.7", ""),
    ("root@127.0.0.1:22101", "root@cli.py-127.0.0.1-22101",
     "Host cli.py-127.0.0.1-22101\n    HostName 127.0.0.1\n    Port 22101\n"),
    ("::1", "cli.py---1", "Host cli.py---1\n    HostName ::1\n"),
    ("bob@[::1]", "bob@cli.py---1", "Host cli.py---1\n    HostName ::1\n"),
    ("[::1]:2222", "cli.py---1-2222", "Host cli.py---1-2222\n    HostName ::1\n    Port 2222\n"),
    ("fe80::1%eth0", "cli.py-fe80--1-eth0",
     "Host cli.py-fe80--1-eth0\n    HostName fe80::1%%eth0\n"),
])
def test_worker_names_reach_jobs_as_destinations_that_ssh_rsync_and_scp_all_take(
        name, destination, entry):
    address = cli.parse_worker_name(name)
    assert address.destination == destination
    assert not set(destination) & set(":[]*?")   # rsync's host:path split; shell globs
    assert address.config_entry() == entry
    assert cli.job_environment({}, {}, {}, 1, name)["SLAVE_IP"] == destination


def test_the_jobs_ssh_config_has_entries_only_for_aliases_then_the_queues_config():
    assert cli.jobs_ssh_config(["w1", "alice@node"], None) is None
    text = cli.jobs_ssh_config(["w1", "a@h:2222", "b@h:2222", "::1"], "/etc/q.conf")
    assert text.count("Host cli.py-h-2222\n") == 1 and "Host cli.py---1\n" in text
    assert text.endswith('Match all\nInclude "/etc/q.conf"\n')
    assert cli.jobs_ssh_config(["w1"], "none").endswith("Match all\n")
    assert 'Include "~/.ssh/config"\nInclude "/etc/ssh/ssh_config"' in \
        cli.jobs_ssh_config(["::1"], None)


def test_transitions_are_checked():
    cli.check_transition(cli.JOB_TRANSITIONS, cli.JobState.WAITING, cli.JobState.RUNNING)
    with pytest.raises(cli.IllegalTransition):
        cli.check_transition(cli.JOB_TRANSITIONS, cli.JobState.DONE, cli.JobState.RUNNING)
    with pytest.raises(cli.IllegalTransition):
        cli.check_transition(cli.WORKER_TRANSITIONS, cli.WorkerState.PAUSED,
                             cli.WorkerState.PAUSED)


def test_results():
    assert cli.result_of(0, False) is cli.JobResult.SUCCEEDED
    assert cli.result_of(1, False) is cli.JobResult.FAILED
    assert cli.result_of(None, False) is cli.JobResult.FAILED     # ended by a signal
    assert cli.result_of(0, True) is cli.JobResult.KILLED


def test_deep_data_dirs_get_a_short_socket_path():
    deep = "/x" * 80
    path = cli.socket_path(deep)
    assert len(path.encode()) <= cli.SOCKET_PATH_LIMIT
    assert path == cli.socket_path(deep)
    assert cli.socket_path("/short") == "/short/server.sock"


def test_event_masks_match_selectors():
    import selectors
    assert (cli.EVENT_READ, cli.EVENT_WRITE) == (selectors.EVENT_READ, selectors.EVENT_WRITE)


@pytest.mark.parametrize("argv, command", [
    (["add_job", "./a.sh"], "add_job"), (["--server_data_dir", "d", "status"], "status"),
    (["--server_data_dir=d", "wait"], "wait"), (["--help"], None), (["addjob"], None),
    ([], None), (["--server_data_dir", "add_job"], None)])
def test_only_the_named_command_is_built(argv, command):
    assert cli.command_named(argv) == command


def test_dependency_conditions():
    ok, failed = cli.JobResult.SUCCEEDED.value, cli.JobResult.FAILED.value
    assert cli.dependency_conditions([1, 2], [], {}) == ([(1, False), (2, False)], None)
    assert cli.dependency_conditions([1, 2], [], {1: ok}) == ([(2, False)], None)
    assert cli.dependency_conditions([1], [], {1: failed})[1] == \
        "job 1, which it runs --after, ended failed"
    assert cli.dependency_conditions([], [3, 4], {3: failed}) == ([(4, True)], None)
    assert cli.dependency_conditions([], [3, 4], {3: ok}) == ([], None)
    assert cli.dependency_conditions([], [3, 4], {3: failed, 4: "killed"})[1] == \
        "none of its --after-any jobs succeeded"


@pytest.mark.parametrize("spec, task_ids, most", [
    ("1-5", [1, 2, 3, 4, 5], None),
    ("0-9:5", [0, 5], None),
    ("1,4,9-12", [1, 4, 9, 10, 11, 12], None),
    ("1-1000%50", list(range(1, 1001)), 50),
    ("7", [7], None),
    ("3,1-3", [3, 1, 2], None),            # each once, in the order given
    ("0-1000000:500000", [0, 500000, 1000000], None),
])
def test_array_specs_read_as_slurm_reads_them(spec, task_ids, most):
    assert cli.parse_array_spec(spec) == (task_ids, most)


@pytest.mark.parametrize("spec, message", [
    ("5-1", "runs backwards: write 1-5"), ("1-10%0", "%K needs a whole number of at least 1"),
    ("1-10%", "%K needs"), ("1-2000000", "more than 1000000 tasks"), ("a-b", "is not an index"),
    ("1-10:0", "step of 1-10:0 must be at least 1"), ("", "is not an index"),
    ("-3", "is not an index"), ("1,,2", "is not an index"),
])
def test_bad_array_specs_are_one_clear_error(spec, message):
    with pytest.raises(cli.UserError, match=re.escape(message)):
        cli.parse_array_spec(spec)


def test_settled_at_once_keeps_the_conditions_a_new_job_does_not_wait_on():
    ok, failed = cli.JobResult.SUCCEEDED.value, cli.JobResult.FAILED.value
    assert cli.settled_at_once([1, 2], [], {1: ok}, False) == [(1, False, "met")]
    assert cli.settled_at_once([1, 2], [3], {1: failed}, True) == \
        [(1, False, "failed"), (2, False, "dropped"), (3, True, "dropped")]
    assert cli.settled_at_once([], [3, 4], {3: failed, 4: ok}, False) == \
        [(3, True, "failed"), (4, True, "met")]


@pytest.mark.parametrize("candidates, back, held", [
    # A failed job and the dependents its failure skipped, transitively.
    ({1: [], 2: [(1, False, "failed")], 3: [(2, False, "skipped")]}, {1, 2, 3}, {}),
    # Another --after job that failed and is not retried holds one back, and so
    # its own dependents.
    ({1: [], 2: [(1, False, "failed"), (9, False, "failed")], 3: [(2, False, "skipped")]},
     {1}, {2: (9, False, "failed"), 3: (2, False, "skipped")}),
    # Conditions on jobs that succeeded since, or have not ended, hold nothing.
    ({2: [(1, False, "succeeded"), (5, False, None)]}, {2}, {}),
    # --after-any: one coming back (or still to end) is enough; none is not.
    ({1: [], 2: [(1, True, "failed"), (9, True, "failed")]}, {1, 2}, {}),
    ({2: [(1, True, "failed"), (9, True, "killed")]}, set(), {2: (9, True, "killed")}),
    ({2: [(1, True, None), (9, True, "killed")]}, {2}, {}),
    # A removed prerequisite can never succeed.
    ({2: [(1, False, "removed")]}, set(), {2: (1, False, "removed")}),
])
def test_retried_together_brings_back_only_what_would_not_be_skipped_again(
        candidates, back, held):
    assert cli.retried_together(candidates) == (back, held)


@pytest.mark.parametrize("graph, cycle", [
    ({1: [2], 2: [3], 3: []}, None),
    ({1: [1]}, [1, 1]),
    ({1: [2], 2: [3], 3: [1]}, [1, 2, 3, 1]),
    ({5: [6, 7], 6: [7], 7: []}, None),           # a diamond is not a circle
    ({1: [9], 2: [1], 3: [2, 4], 4: [3]}, [3, 4, 3]),
])
def test_find_cycle(graph, cycle):
    assert cli.find_cycle(graph) == cycle


def test_room_left_that_the_queue_head_cannot_use_is_reported():
    workers = [worker("w1", 4), worker("w2", 1)]
    queue = [cli.JobNeeds(1), cli.JobNeeds(2, slots=4), *jobs(*range(3, 80), on=["w1"]),
             cli.JobNeeds(80)]
    starts = plan(queue, workers)
    assert starts == [(1, "w1", [0]), (80, "w2", [0])]
    assert starts.reserved == {"w1"} and starts.left == 0
    head_only = plan(queue[:-1], [worker("w1", 4), worker("w2", 1)])
    assert head_only.left == 1   # w2's slot: the server then looks deeper into the queue


def test_start_times_in_every_form_at_takes():
    import time
    now = time.time()
    soon = time.strftime("%H:%M", time.localtime(now + 120))
    assert 0 < cli.parse_start_time(soon) - now <= 180      # today, a minute or two from now
    past = time.strftime("%H:%M", time.localtime(now - 120))
    assert 86000 < cli.parse_start_time(past) - now <= 86400   # that time tomorrow
    assert cli.parse_start_time("2026-12-01T16:45:00+00:00") == 1796143500
    assert cli.parse_start_time("2026-12-01T16:45:00Z") == 1796143500
    with pytest.raises(cli.UserError, match="--at 'soon' is not a time"):
        cli.parse_start_time("soon")


@pytest.mark.parametrize("exit_code, signal, duration, ours, ran, verdict", [
    (255, None, 30.0, False, True, True),     # ssh could not get through (or lost it)
    (1, None, 0.2, False, True, True),        # non-zero within a second
    (None, 11, 0.2, False, True, True),       # a crash within a second
    (1, None, 5.0, False, True, False),       # a slower failure: the worker works
    (0, None, 0.1, False, True, False),       # a success, however quick
    (255, None, 0.1, True, True, None),       # killed or timed out by us: says nothing
    (127, None, 0.0, False, False, None),     # the script could not start here
])
def test_what_an_ended_attempt_says_of_its_worker(exit_code, signal, duration, ours, ran,
                                                  verdict):
    assert cli.worker_verdict(exit_code, signal, duration, ours, ran) is verdict


def test_a_worker_is_set_aside_only_while_jobs_work_elsewhere():
    assert cli.set_aside(3, 3, others_working=True)
    assert not cli.set_aside(2, 3, others_working=True)
    assert not cli.set_aside(3, 3, others_working=False)   # the jobs fail everywhere
    assert not cli.set_aside(9, 0, others_working=True)    # the rule is off


def test_free_retries_are_for_ssh_failures_and_bounded():
    assert cli.free_retry(255, False, 3, 0)
    assert cli.free_retry(255, False, 3, 2)
    assert not cli.free_retry(255, False, 3, 3)     # its own work may exit 255: at most 3
    assert not cli.free_retry(255, False, 0, 0)     # the rule is off
    assert not cli.free_retry(1, False, 3, 0)
    assert not cli.free_retry(255, True, 3, 0)      # killed


@pytest.mark.parametrize("spec, tasks, task_id, position", [
    (None, 3, 1, 0), (None, 3, 3, 2), (None, 3, 4, None), (None, 3, 0, None),
    ("0-99:5", 20, 95, 19), ("0-99:5", 20, 96, None), ("1,4,9-12", 6, 9, 2),
    ("1,4,9-12", 6, 5, None), ("1-1000000", 1_000_000, 1_000_000, 999_999),
])
def test_a_task_is_found_where_its_index_puts_it(spec, tasks, task_id, position):
    assert cli.task_position(spec, tasks, task_id) == position


def test_an_array_request_comes_from_a_spec_or_from_lists_and_lines():
    by_spec = cli.array_request("1-4%2", None, None)
    assert (list(by_spec.task_ids), by_spec.spec, by_spec.max_running) == ([1, 2, 3, 4], "1-4", 2)
    by_lists = cli.array_request(None, [["a"], ["b"]], None)
    assert (list(by_lists.task_ids), by_lists.spec, by_lists.max_running) == ([1, 2], None, None)
    by_lines = cli.array_request("%5", None, ["x", "y", "z"])
    assert (list(by_lines.task_ids), by_lines.task_args, by_lines.max_running) == \
        ([1, 2, 3], ["x", "y", "z"], 5)
    assert cli.array_request(None, None, None) is None       # one plain job
    assert cli.parse_array_spec("%7") == (None, 7)
    with pytest.raises(cli.UserError, match="use one"):
        cli.array_request("1-3", [["a"]], None)
    with pytest.raises(cli.UserError, match="there are none"):
        cli.array_request("%3", None, None)


def test_ids_are_described_as_runs():
    assert cli.describe_ids([3]) == "job 3"
    assert cli.describe_ids([5, 4, 6]) == "jobs 4-6"
    assert cli.describe_ids([1, 2, 3, 4, 9, 11, 12, 20, 21, 22]) == "jobs 1-4, 9, 11, 12, 20-22"


# --- split jobs and placement (issue 16) --------------------------------------------

def split_job(job_id, slots, **needs):
    return cli.JobNeeds(job_id, slots=slots, split=True, **needs)


def test_a_split_job_takes_the_fewest_workers_most_room_first():
    starts = plan([split_job(1, 6)], [worker("a", 4), worker("b", 4)])
    assert starts == [(1, "a", [0, 1, 2, 3])]
    assert starts.parts == {1: [("a", [0, 1, 2, 3]), ("b", [0, 1])]}
    # Most room first: 3 free on c beats 2 on b; the last part takes what is left.
    starts = plan([split_job(1, 5)], [worker("a", 4, busy={0, 1}), worker("b", 4, busy={0, 1}),
                                      worker("c", 3)])
    assert starts.parts == {1: [("c", [0, 1, 2]), ("a", [2, 3])]}


def test_a_split_job_that_one_worker_holds_runs_there_whole():
    starts = plan([split_job(1, 6)], [worker("a", 4), worker("b", 8)])
    assert starts == [(1, "b", [0, 1, 2, 3, 4, 5])]
    assert starts.parts == {1: [("b", [0, 1, 2, 3, 4, 5])]}
    # pack also keeps it whole, on the smallest worker that holds it.
    starts = plan([split_job(1, 6)], [worker("a", 4), worker("b", 16), worker("c", 8)],
                  placement="pack")
    assert starts.parts == {1: [("c", [0, 1, 2, 3, 4, 5])]}


def test_a_split_job_starts_all_or_nothing_and_reserves_what_it_waits_for():
    # 4 free of the 6 it needs: nothing starts for it, and the small jobs behind
    # it must not take the free slots of the workers it waits for.
    workers = [worker("a", 4, busy={0, 1}), worker("b", 4, busy={0, 1}), worker("c", 1)]
    starts = plan([split_job(1, 6), *jobs(2, 3, 4)], workers)
    assert starts == [(2, "c", [0])]
    assert starts.parts == {}
    assert starts.reserved == {"a", "b"}
    assert workers[0].busy_slots == {0, 1}   # (inputs untouched)


def test_a_split_job_prefers_to_reserve_one_worker_that_holds_it_all():
    workers = [worker("a", 4, busy={0}), worker("b", 8, busy={0, 1, 2, 3, 4, 5})]
    starts = plan([split_job(1, 6), *jobs(2)], workers)
    # 3 + 2 free is too little; b alone could hold it: b is reserved, a takes job 2.
    assert starts == [(2, "a", [1])]
    assert starts.reserved == {"b"}


def test_a_split_job_keeps_to_on_and_exclude():
    workers = [worker("a", 4), worker("b", 4), worker("c", 4)]
    starts = plan([split_job(1, 6, on=["b", "c"])], workers)
    assert starts.parts == {1: [("b", [0, 1, 2, 3]), ("c", [0, 1])]}
    starts = plan([split_job(1, 6, exclude=["a"])], workers)
    assert starts.parts == {1: [("b", [0, 1, 2, 3]), ("c", [0, 1])]}
    assert plan([split_job(1, 6, on=["a"])], workers) == []


def test_a_split_job_bigger_than_all_workers_together_waits_and_reserves_nothing():
    starts = plan([split_job(1, 9), *jobs(2)], [worker("a", 4), worker("b", 4)])
    assert starts == [(2, "a", [0])]
    assert starts.reserved == set()


def test_without_split_a_multi_slot_job_stays_on_one_worker():
    starts = plan(jobs(1, slots=6), [worker("a", 4), worker("b", 4)])
    assert starts == [] and starts.parts == {}


def test_pack_puts_a_job_on_the_smallest_worker_that_holds_it_spread_on_the_largest():
    workers = [worker("big", 16), worker("small", 4)]
    assert plan(jobs(1, slots=4), workers) == [(1, "big", [0, 1, 2, 3])]
    assert plan(jobs(1, slots=4), workers, placement="pack") == [(1, "small", [0, 1, 2, 3])]
    # Plain one-slot jobs too: pack fills the fullest worker that has room.
    workers = [worker("big", 16), worker("small", 4, busy={0}), worker("one", 1)]
    assert plan(jobs(1), workers) == [(1, "big", [0])]
    assert plan(jobs(1, 2, 3, 4, 5), workers, placement="pack") == [
        (1, "one", [0]), (2, "small", [1]), (3, "small", [2]), (4, "small", [3]),
        (5, "big", [0])]


def test_pack_leaves_the_large_worker_whole_for_a_large_job():
    workers = [worker("big", 16), worker("s1", 4), worker("s2", 4)]
    stream = [*jobs(1, 2, 3, 4), cli.JobNeeds(5, slots=16)]
    spread = plan(stream, workers)
    assert 5 not in [job_id for job_id, _, _ in spread]
    packed = plan(stream, workers, placement="pack")
    assert (5, "big", list(range(16))) in packed


def test_split_jobs_wait_for_slots_together_with_a_reason():
    job = {"after": [], "after_any": [], "not_before": None, "on": None, "exclude": None,
           "slots_wanted": 6, "split": True}
    assert cli.waiting_reason(job, [worker("a", 4), worker("b", 4, busy={0})], False, 0) == \
        "6 free slots at once (--split)"
    assert cli.waiting_reason(job, [worker("a", 4)], False, 0) == \
        "workers with 6 slots together"
    assert cli.waiting_reason({**job, "split": False}, [worker("a", 4), worker("b", 4)],
                              False, 0) == "no worker with 6 slots"


# --- schedules (issue 17): when a rule fires next, in local time ---

def at(text, zone):
    from datetime import datetime
    return datetime.fromisoformat(text).replace(tzinfo=zoneinfo.ZoneInfo(zone)).timestamp()


def shown(moment, zone):
    from datetime import datetime
    return None if moment is None else \
        datetime.fromtimestamp(moment, zoneinfo.ZoneInfo(zone)).isoformat()


@pytest.mark.parametrize("line, after, zone, expected", [
    ("*/15 * * * *", "2026-01-01 10:07", "UTC", "2026-01-01T10:15:00+00:00"),
    ("* * * * *", "2026-12-05 23:59:30", "UTC", "2026-12-06T00:00:00+00:00"),
    ("0 9 * * mon-fri", "2026-12-04 10:00", "UTC", "2026-12-07T09:00:00+00:00"),   # Fri -> Mon
    ("5 4 * * 7", "2026-11-30 00:00", "UTC", "2026-12-06T04:05:00+00:00"),         # 7: Sunday
    ("0 0 * jan sun", "2026-06-01 00:00", "UTC", "2027-01-03T00:00:00+00:00"),
    # Day of month and day of week both given: either matches (Tue 1 Dec, a 1st).
    ("0 0 1,15 * 5", "2026-11-30 12:00", "UTC", "2026-12-01T00:00:00+00:00"),
    ("0 12 29 2 *", "2026-03-01 00:00", "UTC", "2028-02-29T12:00:00+00:00"),
    ("0 0 30 2 *", "2026-01-01 00:00", "UTC", None),                                # never
    ("0 8-18/5 * * *", "2026-05-05 13:01", "UTC", "2026-05-05T18:00:00+00:00"),
    # The clocks go forward at 02:00 (Berlin, 29 March): 02:30 runs as they jump.
    ("30 2 * * *", "2026-03-29 00:00", "Europe/Berlin", "2026-03-29T03:00:00+02:00"),
    ("30 2 * * *", "2026-03-29 03:00", "Europe/Berlin", "2026-03-30T02:30:00+02:00"),
    # They go back at 03:00 (25 October): 02:30 comes twice and runs once.
    ("30 2 * * *", "2026-10-25 00:00", "Europe/Berlin", "2026-10-25T02:30:00+02:00"),
    ("30 2 * * *", "2026-10-25 02:30", "Europe/Berlin", "2026-10-26T02:30:00+01:00"),
    ("30 2 * * *", "2026-03-08 00:00", "America/New_York", "2026-03-08T03:00:00-04:00"),
])
def test_a_cron_rule_fires_next_when_a_table_of_known_answers_says(line, after, zone, expected):
    rule = cli.parse_cron(line)
    assert shown(cli.next_cron_time(rule, at(after, zone), cli_zone(zone)), zone) == expected


def cli_zone(name):
    return zoneinfo.ZoneInfo(name)


def test_daily_times_on_chosen_days_and_across_both_daylight_saving_changes():
    times, weekdays = cli.parse_daily("18:00,07:30"), cli.parse_days("mon-fri")
    assert times == [(7, 30), (18, 0)] and weekdays == {1, 2, 3, 4, 5}
    utc = cli_zone("UTC")
    moment = cli.next_daily_time(times, weekdays, at("2026-12-05 12:00", "UTC"), utc)  # a Sat
    assert shown(moment, "UTC") == "2026-12-07T07:30:00+00:00"
    # Every day at 02:30 in Berlin from March to November: once a day, never skipped.
    berlin = cli_zone("Europe/Berlin")
    moment, days = at("2026-03-01 00:00", "Europe/Berlin"), set()
    for _ in range(270):
        moment = cli.next_daily_time([(2, 30)], set(range(7)), moment, berlin)
        day = shown(moment, "Europe/Berlin")[:10]
        assert day not in days
        days.add(day)
    assert len(days) == 270 and "2026-03-29" in days and "2026-10-25" in days


@pytest.mark.parametrize("line, message", [
    ("0 0 * * * *", "a cron line has 5 fields"), ("0 0 *", "this one has 3"),
    ("60 * * * *", "'60' is not in the minute field's range (0-59)"),
    ("* 24 * * *", "cron hour '24': '24' is not in the hour field's range (0-23)"),
    ("* * 0 * *", "day of month field's range (1-31)"), ("* * * foo *", "or jan-dec"),
    ("* * * * 8", "the day of week field's range (0-7 or sun-sat)"),
    ("*/0 * * * *", "step '0'"), ("5-1 * * * *", "the range 5-1 runs backwards"),
    ("1,,2 * * * *", "'' is not in the minute field's range"),
])
def test_bad_cron_lines_name_the_field(line, message):
    with pytest.raises(cli.UserError, match=re.escape(message)):
        cli.parse_cron(line)


@pytest.mark.parametrize("text, message", [("25:00", "'25:00' is not a time of day"),
                                           ("7:5", "is not a time of day"),
                                           ("12:00,noon", "'noon' is not a time of day")])
def test_bad_daily_times_are_refused(text, message):
    with pytest.raises(cli.UserError, match=re.escape(message)):
        cli.parse_daily(text)


@pytest.mark.parametrize("due, now, skip_missed, overlap, live, expected", [
    (100.0, 100.0, False, False, False, "fire"),
    (100.0, 100.5, False, False, True, "skip"),      # the previous run has not ended
    (100.0, 100.5, False, True, True, "fire"),       # --overlap
    (50.0, 100.0, False, False, False, "fire"),      # due while no server ran: once
    (50.0, 100.0, True, False, False, "miss"),       # ... but not with --skip-missed
    (100.0, 170.0, True, False, False, "miss"),      # the machine slept past it
    (100.0, 159.0, True, False, False, "fire"),      # late, but not asleep
    (50.0, 100.0, True, False, True, "miss"),
])
def test_what_a_due_schedule_does(due, now, skip_missed, overlap, live, expected):
    assert cli.schedule_firing(due, now, 80.0, skip_missed, overlap, live) == expected


def test_schedule_rules_are_checked_and_stored_in_one_form():
    assert cli.schedule_rule(every=90) == {"every": 90.0}
    assert cli.schedule_rule(daily="19:00, 7:30", days="mon-fri") == \
        {"daily": "07:30,19:00", "days": "mon,tue,wed,thu,fri"}
    assert cli.schedule_rule(daily="07:30", days="sun-sat") == {"daily": "07:30", "days": None}
    assert cli.schedule_rule(cron=" 0  2 * * * ") == {"cron": "0 2 * * *"}
    assert cli.schedule_rule(after="build") == {"after": "build"}
    utc = cli_zone("UTC")
    start = at("2026-12-04 10:00", "UTC")   # a Friday
    assert cli.next_due_time({"every": 90.0}, start, utc) == start + 90
    assert shown(cli.next_due_time({"daily": "07:30,19:00", "days": "mon,tue,wed,thu,fri"},
                                   start, utc), "UTC") == "2026-12-04T19:00:00+00:00"
    assert cli.next_due_time({"after": "build"}, start, utc) is None
    assert [cli.rule_text(rule) for rule in (
        {"every": 5400.0}, {"daily": "07:30", "days": "sat,sun"}, {"cron": "0 2 * * *"},
        {"after": "build"})] == ["every 1h30m", "daily 07:30 (sat,sun)", "cron 0 2 * * *",
                                 "after build succeeds"]


@pytest.mark.parametrize("rule, message", [
    ({"every": 0}, "--every must be from 1s"), ({"every": True}, "--every must be from 1s"),
    ({"daily": 7}, "daily and days must be strings"), ({}, "a schedule needs a rule"),
    ({"every": 60, "after": "x"}, "--every and --after-schedule are two rules"),
    ({"after": "no spaces"}, "is not a schedule name"),
    ({"cron": "0 0 31 4,6,9,11 *"}, "never fires"),
])
def test_bad_schedule_rules(rule, message):
    with pytest.raises(cli.UserError, match=re.escape(message)):
        cli.schedule_rule(**rule)


# --- resources beyond slots (issue 19): GPUs by device, memory, named resources ---

def gpu_worker(name, slots, devices, held=(), mem=0, named=None, busy=()):
    return cli.WorkerCapacity(name, slots, busy, True,
                              cli.Resources(devices, mem, named, held))


def only(grants):
    """The grant of a job that runs on one worker (Plan.grants: {worker: grant})."""
    (grant,) = grants.values()
    return grant


def gpu_jobs(*ids, gpus=0, mem=0, named=None, slots=1):
    return [cli.JobNeeds(job_id, slots, need=cli.ResourceNeed(int(gpus * cli.GPU_UNITS), mem,
                                                               named)) for job_id in ids]


def test_gpu_jobs_get_distinct_devices_and_wait_when_none_is_free():
    workers = [gpu_worker("a", 8, ["0", "1", "2", "3"])]
    starts = plan(gpu_jobs(1, 2, gpus=1) + gpu_jobs(3, gpus=2) + gpu_jobs(4, gpus=1), workers)
    assert [job_id for job_id, _, _ in starts] == [1, 2, 3]
    assert [only(starts.grants[job_id])["gpus"] for job_id in (1, 2, 3)] == [["0"], ["1"], ["2", "3"]]
    # Job 4 waits for a device, and keeps its place: its slot, and the GPUs.
    assert starts.kept == {"a": {"gpus"}} and not starts.reserved
    assert len(workers[0].busy_slots) == 0   # (the plan works on copies)
    assert workers[0].resources.gpu_free == {"0": 1000, "1": 1000, "2": 1000, "3": 1000}


def test_gpu_shares_pack_onto_one_device_and_leave_whole_ones_free():
    held = [{"gpus": ["1"], "gpu_share": 500}]
    workers = [gpu_worker("a", 8, ["0", "1", "2"], held)]
    starts = plan(gpu_jobs(1, gpus=0.5) + gpu_jobs(2, gpus=0.5) + gpu_jobs(3, gpus=2), workers)
    # Job 1 fills device 1; job 2 takes half of device 0; two whole devices are not
    # left for job 3 (0 is half used), so it waits.
    assert [(job_id, only(starts.grants[job_id])["gpus"]) for job_id, _, _ in starts] == \
        [(1, ["1"]), (2, ["0"])]
    assert only(starts.grants[1]) == {"gpus": ["1"], "gpu_share": 500, "mem": 0, "named": {}}


def test_every_resource_must_be_free_at_once_on_one_worker():
    workers = [gpu_worker("a", 4, ["0"], mem=16 << 30, named={"licence": 1}),
               gpu_worker("b", 4, ["0", "1"], mem=64 << 30)]
    starts = plan(gpu_jobs(1, gpus=1, mem=32 << 30) + gpu_jobs(2, named={"licence": 1}) +
                  gpu_jobs(3, named={"licence": 1}), workers)
    assert [(job_id, worker) for job_id, worker, _ in starts] == [(1, "b"), (2, "a")]
    assert only(starts.grants[2])["named"] == {"licence": 1}
    # Job 3 waits for the licence, on the worker that has one.
    assert starts.kept == {"a": {"licence"}}


def test_a_job_wanting_4_gpus_is_not_starved_by_a_stream_of_1_gpu_jobs():
    # Two of four devices busy: the 4-GPU job reserves the worker, and the 1-GPU jobs
    # behind it do not take the devices that free up.
    held = [{"gpus": ["0"], "gpu_share": 1000}, {"gpus": ["1"], "gpu_share": 1000}]
    workers = [gpu_worker("a", 8, ["0", "1", "2", "3"], held, busy=[0, 1])]
    starts = plan(gpu_jobs(1, gpus=4) + gpu_jobs(2, 3, gpus=1), workers)
    assert list(starts) == [] and starts.kept == {"a": {"gpus"}}


def test_a_job_waiting_for_gpus_keeps_them_but_not_the_workers_cpus():
    # 8 slots, 2 of 4 devices busy: the 4-GPU job keeps the GPUs and one slot; plain
    # jobs and jobs that take other resources still start there, up to 7 slots.
    held = [{"gpus": ["0", "1"], "gpu_share": 1000}]
    workers = [gpu_worker("a", 8, ["0", "1", "2", "3"], held, mem=64 << 30, busy=[0])]
    queue = gpu_jobs(1, gpus=4) + gpu_jobs(2, gpus=1) + jobs(3, 4, 5) + \
        gpu_jobs(6, mem=8 << 30) + jobs(7, 8, 9, 10)
    starts = plan(queue, workers)
    assert [job_id for job_id, _, _ in starts] == [3, 4, 5, 6, 7, 8]
    assert sorted(slot for _, _, slots in starts for slot in slots) == [2, 3, 4, 5, 6, 7]
    # A job short of slots as well reserves the whole worker, as before.
    workers = [gpu_worker("a", 4, ["0", "1", "2", "3"], held, busy=[0, 1, 2])]
    starts = plan(gpu_jobs(1, gpus=4, slots=2) + jobs(2), workers)
    assert list(starts) == [] and starts.reserved == {"a"}


def test_a_worker_edited_down_below_what_runs_grants_nothing_more():
    held = [{"gpus": ["0"], "gpu_share": 1000}, {"gpus": ["3"], "gpu_share": 1000}]
    workers = [gpu_worker("a", 8, ["0", "1"], held)]   # devices 2 and 3 were removed
    starts = plan(gpu_jobs(1, 2, gpus=1), workers)
    assert [only(starts.grants[job_id])["gpus"] for job_id, _, _ in starts] == [["1"]]


def test_plain_jobs_take_no_gpu_and_may_run_beside_gpu_jobs():
    workers = [gpu_worker("a", 2, ["0"])]
    starts = plan(jobs(1) + gpu_jobs(2, gpus=1), workers)
    assert [(job_id, slots) for job_id, _, slots in starts] == [(1, [0]), (2, [1])]
    assert 1 not in starts.grants and only(starts.grants[2])["gpus"] == ["0"]


def test_sizes_are_read_and_written_as_free_h_shows_them():
    assert [cli.parse_size(text, "--mem") for text in ("512", "16G", "1.5T", "256MiB", "2g")] \
        == [512, 16 << 30, 3 << 39, 256 << 20, 2 << 30]
    assert [cli.size_text(count) for count in (512, 16 << 30, 3 << 39, 1536 << 20)] == \
        ["512", "16G", "1.5T", "1.5G"]
    with pytest.raises(cli.UserError, match="is not an amount of memory"):
        cli.parse_size("lots", "--mem")


def test_a_resource_job_says_what_it_waits_for():
    held = [{"gpus": ["0"], "gpu_share": 1000, "mem": 8 << 30}]
    workers = [gpu_worker("a", 8, ["0", "1"], held, mem=16 << 30, named={"licence": 1})]
    def reason(**need):
        return cli.resource_shortfall(cli.ResourceNeed(**need), workers)
    assert reason(gpus=2000) == "needs 2 GPUs together; most free on one worker: 1"
    assert reason(gpus=1000) is None
    assert reason(mem=12 << 30) == "needs 12G memory; most free on one worker: 8G"
    assert reason(named={"licence": 2}) == "needs licence=2; most free on one worker: 1"
    workers[0].resources.hold({"gpus": ["1"], "gpu_share": 700})
    assert reason(gpus=500) == "needs 0.5 GPU of one device; most free on one device: 0.3 GPU"
    # As status says it: a worker that could never hold it (edited down) is named so.
    job = {"after": [], "after_any": [], "not_before": None, "on": None, "exclude": None,
           "slots_wanted": 1, "id": 9, "array": None}
    assert cli.waiting_reason({**job, "resources": {"gpus": 4}}, workers, False, 0) == \
        "no worker with 4 GPUs (add one, or declare them: edit_slave)"
    assert cli.waiting_reason({**job, "resources": {"gpus": 2}}, workers, False, 0) == \
        "needs 2 GPUs together; most free on one worker: 0"
    assert cli.waiting_reason({**job, "resources": {"licence": 1}}, workers, False, 0,
                              holders={"a": 7}) == "room on a is kept for job 7, ahead of it"


def running(*runs):
    """Running jobs as WorkerCapacity.running takes them: (end, slots, grant)."""
    return list(runs)


def test_backfill_starts_a_short_job_before_the_reserved_big_one_could_start():
    # 4 slots, 3 busy until t=100 (estimated): a 4-slot job reserves the worker and
    # could start at 100.  A 1-slot job of 50 s fits before; one of 200 s does not.
    worker = cli.WorkerCapacity("a", 4, [0, 1, 2], True, cli.NO_RESOURCES,
                                running((100.0, 3, None)))
    queue = jobs(1, slots=4) + [cli.JobNeeds(2, estimate=200), cli.JobNeeds(3, estimate=50),
                                cli.JobNeeds(4)]
    starts = cli.plan_starts(queue, [worker], now=10.0)
    assert [job_id for job_id, _, _ in starts] == [3] and starts.backfilled == [3]
    assert starts.reserved == {"a"}


def test_no_backfill_without_estimates_or_once_a_running_job_overran():
    queue = jobs(1, slots=4) + [cli.JobNeeds(2, estimate=5)]
    unknown = cli.WorkerCapacity("a", 4, [0, 1, 2], True, cli.NO_RESOURCES,
                                 running((None, 3, None)))
    assert list(cli.plan_starts(queue, [unknown], now=10.0)) == []
    overran = cli.WorkerCapacity("a", 4, [0, 1, 2], True, cli.NO_RESOURCES,
                                 running((8.0, 3, None)))   # expected to end at 8; now 10
    assert list(cli.plan_starts(queue, [overran], now=10.0)) == []


def test_backfill_of_gpu_jobs_counts_devices_that_free_up():
    held = {"gpus": ["0", "1"], "gpu_share": 1000}
    worker = cli.WorkerCapacity("a", 8, [0], True, cli.Resources(["0", "1", "2", "3"], 0,
                                                                  None, [held]),
                                running((300.0, 1, held)))
    queue = gpu_jobs(1, gpus=4) + [
        cli.JobNeeds(2, need=cli.ResourceNeed(1000), estimate=400),
        cli.JobNeeds(3, need=cli.ResourceNeed(2000), estimate=100)]
    starts = cli.plan_starts(queue, [worker], now=0.0)
    assert [(job_id, only(starts.grants[job_id])["gpus"]) for job_id, _, _ in starts] == \
        [(3, ["2", "3"])]


def test_a_retry_gets_the_devices_it_held_before_when_they_are_free():
    workers = [gpu_worker("a", 8, ["0", "1", "2", "3"])]
    queue = [cli.JobNeeds(1, need=cli.ResourceNeed(2000),
                          previous={"a": {"gpus": ["1", "3"], "gpu_share": 1000}}),
             cli.JobNeeds(2, need=cli.ResourceNeed(1000),
                          previous={"b": {"gpus": ["3"], "gpu_share": 1000}})]
    starts = plan(queue, workers)
    assert only(starts.grants[1])["gpus"] == ["1", "3"]   # the same devices again
    assert only(starts.grants[2])["gpus"] == ["0"]        # held on another worker: any


def test_a_split_job_takes_its_gpus_per_slot_on_each_worker():
    # 3 slots of 1 GPU each: worker a has 6 free slots but 2 free devices, b 2 of 2.
    held = [{"gpus": ["0", "1"], "gpu_share": 1000}]
    workers = [gpu_worker("a", 8, ["0", "1", "2", "3"], held, busy=[0, 1]),
               gpu_worker("b", 2, ["0", "1"])]
    job = cli.JobNeeds(1, slots=3, split=True, need=cli.ResourceNeed(1000))
    starts = plan([job], workers)
    assert starts.parts[1] == [("a", [2, 3]), ("b", [0])]
    assert starts.grants[1] == {"a": {"gpus": ["2", "3"], "gpu_share": 1000, "mem": 0,
                                      "named": {}},
                                "b": {"gpus": ["0"], "gpu_share": 1000, "mem": 0, "named": {}}}
    # Whole on one worker when one holds it all: 3 GPUs on a fresh 4-GPU worker.
    starts = plan([job], [gpu_worker("c", 4, ["0", "1", "2", "3"])])
    assert only(starts.grants[1])["gpus"] == ["0", "1", "2"]


def test_a_split_job_does_not_take_gpus_kept_for_a_job_ahead_of_it():
    held = [{"gpus": ["0", "1"], "gpu_share": 1000}]
    workers = [gpu_worker("a", 8, ["0", "1", "2", "3"], held, busy=[0]),
               gpu_worker("b", 8, ["0", "1", "2", "3"], held, busy=[0])]
    split = cli.JobNeeds(2, slots=4, split=True, need=cli.ResourceNeed(1000))
    starts = plan(gpu_jobs(1, gpus=4) + [split], workers)
    # Job 1 keeps a's GPUs; job 2 may use b's two free ones only, which is not enough.
    assert list(starts) == [] and starts.kept["a"] == {"gpus"}


def test_a_job_asking_more_than_any_worker_has_is_refused_with_the_reason():
    allowed = {"a": (8, cli.Resources(["0", "1"], 64 << 30, {"licence": 2})),
               "b": (4, cli.Resources(["0"], 16 << 30))}

    def why(split=None, **need):
        return cli.resources_beyond(cli.ResourceNeed(**need), split, allowed, {"licence"},
                                    False)
    assert why(gpus=2000) is None and why(gpus=500, mem=64 << 30) is None
    assert why(gpus=4000) == ("no worker has 4 GPUs (the most is 2): declare them with "
                              "./cli.py add_slave --gpus N HOST (or edit_slave), or ask for fewer")
    assert "no worker has 128G memory (the most is 64G)" in why(mem=128 << 30)
    assert "no worker has licence=3 (the most is 2)" in why(named={"licence": 3})
    assert why(named={"matlab": 1}).startswith("unknown resource 'matlab': no worker declares")
    assert why(gpus=2000, named={"licence": 1}) is None
    # Each alone fits somewhere, not together on one worker.
    assert why(gpus=2000, mem=32 << 30, named={"licence": 2}) is None
    assert why(gpus=1000, mem=16 << 30) is None
    allowed["b"] = (4, cli.Resources(["0"], 16 << 30, {"licence": 1}))
    assert why(gpus=2000, mem=128 << 30) is not None
    assert why(split=3, gpus=1000) is None              # 2 on a, 1 on b
    assert "hold 3 slots with 1 GPU each together, fewer than --slots 4" in why(split=4,
                                                                               gpus=1000)


def test_spread_puts_a_gpu_job_where_most_gpus_are_free_and_pack_where_fewest():
    # a: 1 of 4 devices free, 12 free slots; b: all 4 free, 2 free slots.
    def workers():
        return [gpu_worker("a", 16, ["0", "1", "2", "3"],
                           [{"gpus": ["0", "1", "2"], "gpu_share": 1000}], busy=[0, 1, 2, 3]),
                gpu_worker("b", 4, ["0", "1", "2", "3"], busy=[0, 1])]
    spread = cli.plan_starts(gpu_jobs(1, gpus=1), workers(), "spread")
    packed = cli.plan_starts(gpu_jobs(1, gpus=1), workers(), "pack")
    assert [worker for _, worker, _ in spread] == ["b"]   # (a has more free slots)
    assert [worker for _, worker, _ in packed] == ["a"]   # b stays whole for a 4-GPU job


def test_gpu_options_of_workers_and_jobs():
    assert cli.worker_gpus("4") == ["0", "1", "2", "3"]
    assert cli.worker_gpus("0, 2,5") == ["0", "2", "5"]
    assert [cli.job_gpus(text) for text in ("2", "0.5", "0.25", "1")] == [2000, 500, 250, 1000]
    for bad, message in [("1.5", "shares are of one device"), ("0,1", "not device ids"),
                         ("0", "ask for 1 to"), ("-1", "ask for 1 to"), ("x", "not a number"),
                         ("0.0001", "in thousandths"), ("inf", "not a number"),
                         ("1e400", "not a number"), ("nan", "not a number")]:
        with pytest.raises(cli.UserError, match=re.escape(message)):
            cli.job_gpus(bad)
    for bad in ("0", "1,1", "a,b"):
        with pytest.raises(cli.UserError):
            cli.worker_gpus(bad)


def test_a_grant_reaches_the_job_as_variables():
    grant = {"gpus": ["1", "3"], "gpu_share": 1000, "mem": 16 << 30,
             "named": {"licence": 1, "fpga-slot": 2}}
    assert cli.resource_variables(grant) == {
        "CUDA_VISIBLE_DEVICES": "1,3", "GPU_IDS": "1,3", "MEM": str(16 << 30),
        "RESOURCE_LICENCE": "1", "RESOURCE_FPGA_SLOT": "2"}
    assert cli.resource_variables({"gpus": [], "gpu_share": 0, "mem": 0, "named": {}}) == {}
