"""The lifecycle layer on a temporary Store: no sockets, no processes.

Every state change of a job or a worker goes through one checked function
(Store.change_jobs, WorkerRows.change_state and change_health); these tests
try every move, legal or not, and the races that must be reported.
"""
import itertools
import re
import logging
import sqlite3
import time

import pytest

import cli

JOB_STATES = list(cli.JobState)
WORKER_STATES = list(cli.WorkerState)
HEALTHS = list(cli.WorkerHealth)
# What a mover must give for each state (JOB_STATE_COLUMNS' REQUIRED ones).
ENTERING = {
    cli.JobState.WAITING: {},
    cli.JobState.BLOCKED: {},
    cli.JobState.RUNNING: {"worker": "w1", "slot": 0, "slots": None, "started_at": 1.0,
                           "attempt": 1, "log": "/tmp/job.txt"},
    cli.JobState.DONE: {"result": "killed", "ended_at": 2.0, "reason": "a test"},
}


class RecordedEvents(cli.Events):
    def __init__(self):
        self.moved = []
        self.removed = []
        self.workers_changes = 0

    def jobs_moved(self, job_ids, state):
        self.moved.append((list(job_ids), state))

    def jobs_removed(self, job_ids):
        self.removed.append(list(job_ids))

    def workers_changed(self, names=()):
        self.workers_changes += 1


@pytest.fixture
def store(tmp_path):
    store = cli.Store(str(tmp_path / "state.db"))
    yield store
    store.close()


def make_lifecycle(store, tmp_path, events):
    """(queue, workers, timers) over STORE, telling EVENTS what happens."""
    log = logging.getLogger("test_queue")
    timers = cli.Timers(log, (sqlite3.Error, OSError))
    workers = cli.Workers(store, timers, events, log)
    return cli.Queue(store, workers, timers, events, log, str(tmp_path)), workers, timers


@pytest.fixture
def lifecycle(store, tmp_path):
    events = RecordedEvents()
    queue, workers, _ = make_lifecycle(store, tmp_path, events)
    return queue, workers, events


def new_job(store, blocked=False):
    options = dict(cli.JOB_OPTIONS, blocked=int(blocked))
    with store.transaction():
        environment = store.intern_environment({})
        first, _ = store.insert_jobs("/bin/true", [[]], "/", environment, {}, 0o22, options)
    return first


def job_in(store, state):
    """A job moved to STATE along legal moves."""
    job_id = new_job(store, blocked=state == cli.JobState.BLOCKED)
    if state in (cli.JobState.RUNNING, cli.JobState.DONE):
        with store.transaction():
            store.change_jobs([job_id], cli.JobState.WAITING, state, **ENTERING[state])
    return job_id


def state_of(store, job_id):
    row = store.job(job_id)
    if row["state"] == "waiting":
        return cli.JobState.BLOCKED if row["blocked"] else cli.JobState.WAITING
    return cli.JobState(row["state"])


@pytest.mark.parametrize("old,new", list(itertools.product(JOB_STATES, JOB_STATES)),
                         ids=lambda state: state.value)
def test_every_job_move_is_checked_against_the_table(store, old, new):
    job_id = job_in(store, old)
    before = dict(store.job(job_id))
    legal = new in cli.JOB_TRANSITIONS[old]
    if not legal:
        with pytest.raises(cli.IllegalTransition):
            with store.transaction():
                store.change_jobs([job_id], old, new, **ENTERING[new])
        assert dict(store.job(job_id)) == before
        return
    with store.transaction():
        store.change_jobs([job_id], old, new, **ENTERING[new])
    assert state_of(store, job_id) == new
    row = store.job(job_id)
    # The state's columns are set: given, or their defaults.
    for column, default in cli.JOB_STATE_COLUMNS[new].items():
        if column in ENTERING[new]:
            assert row[column] == ENTERING[new][column], column
        elif default is not cli.UNCHANGED:
            assert row[column] == default, column
        else:
            assert row[column] == before[column], column


def test_a_move_from_a_state_the_job_is_not_in_is_a_lost_race_and_rolls_back(store):
    running, done = job_in(store, cli.JobState.RUNNING), job_in(store, cli.JobState.DONE)
    waiting = job_in(store, cli.JobState.WAITING)
    with pytest.raises(cli.LostRace, match="1 of 2 job"):
        with store.transaction():
            store.change_jobs([waiting, done], cli.JobState.WAITING, cli.JobState.RUNNING,
                              **ENTERING[cli.JobState.RUNNING])
    # The half that matched is not left moved.
    assert state_of(store, waiting) == cli.JobState.WAITING
    with pytest.raises(cli.LostRace):
        with store.transaction():
            store.change_jobs([running], cli.JobState.WAITING, cli.JobState.DONE,
                              **ENTERING[cli.JobState.DONE])
    assert state_of(store, running) == cli.JobState.RUNNING


def test_a_move_may_only_set_the_columns_its_state_owns(store):
    job_id = job_in(store, cli.JobState.WAITING)
    with pytest.raises(cli.IllegalTransition, match="does not own priority"):
        store.change_jobs([job_id], cli.JobState.WAITING, cli.JobState.DONE, priority=3,
                          **ENTERING[cli.JobState.DONE])
    with pytest.raises(cli.IllegalTransition, match="needs worker"):
        store.change_jobs([job_id], cli.JobState.WAITING, cli.JobState.RUNNING, slot=0)
    assert state_of(store, job_id) == cli.JobState.WAITING


def test_a_waiting_job_of_either_kind_moves_when_both_are_named(store):
    waiting, blocked = job_in(store, cli.JobState.WAITING), job_in(store, cli.JobState.BLOCKED)
    with store.transaction():
        store.change_jobs([waiting, blocked], (cli.JobState.WAITING, cli.JobState.BLOCKED),
                          cli.JobState.DONE, **ENTERING[cli.JobState.DONE])
    assert state_of(store, waiting) == state_of(store, blocked) == cli.JobState.DONE


def test_skipping_a_job_that_is_not_waiting_is_reported_not_swallowed(store):
    running = job_in(store, cli.JobState.RUNNING)
    with pytest.raises(cli.LostRace):
        with store.transaction():
            store.skip(running, "its dependency failed")
    assert state_of(store, running) == cli.JobState.RUNNING


def test_removing_a_job_that_is_no_longer_waiting_is_reported(store):
    running = job_in(store, cli.JobState.RUNNING)
    with pytest.raises(cli.LostRace):
        with store.transaction():
            store.delete_waiting_jobs([running])
    assert store.job(running) is not None


def test_a_retry_waits_blocked_until_its_delay_is_over(store):
    soon, now = job_in(store, cli.JobState.RUNNING), job_in(store, cli.JobState.RUNNING)
    with store.transaction():
        assert store.retry(soon, time.time() + 60, "attempt 1 failed") == cli.JobState.BLOCKED
        assert store.retry(now, None, "attempt 1 failed") == cli.JobState.WAITING
    row = store.job(soon)
    assert (row["worker"], row["slot"], row["started_at"], row["reason"]) == \
        (None, None, None, "attempt 1 failed")
    with store.transaction():
        assert store.release_due(time.time() + 120) == [soon]
    assert state_of(store, soon) == cli.JobState.WAITING


def new_worker(store, state=cli.WorkerState.ACTIVE):
    with store.transaction():
        store.worker_rows.insert("w1", 2, {}, False, state)
    return state


@pytest.mark.parametrize("old,new", list(itertools.product(WORKER_STATES, WORKER_STATES)),
                         ids=lambda state: state.value)
def test_every_worker_move_is_checked_against_the_table(store, old, new):
    new_worker(store, old)
    if new not in cli.WORKER_TRANSITIONS[old]:
        with pytest.raises(cli.IllegalTransition):
            store.worker_rows.change_state("w1", old, new)
        assert store.worker_rows.all()[0]["state"] == old.value
        return
    store.worker_rows.change_state("w1", old, new)
    assert store.worker_rows.all()[0]["state"] == new.value


def test_a_worker_move_from_a_state_it_is_not_in_is_a_lost_race(store):
    new_worker(store, cli.WorkerState.PAUSED)
    with pytest.raises(cli.LostRace):
        store.worker_rows.change_state("w1", cli.WorkerState.ACTIVE, cli.WorkerState.DRAINING)
    with pytest.raises(cli.LostRace):
        store.worker_rows.change_state("nobody", cli.WorkerState.ACTIVE, cli.WorkerState.PAUSED)
    assert store.worker_rows.all()[0]["state"] == "paused"


@pytest.mark.parametrize("old,new", list(itertools.product(HEALTHS, HEALTHS)),
                         ids=lambda health: health.value)
def test_every_health_move_is_checked_against_the_table(store, old, new):
    new_worker(store)
    if old != cli.WorkerHealth.UP:
        store.worker_rows.change_health("w1", cli.WorkerHealth.UP, old, "before", 1.0)
    if new != old and new not in cli.HEALTH_TRANSITIONS[old]:
        with pytest.raises(cli.IllegalTransition):
            store.worker_rows.change_health("w1", old, new, "now", 2.0)
        assert store.worker_rows.all()[0]["health"] == old.value
        return
    store.worker_rows.change_health("w1", old, new, "now", 2.0)
    row = store.worker_rows.all()[0]
    assert (row["health"], row["check_reason"], row["checked_at"]) == (new.value, "now", 2.0)


def test_a_health_move_from_a_health_the_worker_does_not_have_is_a_lost_race(store):
    new_worker(store)
    with pytest.raises(cli.LostRace, match="worker w1 was not down"):
        store.worker_rows.change_health("w1", cli.WorkerHealth.DOWN, cli.WorkerHealth.UP, None, 1.0)
    assert store.worker_rows.all()[0]["health"] == "up"


# --- the Queue and Workers over the checked paths ------------------------------

def test_moves_are_announced_only_once_committed(lifecycle, store):
    queue, workers, events = lifecycle
    job_id = new_job(store)
    with pytest.raises(RuntimeError):
        with queue.changes() as changes:
            store.change_jobs([job_id], cli.JobState.WAITING, cli.JobState.DONE,
                              **ENTERING[cli.JobState.DONE])
            changes.moved([job_id], cli.JobState.DONE)
            raise RuntimeError("the disk failed before the commit")
    assert events.moved == [] and state_of(store, job_id) == cli.JobState.WAITING
    queue.kill_waiting([job_id])
    assert events.moved == [([job_id], cli.JobState.DONE)]
    assert store.job(job_id)["result"] == "killed"


def test_killing_a_waiting_job_skips_what_runs_after_it(lifecycle, store):
    queue, workers, events = lifecycle
    first = new_job(store)
    second = new_job(store, blocked=True)
    with store.transaction():
        store.dependencies.add(second, second, [(first, False)])
    queue.kill_waiting([first])
    assert store.job(second)["result"] == "skipped"
    assert ([second], cli.JobState.DONE) in events.moved


def test_a_worker_state_in_memory_follows_the_database_only_after_commit(lifecycle, store):
    queue, workers, events = lifecycle
    new_worker(store)
    workers.load(None)
    worker = workers.get("w1")
    with pytest.raises(RuntimeError):
        with queue.changes() as changes:
            workers.change_state(changes, worker, cli.WorkerState.PAUSED)
            raise RuntimeError("rolled back")
    assert worker.state == cli.WorkerState.ACTIVE
    assert store.worker_rows.all()[0]["state"] == "active"
    workers.set_paused(["w1"], True)
    assert worker.state == cli.WorkerState.PAUSED == store.worker_rows.all()[0]["state"]


def test_load_status_takes_a_draining_worker_back(lifecycle, store):
    queue, workers, events = lifecycle
    new_worker(store)
    workers.load(None)
    workers.hold("w1", (1, 1), [0], None, None)
    workers.drain("w1")
    assert workers.get("w1").state == cli.WorkerState.DRAINING
    document = {"ip": "w1", "slots": 3, "envs": {}, "ssh_checked": False,
                "state": cli.WorkerState.ACTIVE, "ssh_reuse": True, "down_after": None,
                "resources": None}
    edits = cli.JobEdits(queue, store, workers, events, logging.getLogger("test_queue"))
    edits.load_status([document], [], None)
    assert workers.get("w1").state == cli.WorkerState.ACTIVE
    assert workers.get("w1").busy_slots == {0} and workers.get("w1").slots == 3


def test_a_started_job_owns_its_running_columns_and_a_retry_clears_them(lifecycle, store):
    queue, workers, events = lifecycle
    new_worker(store)
    workers.load(None)
    job_id = new_job(store)
    with store.transaction():
        store.db.execute("UPDATE jobs SET retries = 1 WHERE id = ?", (job_id,))
    started, = queue.take_starts()
    assert (started["id"], started["worker"], started["attempt"]) == (job_id, "w1", 1)
    assert events.moved[-1] == ([job_id], cli.JobState.RUNNING)
    row = store.job(job_id)
    result, reason, retry = queue.save_end(row, {"exit_code": 3, "signal": None})
    assert (result, retry) == (cli.JobResult.FAILED, True)
    assert state_of(store, job_id) == cli.JobState.WAITING
    assert store.job(job_id)["worker"] is None
    assert [attempt["exit_code"] for attempt in store.attempts(job_id)] == [3]


class FailingOnceEvents(RecordedEvents):
    """Its first announcement of a job's end fails, as a commit hook that reads a
    failing disk would: the end is committed, and what follows it is not."""

    def __init__(self):
        super().__init__()
        self.failures = 1

    def jobs_moved(self, job_ids, state):
        super().jobs_moved(job_ids, state)
        if state == cli.JobState.DONE and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")


def test_an_end_is_saved_once_even_if_what_follows_its_commit_fails(store, tmp_path):
    queue, workers, timers = make_lifecycle(store, tmp_path, FailingOnceEvents())
    log = logging.getLogger("test_queue")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runner = cli.Runner(store, queue, workers, timers, None, None,
                        cli.JobsSsh(str(tmp_path), log), log, str(run_dir), None)
    new_worker(store)
    workers.load(None)
    job_id = new_job(store)
    row, = queue.take_starts()
    (run_dir / f"{job_id}-1.exit").write_text('{"exit_code": 0, "signal": null}')
    attempt = runner.hold(cli.Attempt(row, None, None))
    runner.record_end(attempt)          # commits, then its announcement fails
    assert job_id in runner.running      # ... so it is tried again, later
    for _, _, callback, _ in sorted(timers.heap, key=lambda timer: timer[:2]):
        callback()                       # (as the loop would, once due)
    assert store.job(job_id)["result"] == "succeeded"
    assert len(store.attempts(job_id)) == 1
    assert job_id not in runner.running and not workers.get("w1").busy_slots


def new_array(store, tasks, max_running=None, spec=None):
    with store.transaction():
        environment = store.intern_environment({})
        first, last = store.insert_jobs(
            "/bin/true", [[]], "/", environment, {}, 0o22, dict(cli.JOB_OPTIONS),
            cli.ArrayRequest(tasks, None, spec, max_running))
    return first, last


def test_an_array_limit_is_never_exceeded_and_jobs_behind_it_still_start(lifecycle, store):
    queue, workers, events = lifecycle
    with store.transaction():
        store.worker_rows.insert("w1", 20, {}, False)
    workers.load(None)
    first, last = new_array(store, range(1, 11), max_running=3, spec="1-10")
    behind = new_job(store)

    def start():
        rows = queue.take_starts()
        for row in rows:
            workers.hold(row["worker"], (row["id"], row["attempt"]), cli.attempt_slots(row), None,
                         None)
        return sorted(row["id"] for row in rows)
    assert start() == [first, first + 1, first + 2, behind]
    assert start() == []                      # three of its tasks run: its limit
    row = store.job(first + 1)
    queue.save_end(row, {"exit_code": 0, "signal": None})
    workers.release(row["worker"], (row["id"], row["attempt"]), cli.attempt_slots(row))
    assert start() == [first + 3]
    assert [(row["task_id"], row["array_id"]) for row in
            store.jobs_by_id(list(range(first, last + 1)), "task_id, array_id")] == \
        [(task, first) for task in range(1, 11)]


def test_names_stand_for_arrays_tasks_and_jobs(lifecycle, store):
    queue, workers, events = lifecycle
    plain = new_job(store)
    first, last = new_array(store, [0, 5, 10], spec="0-10:5")
    lines, _ = new_array(store, range(1, 4))
    assert queue.named([plain, str(first)]) == [plain, first, first + 1, first + 2]
    assert queue.named([f"{first}.10", f"{lines}.2", first + 1]) == [first + 2, lines + 1,
                                                                      first + 1]
    assert queue.named([str(plain)]) == [plain]    # not an array: that job
    for name, message in [(f"{first}.3", f"array {first} has no task 3 (its tasks: 0-10:5)"),
                          (f"{lines}.4", f"array {lines} has no task 4 (its tasks: 1-3)"),
                          (f"{plain}.1", f"there is no array {plain}")]:
        with pytest.raises(cli.UserError, match=re.escape(message)):
            queue.named([name])
