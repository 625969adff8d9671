#!/bin/sh
# /// script
# requires-python = ">=3.10"
# dependencies = ["fabric>=3.2", "filelock>=3.12", "tabulate>=0.9"]
# ///
# Run as ./cli.py, this file is first a shell script: the string below is the
# `:` command to sh, which then runs python3 on this file as an imported module,
# so that its bytecode is cached (Python never caches the script it runs, and
# compiling this file costs more than starting Python).  To Python, and to
# `python3 cli.py` or `uv run cli.py`, it is a string that does nothing.
""":"
exec python3 -c '
import os, sys
path = sys.argv.pop(1)
sys.argv[0] = path
sys.path[0] = os.path.dirname(os.path.abspath(path))
sys.dont_write_bytecode = False   # (even under PYTHONDONTWRITEBYTECODE: a cache of our own)
if not os.access(sys.path[0], os.W_OK):   # else in ~/.cache; if not writable, none at all
    sys.pycache_prefix = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                      os.path.expanduser("~/.cache"), "cli.py")
from importlib import machinery, util   # (an explicit loader: any file name will do)
spec = util.spec_from_file_location("cli", path, loader=machinery.SourceFileLoader("cli", path))
cli = sys.modules["cli"] = util.module_from_spec(spec)
spec.loader.exec_module(cli)
sys.exit(cli.main())
' "$0" "$@"
":"""
"""cli.py: a persistent SSH job queue in one file.

A background server keeps a list of workers (SSH hosts, each with a number of
slots) and a queue of jobs in a data directory, and starts each job on a free
worker by running the user's own job script locally with JOB_ID and SLAVE_IP in
its environment.  The script itself copies data to the worker and runs the work
there over ssh (see example_job.sh).  State lives in SQLite and survives stops,
crashes and kill -9.

    ./cli.py start                      # background server for ./.data
    ./cli.py add_slave --slots 4 node1 node2
    ./cli.py add_job ./job.sh input-1.dat
    ./cli.py status
    ./cli.py stop                       # running jobs keep running

Run `./cli.py COMMAND --help` for each command.
"""

# A map of this file.  Sections, in order (search for "# Name ###"):
#
#   Constants, Errors, Worker names   what the rest names and refuses
#   States and transitions            JobState, WorkerState, WorkerHealth: the allowed
#                                     moves, and the columns each job state owns
#   Protocol                          REQUESTS (name -> handler, parameter checks),
#                                     check_request, replies, LineReader
#   Storage                           Store: SQLite, migrations, every SQL statement
#                                     (Dependencies, ArrayRows, ServiceRows: theirs);
#                                     change_jobs / WorkerRows.change_state /
#                                     change_health write the states;
#                                     FamilyRows: parents and children
#   Scheduling policy                 pure functions: plan_starts, waiting_reason, ...;
#                                     Resources: GPUs by device, memory, named ones
#   Job runner                        Spawner and the supervisor of each attempt
#                                     (their own processes: exit codes survive us);
#                                     process_of_job: is a process one of a job's?
#   SSH for job scripts               the ssh shim, JobsSsh (shims, config, masters)
#   SSH settings and checks           ssh -G, host keys, fabric, the health checker
#   Timers                            Timers, and RetryDelay for storage faults
#   Queue                             Queue (jobs) and Workers: the lifecycle, the only
#                                     code that writes to the Store (Changes); Families:
#                                     children end with their parent; JobEdits:
#                                     retry, priority, removal, purge, load_status
#   Runner                            Runner: start, watch, adopt, kill, record ends
#   Hooks                             Hooks: the --on-end programs of ended jobs (rows a
#                                     trigger makes as a job moves to done), run at
#                                     most HOOKS_AT_ONCE at a time, each a process of its
#                                     own watched through a pidfd, cut at its timeout
#   Services                          Services (replicas as jobs, converge, load_services)
#                                     and HealthProbes (the prober process's pipe)
#   Schedules                         Schedules: rules that queue jobs, on the one timer
#   Health monitor                    HelperPipe (a helper process's pipes, never blocking
#                                     the loop); HealthMonitor: the checker's results
#   Activity                          Activity, Histogram: starts, ends, waits, latency
#                                     (runtime state for the live views and /metrics)
#   Dashboard: the server's side      Dashboard: its setting, token file, TCP socket and
#                                     helper process (restarted if it dies)
#   Clients                           Clients: the socket, replies, waiters, `wait`, and
#                                     the live views' snapshots (watch)
#   Request handlers                  Handlers: one thin method per request
#   Server                            Server: the wiring and the event loop; run_server
#   Client commands, Live views (top: TopView; the dashboard: command_dashboard, and
#   its helper process dashboard_main with LiveFeed, DashboardSite, DASHBOARD_PAGE
#   and metrics_text), Quickstart (from a fresh machine to jobs run on localhost),
#   Argument parsing, main()
#
# The path of one job:  `add_job` (command_add_job) sends a request line;
# Clients.handle checks it against REQUESTS and calls Handlers.add_job, which
# asks Queue.add to insert it (WAITING, or BLOCKED while it waits for --after
# jobs or its start time).  The loop's Server.schedule takes Queue.take_starts
# (plan_starts picks worker and slots; WAITING -> RUNNING is committed before
# anything forks) and hands the rows to Runner.start, which has the Spawner
# fork a supervisor that runs the job script.  When the supervisor exits, its
# pidfd wakes the loop: Runner.record_end reads its .exit file, Queue.save_end
# saves the attempt and moves the job (DONE, or WAITING/BLOCKED for a retry)
# and its dependents, the Runner frees the slots, and Queue.settled lets the
# worker weigh the attempt.  The committed move reaches Clients.jobs_moved,
# and the `wait` client's Subscription sends its last line.  A move to DONE
# also makes (a trigger, in that transaction) a pending hook run for each
# --on-end the job has, which Hooks runs, then records as done.

###############################################################################
# Imports ######################################################################
###############################################################################

# Only light standard modules at the top: every client command pays for what is
# imported here.  sqlite3 and the server's modules are imported by the server;
# fabric, tabulate and filelock where they are used.
import argparse
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from enum import Enum

###############################################################################
# Constants and data-dir layout ################################################
###############################################################################

VERSION = "0.1.0"
VERSION_LINE = f"cli.py {VERSION}"   # what --version prints
DEFAULT_DATA_DIR = ".data"
DEFAULT_LOG_DIR = "logs"
DATA_DIR_VARIABLE = "CLI_PY_DATA_DIR"        # overrides the default data dir
SSH_CONFIG_VARIABLE = "CLI_PY_SSH_CONFIG"    # start's default for --ssh-config
KEEP_SSH_CONFIG = object()       # start without --ssh-config: the queue keeps the one it has

DATABASE_FILE = "state.db"
SOCKET_FILE = "server.sock"
LOCK_FILE = "server.lock"
PID_FILE = "server.pid"
RUN_DIR = "run"                  # per-attempt supervisor files: .lock .pid .exit .kill
SERVER_LOG_FILE = "server.log"   # in the log dir, beside the job logs

SOCKET_PATH_LIMIT = 107          # sun_path is 108 bytes including the final NUL
MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_RECEIVING_BYTES = 2 * MAX_REQUEST_BYTES   # unfinished requests of all clients together
DEFAULT_KILL_GRACE = 10.0        # seconds between SIGTERM and SIGKILL
DEFAULT_SSH_TIMEOUT = 10.0
MAX_SSH_TIMEOUT = 86400.0
DEFAULT_CHECK_INTERVAL = 30.0    # seconds between health checks of a worker
HEALTH_CHECKS_AT_ONCE = 16       # connections the health checker opens at the same time
HEALTH_CHECKER = "_health_checker"   # the hidden command the server runs it as
PROBER = "_prober"                   # ... and the replicas' health prober
PROBES_AT_ONCE = 32                  # probes the prober runs at a time
DASHBOARD = "_dashboard"             # the hidden command of the dashboard's web server
DEFAULT_DASHBOARD_LISTEN = "127.0.0.1:8750"
DASHBOARD_TOKEN_FILE = "dashboard.token"
DASHBOARD_COOKIE_DAYS = 30       # how long a browser keeps the dashboard's token cookie
DASHBOARD_KEEPALIVE = 15.0       # seconds between comments on a quiet event stream (a
                                 # browser that went away is noticed when one fails)
DASHBOARD_LOG_TAIL = 65536       # bytes of a job's log its page starts with
DASHBOARD_LOG_FOLLOW = 0.5       # seconds between looks at a followed log (as logs -f)
DASHBOARD_SNAPSHOTS = 1.0        # seconds between the dashboard's snapshots, at least: a
                                 # page redraws once a second (top takes 5 a second)
STATUS_TABLE_HEAD = 10           # waiting jobs shown by the status table
HEALTH_TEXT_WIDTH = 30           # the status table's "last check" cells (see _health_text)
JOBS_TABLE_LAST = 50             # jobs shown by the jobs table without --last
TREE_INDENT_LIMIT = 60           # jobs --tree's indentation, at most: a job that queues its
                                 # next round as its child makes families thousands deep
MAX_BULK_JOBS = 1_000_000        # jobs one add_job call may queue, ids one command may name
MAX_JOB_ID = 2 ** 63 - 1         # SQLite's largest integer
# Ids a status document may give its jobs: ids only grow (AUTOINCREMENT), so one
# at MAX_JOB_ID would leave no id for any later job; 2**53 also stays exact in
# JSON readers that use doubles.
MAX_LOADED_JOB_ID = 2 ** 53
MAX_DURATION = 100 * 365 * 86400
MAX_GPUS = 1024                  # per worker, and per job
BACKFILL_DEPTH = 100             # jobs a pass looks at for backfill once every worker is full
LIVE_MIN_INTERVAL = 0.2          # live views: at most 5 snapshots a second
LIVE_COST_SHARE = 0.02           # ... and their making at most 2% of the server's time
LIVE_LIST_LIMIT = 100            # running and waiting jobs a snapshot lists (and counts all)
LIVE_RATE_SAMPLES = 100_000      # end times kept for the rate of the last minute
LIVE_RECENT = 10                 # latest ends and failures a snapshot lists
LIVE_FAILURE_SCAN = 5000         # ... the failures among the latest this many ends
MIN_SCHEDULE_INTERVAL = 1.0      # --every: seconds
SCHEDULE_LATE = 60.0             # a firing this late (the machine slept) was missed
MAX_KILL_GRACE = 86400.0
MAX_PRIORITY = 10 ** 9
SERVICE_PRIORITY = MAX_PRIORITY + 1   # a service's replicas start before any batch job
SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
RESTART_FIRST = 1.0              # seconds before a crashed replica starts again, doubling
RESTART_MAX = 300.0              # ... up to this
RESTART_STEADY = 60.0            # a replica that ran this long starts again after RESTART_FIRST
DEFAULT_HEALTH_INTERVAL = 10.0   # seconds between a replica's health probes
DEFAULT_HEALTH_FAILURES = 3      # failed probes in a row that restart a replica
MAX_REPLICAS = 10_000
MAX_ARRAY_TASKS = 1_000_000      # tasks of one --array
MAX_RETRIES = 10_000
MAX_SLOTS = 100_000              # slots of one worker, or wanted by one job
SSH_EXIT_STATUS = 255            # what ssh exits with when it cannot reach (or loses) a host
QUICK_FAILURE = 1.0              # seconds: a failure this fast says more of the worker than the job
DEFAULT_DOWN_AFTER = 3           # such failures in a row that set a worker aside
MAX_DOWN_AFTER = 1000
SCHEDULE_SCAN_LIMIT = 2000       # ready jobs one scheduling pass looks at, at most
HOOKS_AT_ONCE = 4                # completion hooks (--on-end) running at the same time
DEFAULT_HOOK_TIMEOUT = 60.0      # seconds a hook may run before it is ended (start --hook-timeout)
HOOK_KILL_GRACE = 5.0            # seconds between a late hook's SIGTERM and its SIGKILL
HOOK_OUTPUT_LIMIT = 64 * 1024    # bytes of one hook's output that server.log takes; the rest
HOOK_LINE_LIMIT = 1000           # is read and dropped; characters of one logged line

EVENT_READ, EVENT_WRITE = 1, 2   # selectors' event masks (imported by the server only)
RECOVERY_WAIT = 5.0              # seconds a live supervisor gets to write its pid file
MAX_SELECT_TIMEOUT = 86400.0     # seconds the server sleeps at most, whatever its timers say
OUTCOME_RESERVE = 8192           # bytes kept for an attempt's .exit file (an outcome is ~100)
OUTCOME_ORPHAN_WAIT = 600.0      # seconds a supervisor waits for a run dir that went away
STORAGE_RETRY_FIRST = 0.5        # seconds before a write the disk refused is tried again,
STORAGE_RETRY_MAX = 10.0         # doubling up to this while the fault lasts
RESOLVED_AT_ONCE = 16            # hosts add_slave --skip_ssh_auth_check resolves itself
PR_SET_CHILD_SUBREAPER = 36      # a prctl option (linux/prctl.h)

RESERVED_VARIABLES = ("JOB_ID", "SLAVE_IP", "SLAVE_HOST", "SLAVE_PORT", "SLAVE_USER",
                      "JOB_ATTEMPT", "SLOT", "SLOTS", "SPLIT_HOSTS", "SPLIT_PART")
TASK_VARIABLES = ("ARRAY_ID", "TASK_ID", "TASK_ARG")   # set for the tasks of arrays
SCHEDULE_VARIABLES = ("SCHEDULE", "SCHEDULED_FOR")     # set for the runs of schedules
SSH_SHIM_VARIABLE = "CLI_PY_SSH_SHIM_DIR"            # set for jobs whose ssh goes through our shim
SSH_CONTROL_VARIABLE = "CLI_PY_SSH_CONTROL_PATH"     # ... and shares connections
SSH_JOBS_CONFIG_VARIABLE = "CLI_PY_SSH_JOBS_CONFIG"  # ... and reads the queue's ssh config
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
JOB_NAME = re.compile(r"([0-9]{1,19})(?:\.([0-9]{1,7}))?\Z")   # 12, or ARRAY.TASK: 7.3
# Host names reach ssh as one argv element, but also job scripts that may not
# quote $SLAVE_IP: allow what host names, IPs, user@host, ssh aliases and
# [IPv6]:port use.
HOST_NAME = re.compile(r"[A-Za-z0-9_.:\[][A-Za-z0-9_.@:%+\[\]-]*\Z")


def data_dir_paths(data_dir):
    """The files of one data dir, by role."""
    return {
        "database": os.path.join(data_dir, DATABASE_FILE),
        "lock": os.path.join(data_dir, LOCK_FILE),
        "pid": os.path.join(data_dir, PID_FILE),
        "run": os.path.join(data_dir, RUN_DIR),
        "socket": socket_path(data_dir),
        "dashboard_token": os.path.join(data_dir, DASHBOARD_TOKEN_FILE),
    }


def socket_path(data_dir):
    """Where the server of DATA_DIR listens.

    Unix socket paths are limited to 107 bytes; a deep data dir gets its socket
    in an owner-only directory under /tmp, named by a hash of the data dir, so
    client and server find it without asking anyone.
    """
    path = os.path.join(data_dir, SOCKET_FILE)
    if len(os.fsencode(path)) <= SOCKET_PATH_LIMIT:
        return path
    return private_tmp_path(data_dir, "{digest}.sock", 24)


def private_tmp_path(data_dir, name, digest_length):
    """NAME, its {digest} a hash of DATA_DIR, in the owner-only directory /tmp/cli-py-UID:
    where a data dir whose own path is too long (or not plain) keeps its socket
    or its ssh files.  The lengths are those of released versions: running
    servers and jobs use these paths."""
    import hashlib
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:digest_length]
    return os.path.join("/tmp", f"cli-py-{os.getuid()}", name.format(digest=digest))


def make_private_dir(path):
    """Create PATH (mode 0700) or make sure the one there is ours and owner-only."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    path_stat = os.lstat(path)
    if path_stat.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
        raise UserError(f"{path} is not a directory of yours; remove it and start again")
    os.chmod(path, 0o700)


def job_log_name(job_id):
    return f"job_{job_id}.txt"


def job_log_path(log_dir, job_id):
    return os.path.join(log_dir, job_log_name(job_id))


def run_file(run_dir, job_id, attempt, kind):
    """A supervisor file of one attempt of one job: lock, pid, exit or kill."""
    return os.path.join(run_dir, f"{job_id}-{attempt}.{kind}")


###############################################################################
# Errors #######################################################################
###############################################################################

class UserError(Exception):
    """A mistake the user can fix: main() prints 'Error: MESSAGE' and exits 1."""


def require(module):
    """Import a third-party MODULE, or tell the user how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the Python package {module!r} is missing: activate the venv you "
                        "installed cli.py's requirements in (. .venv/bin/activate), or run "
                        "pip install -r requirements.txt, or run the tool as: uv run cli.py ..."
                        ) from None


def validate_host_name(name):
    """NAME, if it is a worker name that parse_worker_name takes; a UserError if not."""
    parse_worker_name(name)
    return name


def validate_variable_name(name, reserved_ok=False):
    if not VARIABLE_NAME.match(name):
        raise UserError(f"invalid variable name {name!r}: use letters, digits and _, "
                        "not starting with a digit")
    if not reserved_ok and name in RESERVED_VARIABLES:
        raise UserError(f"{name} is set by cli.py for every job and cannot be overridden; "
                        "choose another name")
    return name


def parse_assignment(text):
    """NAME=VALUE from -e; the value may contain '=' (split at the first)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise UserError(f"-e {text!r} has no '=': write -e NAME=VALUE")
    validate_variable_name(name)
    return name, value


def validate_variables(variables, what):
    """A {NAME: VALUE} mapping as stored: checked again by the server."""
    if not isinstance(variables, dict):
        raise UserError(f"{what}: variables must be an object of NAME: VALUE")
    for name, value in variables.items():
        validate_variable_name(name)
        if not isinstance(value, str) or "\0" in value:
            raise UserError(f"{what}: the value of {name} must be a string without NUL bytes")
    return variables


###############################################################################
# Worker names #################################################################
###############################################################################

# A worker is named the way its user reaches it with ssh: a host name, an IP,
# user@host, an alias of their ssh config, host:port, or an IPv6 address
# (::1, [::1] or [::1]:2222).  Jobs use the name in ssh, rsync and scp alike,
# and each of those misreads some of these forms: rsync and scp take host:port
# and ::1 for host:path, and ssh takes ::1 but not [::1].
# Such a worker reaches its jobs (SLAVE_IP) as a destination that all three
# read alike, which the queue's own ssh config for jobs maps to the real host
# and port (see jobs_ssh_config).

MAX_PORT = 65535


class WorkerAddress:
    """What a worker name says: user, host and port (None where it says nothing), and
    whether the host is an IPv6 address."""

    def __init__(self, name, user=None, host=None, port=None, ipv6=False):
        self.name = name
        self.user = user
        self.host = name if host is None else host
        self.port = port
        self.ipv6 = ipv6

    @property
    def needs_alias(self):
        """True if ssh, rsync and scp cannot all take the name as it is."""
        return self.port is not None or self.ipv6

    @property
    def alias(self):
        """The host part of the jobs' destination (see destination).  Not a host name
        anyone has: the user's Host entries for the bare host do not apply to it,
        but Match host ones do (README: Worker names).  No brackets, which an
        unquoted $SLAVE_IP would glob."""
        if not self.needs_alias:
            return self.host
        host = re.sub(r"[:%]", "-", self.host)
        return f"cli.py-{host}" + (f"-{self.port}" if self.port is not None else "")

    @property
    def destination(self):
        """What jobs get as SLAVE_IP: the name itself, unless it needs an alias."""
        if not self.needs_alias:
            return self.name
        return f"{self.user}@{self.alias}" if self.user else self.alias

    def config_entry(self):
        """The Host entry of the jobs' ssh config that maps the alias to the real host."""
        if not self.needs_alias:
            return ""
        entry = f"Host {self.alias}\n    HostName {self.host.replace('%', '%%')}\n"
        return entry + (f"    Port {self.port}\n" if self.port is not None else "")

    def resolve_arguments(self):
        """What `ssh -G` needs to resolve this worker as the jobs' ssh does: the same
        destination, with the alias's settings given as options (which, like the
        jobs' Host entry, come before anything in the user's config)."""
        if not self.needs_alias:
            return ["--", self.name]
        options = ["-o", f"HostName={self.host.replace('%', '%%')}"]
        if self.port is not None:
            options += ["-p", str(self.port)]
        return options + ["--", self.destination]


def parse_worker_name(name):
    """The WorkerAddress of a worker name; a UserError that says what to write instead
    if ssh could not take it."""
    if not name:
        raise UserError("empty worker name: give a host name, IP address, user@host or ssh alias")
    if name.startswith("-"):
        raise UserError(f"invalid worker name {name!r}: names cannot start with '-' "
                        "(ssh would read it as an option)")
    if not HOST_NAME.match(name):
        raise UserError(f"invalid worker name {name!r}: use a host name, IP address, user@host, "
                        "host:port, [IPv6]:port or ssh alias (letters, digits and . _ - @ : % + "
                        "[ ] only, no spaces)")
    user, at, rest = name.rpartition("@")
    if at and (not user or re.search(r"[\[\]:]", user)):
        raise UserError(f"invalid worker name {name!r}: write USER@HOST, with a user name "
                        "before the @")
    port, ipv6 = None, False
    if rest.startswith("["):
        host, closed, after = rest[1:].partition("]")
        if not closed or ":" not in host or "[" in host + after or "]" in after or \
                after and not after.startswith(":"):
            raise UserError(f"invalid worker name {name!r}: write an IPv6 address as ::1, "
                            "[::1] or [::1]:PORT")
        port, ipv6 = after[1:] if after else None, True
    elif "[" in rest or "]" in rest:
        raise UserError(f"invalid worker name {name!r}: brackets go around an IPv6 address, "
                        "as in [::1]:2222, or a range of numbers, as in node[01-16]")
    elif rest.count(":") > 1:
        host, ipv6 = rest, True       # a bare IPv6 address: no port in it
    else:
        host, _, port = rest.partition(":")
        port = port if _ else None
    if ipv6:
        import ipaddress
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise UserError(f"invalid worker name {name!r}: {host} is not an IPv6 address "
                            "(a host with a port is written HOST:PORT)") from None
    if port is not None and not (port.isascii() and port.isdigit() and
                                 1 <= int(port) <= MAX_PORT):
        raise UserError(f"invalid port in worker name {name!r}: write HOST:PORT with a port "
                        f"from 1 to {MAX_PORT}, or an ssh alias with a Port line")
    if not host:
        raise UserError(f"invalid worker name {name!r}: the host is missing")
    return WorkerAddress(name, user or None, host, None if port is None else int(port), ipv6)


def worker_address(name):
    """parse_worker_name for a name already registered; one that an older cli.py
    let through stays as it was."""
    try:
        return parse_worker_name(name)
    except UserError:
        return WorkerAddress(name)


# A bracket of digits, commas and '-' in a host name is a range; anything else in
# brackets ([::1], [fd00::5]:22) is left to parse_worker_name.
HOST_RANGE = re.compile(r"\[([0-9][0-9,-]*)\]")
RANGE_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?\Z")
MAX_HOSTS = 100_000              # names one host list may expand to


def expand_hosts(words):
    """Host names with ranges as clusters write them (Slurm, pdsh, ClusterShell):
    node[01-16] is node01 to node16 (zero-padding kept), gpu[1-4,7] five names,
    rack[1-2]-n[01-08] sixteen.  Brackets holding a colon are IPv6: left alone."""
    hosts = []
    for word in words:
        hosts += _expand_host(word, word)
        if len(hosts) > MAX_HOSTS:
            raise UserError(f"{word!r} names more than {MAX_HOSTS} hosts; split the list")
    return hosts


def _expand_host(text, word):
    match = HOST_RANGE.search(text)
    if match is None:
        if re.search(r"\[[0-9][0-9,-]*\Z", text):
            raise UserError(f"unbalanced brackets in {word!r}: write a range like "
                            "node[01-16] or gpu[1-4,7]")
        return [text]   # (parse_worker_name judges what brackets remain)
    numbers = []
    for item in match.group(1).split(","):
        found = RANGE_ITEM.match(item)
        if not found or found.group(2) is not None and \
                int(found.group(2)) < int(found.group(1)):
            raise UserError(f"malformed host range [{match.group(1)}] in {word!r}: write "
                            "it like node[01-16] or gpu[1-4,7] (low-high, low first)")
        first, last = found.group(1), found.group(2) or found.group(1)
        if int(last) - int(first) >= MAX_HOSTS:
            raise UserError(f"{word!r} names more than {MAX_HOSTS} hosts; split the list")
        numbers += [str(number).zfill(len(first))
                    for number in range(int(first), int(last) + 1)]
    rests = _expand_host(text[match.end():], word)
    return [text[:match.start()] + number + rest for number in numbers for rest in rests]


def read_hosts_file(path, slots):
    """[(host, slots)] from a hosts file (- for stdin): a host or a range per line,
    or SLOTS/HOST as GNU parallel's --sshloginfile writes it; # starts a comment."""
    where = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as hosts_file:
                text = hosts_file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the hosts file {where}: "
                        f"{getattr(error, 'strerror', None) or error}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()   # (no host name holds a '#')
        if not line:
            continue
        count, slash, host = line.partition("/")
        if not slash:
            count, host = None, line
        elif not plain_number(count) or not 1 <= int(count) <= MAX_SLOTS:
            raise UserError(f"{where}:{number}: {line!r}: write SLOTS/HOST with SLOTS from 1 "
                            f"to {MAX_SLOTS}, like 8/node1")
        try:
            hosts = expand_hosts([host])
        except UserError as error:
            raise UserError(f"{where}:{number}: {error}") from None
        entries += [(name, slots if count is None else int(count)) for name in hosts]
    if not entries:
        raise UserError(f"the hosts file {where} names no host")
    return entries


def split_host_list(text):
    """node1,node[2-4],gpu[1,3]: the commas inside brackets belong to the ranges."""
    return [part for part in re.split(r",(?![^\[]*\])", text) if part]


###############################################################################
# States and transitions #######################################################
###############################################################################

class JobState(str, Enum):
    """Where a job is.  How it ended is JobResult, kept apart.

    WAITING and BLOCKED are both "waiting" to users.  A BLOCKED job may not start
    yet: it waits on other jobs (--after) or for its start time (--at, --delay,
    --retry-delay).  The database keeps it as state 'waiting' with blocked = 1
    (see JOB_STATE_ROWS), so that the index of ready jobs never holds the blocked
    ones, and so that data dirs from before this enum open unchanged.
    """
    WAITING = "waiting"
    BLOCKED = "blocked"
    RUNNING = "running"
    DONE = "done"


class JobResult(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"
    TIMED_OUT = "timed_out"     # set by the timeout policy
    SKIPPED = "skipped"         # set when a dependency can no longer be met


class WorkerState(str, Enum):
    ACTIVE = "active"
    PAUSED = "paused"           # takes no new jobs until resumed; its jobs run on
    DRAINING = "draining"       # takes no new jobs; removed when its last job ends


# WAITING/BLOCKED -> DONE is a waiting job killed (or skipped) before it ran.
# RUNNING -> WAITING is a failed attempt with retries left, or, in recovery or
# after a failed launch, an attempt whose script never started; RUNNING ->
# BLOCKED the same with a --retry-delay to wait out.  DONE -> WAITING/BLOCKED
# is `retry` (BLOCKED: a dependent it brings back waits for it again).  Only a
# WAITING job starts.
JOB_TRANSITIONS = {
    JobState.WAITING: {JobState.RUNNING, JobState.DONE},
    JobState.BLOCKED: {JobState.WAITING, JobState.DONE},
    JobState.RUNNING: {JobState.DONE, JobState.WAITING, JobState.BLOCKED},
    JobState.DONE: {JobState.WAITING, JobState.BLOCKED},
}
# DRAINING -> ACTIVE/PAUSED: a load_status document that lists a worker being
# removed registers it afresh (its removal is called off).  No command does.
WORKER_TRANSITIONS = {
    WorkerState.ACTIVE: {WorkerState.PAUSED, WorkerState.DRAINING},
    WorkerState.PAUSED: {WorkerState.ACTIVE, WorkerState.DRAINING},
    WorkerState.DRAINING: {WorkerState.ACTIVE, WorkerState.PAUSED},
}

# How each job state is stored: (the state column, the blocked column or None
# where it does not tell states apart).
JOB_STATE_ROWS = {
    JobState.WAITING: ("waiting", 0),
    JobState.BLOCKED: ("waiting", 1),
    JobState.RUNNING: ("running", None),
    JobState.DONE: ("done", None),
}
REQUIRED = object()    # a column its state owns that the mover must give
UNCHANGED = object()   # a column its state owns that keeps its value unless given
# What a job has only while it runs: cleared when it waits again.
_RUNNING_CLEARED = {"worker": None, "slot": None, "slots": None, "split_parts": None,
                    "started_at": None,
                    "kill_requested_at": None, "kill_grace": None, "timed_out": 0,
                    "exit_code": None, "signal": None}
# (result and ended_at: a retried job has not ended yet.)
_WAITING_COLUMNS = {**_RUNNING_CLEARED, "reason": UNCHANGED, "not_before": UNCHANGED,
                    "attempt": UNCHANGED, "log": UNCHANGED, "result": None, "ended_at": None,
                    "attempts_before_retry": UNCHANGED}
# The columns each state owns, set when a job enters it (Store.change_jobs): to
# the value the mover gives, else to the default here.  Nothing else may be set
# by a move.  A done job keeps its last attempt's worker and slots: its history.
JOB_STATE_COLUMNS = {
    JobState.WAITING: _WAITING_COLUMNS,
    JobState.BLOCKED: _WAITING_COLUMNS,
    JobState.RUNNING: {"worker": REQUIRED, "slot": REQUIRED, "slots": REQUIRED,
                       "split_parts": None, "started_at": REQUIRED, "attempt": REQUIRED,
                       "log": REQUIRED, "reason": None, "exit_code": None, "signal": None,
                       "resource_grant": None},
    JobState.DONE: {"result": REQUIRED, "ended_at": REQUIRED, "reason": REQUIRED,
                    "exit_code": None, "signal": None},
}


def waiting_state(blocked):
    return JobState.BLOCKED if blocked else JobState.WAITING


# Health is apart from WorkerState: a worker the health checker finds down keeps
# its state (a paused worker comes back paused), and takes no job until it is up.
class WorkerHealth(str, Enum):
    UP = "up"
    DOWN = "down"               # its last health check failed
    SET_ASIDE = "set_aside"     # its jobs kept failing to reach it (see worker_verdict)


# A worker is set aside only while up (weigh_attempt); a set-aside one whose
# check fails is down.  A new reason for the same health is not a move.
HEALTH_TRANSITIONS = {
    WorkerHealth.UP: {WorkerHealth.DOWN, WorkerHealth.SET_ASIDE},
    WorkerHealth.DOWN: {WorkerHealth.UP},
    WorkerHealth.SET_ASIDE: {WorkerHealth.UP, WorkerHealth.DOWN},
}


class IllegalTransition(Exception):
    """A bug: some code tried a state change the tables above forbid."""


class LostRace(IllegalTransition):
    """A bug: a state change found its rows no longer in the state it moves them from."""


def check_transition(table, old, new):
    if new not in table[old]:
        raise IllegalTransition(f"{old.value} -> {new.value}")


def result_of(exit_code, kill_requested, timed_out=False):
    """How an attempt ended, from what its supervisor recorded."""
    if timed_out:
        return JobResult.TIMED_OUT
    if kill_requested:
        return JobResult.KILLED
    if exit_code == 0:
        return JobResult.SUCCEEDED
    return JobResult.FAILED


###############################################################################
# Protocol #####################################################################
###############################################################################

# One request per connection: a JSON line {"command": NAME, "params": {...}}
# in; out, zero or more event lines (wait's progress) and one reply line, either
# {"ok": true, "result": ...} or {"ok": false, "error": MESSAGE}.  REQUESTS, at
# the end of this section, names every request, the method of Handlers that
# serves it and the shape of its parameters; check_request applies it once,
# before dispatch, so that handlers get only well-formed values.


class LineReader:
    """Splits a byte stream into lines, as chunks of it arrive: the server's
    clients, the client's replies, the spawner's requests and the health
    checker's pipes all read through one."""

    def __init__(self):
        self.pending = bytearray()

    def feed(self, chunk):
        """The lines CHUNK completes, without their newlines."""
        searched = len(self.pending)
        self.pending += chunk
        # Only the new chunk is searched: a large request arriving in many
        # chunks costs its length once, not once per chunk.
        if self.pending.find(b"\n", searched) < 0:
            return []
        *lines, rest = self.pending.split(b"\n")
        self.pending = bytearray(rest)
        return [bytes(line) for line in lines]


def encode_request(command, params):
    return json.dumps({"command": command, "params": params}).encode() + b"\n"


def encode_reply(result=None, error=None, stopping=False):
    """A reply line: ok with data, or an error with a message meant for the user.

    STOPPING marks an error that only says the server is going away.
    """
    message = {"ok": True, "result": result} if error is None else {"ok": False, "error": error}
    if stopping:
        message["stopping"] = True
    return json.dumps(message).encode() + b"\n"


def encode_event(event):
    """A line that is not the reply (wait's progress): the connection stays open."""
    return json.dumps(event).encode() + b"\n"


class LostServer(UserError):
    """The server went away while a client waited for it."""
    exit_status = 2


def decode_reply_line(line, data_dir):
    """An event or reply line from the server of DATA_DIR, as a dict."""
    try:
        message = json.loads(line)
        if isinstance(message, dict):
            return message
    except ValueError:
        pass
    raise UserError(f"the server for {data_dir} sent something unreadable; see its server.log")


def reply_result(message):
    """The result of a reply, or its error raised as the client's."""
    if not message.get("ok"):
        error = LostServer if message.get("stopping") else UserError
        raise error(message.get("error", "the server refused the request"))
    return message.get("result")


# --- parameters: each check takes (value, name) and returns the value to use --

ABSENT = object()       # the default of a parameter whose absence means something
NO_DEFAULT = object()   # a parameter that must be given


def whole_number(value, low, high):
    """VALUE is an int (JSON's true is not 1 here) from LOW to HIGH."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _seconds(value, low, high):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        low <= value <= high and value == value


def _string(value, name):
    if not isinstance(value, str) or "\0" in value:
        raise UserError(f"malformed request: {name} must be a string")
    return value


def _optional_string(value, name):
    return None if value is None else _string(value, name)


def _strings_or_empty(value, name):
    if not isinstance(value, list) or not all(isinstance(item, str) and "\0" not in item
                                              for item in value):
        raise UserError(f"malformed request: {name} must be a list of strings")
    return value


def _strings(value, name):
    if not _strings_or_empty(value, name):
        raise UserError(f"malformed request: {name} is empty")
    return value


def _optional_strings(value, name):
    return None if value is None else _strings(value, name)


def unique_hosts(hosts, name="hosts"):
    """Valid host names, each named once."""
    seen = set()
    for host in hosts:
        validate_host_name(host)
        if host in seen:
            raise UserError(f"worker {host} is named twice")
        seen.add(host)
    return hosts


def _hosts(value, name):
    return unique_hosts(_strings(value, name))


def _hosts_or_empty(value, name):
    return unique_hosts(_strings_or_empty(value, name))


def _flag(value, name):
    if not isinstance(value, bool):
        raise UserError(f"malformed request: {name} must be true or false")
    return value


def _truth(value, name):
    return bool(value)


def _anything(value, name):
    return value


def _environment(value, name="environment"):
    """The submitter's environment: any names (it is the caller's own), string values."""
    if not isinstance(value, dict) or not all(
            isinstance(key, str) and isinstance(text, str) and key and "=" not in key
            and "\0" not in key + text for key, text in value.items()):
        raise UserError("malformed request: environment must be an object of strings")
    return value


def _variables(what):
    return lambda value, name: validate_variables(value, what)


def _slot_count(value, what):
    """A worker's slots: 1 to MAX_SLOTS, the limit of a job's --slots too."""
    if not whole_number(value, 1, MAX_SLOTS):
        raise UserError(f"{what} must be a whole number of at least 1 (at most {MAX_SLOTS})")
    return value


def _slots_flag(value, name):
    return _slot_count(value, "--slots")


def _slots_of(value, name):
    """{host: its slots}, for hosts that do not take the request's --slots."""
    if not isinstance(value, dict):
        raise UserError("malformed request: slots_of must be an object")
    for slots in value.values():
        _slot_count(slots, "--slots")
    return value


def _optional_slots_flag(value, name):
    return None if value is None else _slot_count(value, "--slots")


def _down_after(value, name="down_after"):
    """A worker's own --down-after: a count, or None for the server's."""
    if value is not None and not whole_number(value, 0, MAX_DOWN_AFTER):
        raise UserError(f"--down-after must be a whole number from 0 to {MAX_DOWN_AFTER}")
    return value


def _endpoints(value, name):
    """{worker: its host, port and user as ssh resolved them (see resolved_endpoint)}."""
    value = value or {}
    if not isinstance(value, dict):
        raise UserError("malformed request: endpoints must be an object")
    for endpoint in value.values():
        if endpoint is not None and (
                not isinstance(endpoint, dict) or not isinstance(endpoint.get("host"), str) or
                not isinstance(endpoint.get("user"), str) or
                not whole_number(endpoint.get("port"), 1, MAX_PORT) or
                "\0" in endpoint["host"] + endpoint["user"]):
            raise UserError("malformed request: an endpoint needs a host, a port and a user")
    return value


def parse_listen_address(text):
    """(host, port) of --listen HOST:PORT: an IPv4 address, [IPv6] or localhost, and a
    port (0: one the system picks).  Names other than localhost are refused: what
    they resolve to could change under a dashboard that must stay where it was put."""
    import ipaddress
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.%a-z]+\]|[^:\[\]]+):([0-9]{1,5})", text or "")
    if not match or int(match[2]) > MAX_PORT:
        raise UserError(f"{text!r} is not HOST:PORT: write it like "
                        f"{DEFAULT_DASHBOARD_LISTEN} or [::1]:8750 (port 0: any free port)")
    host = match[1].strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"{text}: {host} is not an IP address (or localhost); give "
                        "the address to listen on, like 127.0.0.1, or 0.0.0.0 for every "
                        "network") from None
    return host, int(match[2])


def listen_text(host, port):
    """HOST:PORT as a URL writes it: [IPv6]:PORT."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host):
    import ipaddress
    return ipaddress.ip_address(host).is_loopback


def _listen_address(value, name):
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError("malformed request: listen must be a string HOST:PORT")
    return listen_text(*parse_listen_address(value))


def _snapshot_interval(value, name):
    if not _seconds(value, LIVE_MIN_INTERVAL, 3600):
        raise UserError(f"malformed request: interval must be from {LIVE_MIN_INTERVAL:g} to "
                        "3600 seconds")
    return value


def _offset(value, name):
    if not whole_number(value, 0, MAX_JOB_ID):
        raise UserError("malformed request: offset must be a whole number of at least 0")
    return value


def _job_id(value, name="id"):
    if not whole_number(value, 1, MAX_JOB_ID):
        raise UserError(f"malformed request: job ids are integers from 1 to {MAX_JOB_ID}")
    return value


def _job_name(value, name="id"):
    """A job id (an int: that job); or as typed (a string): 'N', an array's id for its
    tasks or else a job's, or 'ARRAY.TASK' (see Queue.named)."""
    match = JOB_NAME.match(value) if isinstance(value, str) else None
    if match and 1 <= int(match[1]) <= MAX_JOB_ID:
        return value
    return _job_id(value, name)


def _job_ids_or_empty(value, name="ids"):
    if not isinstance(value, list):
        raise UserError("malformed request: ids must be a non-empty list of integers")
    return list(dict.fromkeys(_job_name(job_id) for job_id in value))


def _job_ids(value, name="ids"):
    if not isinstance(value, list) or not value:
        raise UserError("malformed request: ids must be a non-empty list of integers")
    return _job_ids_or_empty(value)


def _optional_job_id(value, name):
    return None if value is None else _job_id(value)


def _optional_job_name(value, name):
    return None if value is None else _job_name(value)


def _optional_job_ids(value, name):
    return None if value is None else _job_ids(value)


def _grace(value, name):
    if not _seconds(value, 0, MAX_KILL_GRACE):
        raise UserError(f"the grace period must be from 0 to {MAX_KILL_GRACE:g} seconds")
    return value


def _service_name(value, name):
    if not isinstance(value, str) or not SERVICE_NAME.match(value):
        raise UserError(f"{value!r} is not a service name: use letters, digits, '.', '_' and "
                        "'-' (at most 64, starting with a letter or digit)")
    return value


def _schedule_name(value, name):
    if not isinstance(value, str) or not SERVICE_NAME.match(value):
        raise UserError(f"{value!r} is not a schedule name: use letters, digits, '.', '_' "
                        "and '-' (at most 64, starting with a letter or digit)")
    return value


def _replica_count(value, name):
    if not whole_number(value, 0, MAX_REPLICAS):
        raise UserError(f"the number of replicas must be a whole number from 0 to {MAX_REPLICAS}")
    return value


def _service_port(value, name):
    if value is not None and not whole_number(value, 1, 65535):
        raise UserError("--port must be a port number from 1 to 65535")
    return value


def _health(value, name):
    """A health check: {"tcp": true} or {"cmd": COMMAND}, with interval and failures."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"tcp", "cmd", "interval", "failures"} or \
            (value.get("tcp") is True) == isinstance(value.get("cmd"), str):
        raise UserError("malformed request: health must be {tcp: true} or {cmd: COMMAND}, "
                        "with interval and failures")
    if "cmd" in value:
        import shlex
        try:
            words = shlex.split(value["cmd"])
        except ValueError as error:
            raise UserError(f"--health-cmd: {error} (it is split as a shell would)") from None
        if not words:
            raise UserError("--health-cmd needs a command")
    interval = value.get("interval", DEFAULT_HEALTH_INTERVAL)
    failures = value.get("failures", DEFAULT_HEALTH_FAILURES)
    if not _seconds(interval, 0.1, MAX_DURATION) or not whole_number(failures, 1, 1000):
        raise UserError("--health-interval must be a duration of at least 0.1s, and "
                        "--health-failures a whole number from 1 to 1000")
    return {**value, "interval": interval, "failures": failures}


def _add_service_whole(params, given):
    if params["port"] is not None and params["port"] + max(params["replicas"] - 1, 0) > 65535:
        raise UserError(f"--port {params['port']} with {params['replicas']} replicas runs past "
                        "port 65535 (PORT is --port plus REPLICA): choose a lower port")
    if params["health"] and params["health"].get("tcp") and params["port"] is None:
        raise UserError("--health-tcp probes PORT: give --port P as well")
    reserved = {"SERVICE", "REPLICA"} | ({"PORT"} if params["port"] is not None else set())
    clash = sorted(reserved & set(params["variables"]))
    if clash:
        raise UserError(f"-e {clash[0]}: the service sets {', '.join(sorted(reserved))} itself")
    return {"options": _job_options(given)}


def _umask(value, name):
    if not whole_number(value, 0, 0o777):
        raise UserError("malformed request: umask must be a number from 0 to 0o777")
    return value


def _removal_mode(value, name):
    if value not in (None, "wait", "kill"):
        raise UserError("malformed request: mode must be wait or kill")
    return value


def _age(value, name):
    if not _seconds(value, 0, float("inf")):
        raise UserError("malformed request: older_than must be a number of seconds")
    return value


def _row_limit(value, name):
    if value is not None and not isinstance(value, int):
        raise UserError("malformed request: waiting_limit must be an integer")
    return value


def _last(value, name):
    if value is not None and not whole_number(value, 1, MAX_JOB_ID):
        raise UserError(f"--last must be a whole number from 1 to {MAX_JOB_ID}")
    return value


def _state_filter(value, name):
    """jobs --state: a state or a result; returns (state, result) to match."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise UserError("malformed request: state must be a string")
    if value in {result.value for result in JobResult}:
        return JobState.DONE.value, value
    if value not in {state.value for state in JobState if state != JobState.BLOCKED}:
        raise UserError(f"unknown state {value!r}: use waiting, running, done, "
                        + ", ".join(result.value for result in JobResult))
    return value, None


def _job_options(source, split_allowed=False):
    """The per-job options (JOB_OPTIONS) of an add_job request or a load_status
    entry (the names of jobs --json), checked, in their column form; and, if
    SPLIT_ALLOWED, "split" (not a JOB_OPTIONS one: services have no split)."""
    hosts = {}
    for name, column in (("on", "run_on"), ("prefer", "prefer"), ("exclude", "exclude")):
        value = source.get(name)
        if value is not None:
            if not isinstance(value, list) or not value or \
                    not all(isinstance(host, str) for host in value):
                raise UserError(f"'{name}' must be a non-empty list of worker names")
            for host in value:
                validate_host_name(host)
            value = json.dumps(sorted(set(value), key=value.index))
        hosts[column] = value
    return {
        "ssh_reuse": _option_bool(source, "ssh_reuse"),
        "priority": _option_int(source, "priority", -MAX_PRIORITY, MAX_PRIORITY),
        "retries": _option_int(source, "retries", 0, MAX_RETRIES),
        "retry_delay": _option_seconds(source, "retry_delay"),
        "timeout": _option_seconds(source, "timeout"),
        "not_before": _option_time(source, "not_before"),
        "slots_wanted": _option_int(source, "slots_wanted", 1, MAX_SLOTS),
        "on_end": _option_program(source, "on_end"),
        "resources": _option_resources(source, split_allowed and source.get("split")),
        "estimate": _option_seconds(source, "estimate"),
        **hosts,
        **({"split": _split_option(source)} if split_allowed else {}),
    }


RESOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}\Z")
MAX_RESOURCE_COUNT = 10 ** 12
MAX_MEMORY = 2 ** 60


def _resource_counts(value, what, low):
    """The named resources of a resources object (all its keys but gpus and mem):
    {name: whole number from LOW}; a 0 (edit_slave's NAME=0: take it away) is kept."""
    named = {}
    for name, count in value.items():
        if name in ("gpus", "mem"):
            continue
        if not isinstance(name, str) or not RESOURCE_NAME.match(name) or name == "slots":
            raise UserError(f"{what}: {name!r} is not a resource name (a letter, then letters, "
                            "digits, _ or -; not gpus, mem or slots)")
        if not whole_number(count, low, MAX_RESOURCE_COUNT):
            raise UserError(f"{what}: {name} must be a whole number from {low}, not {count!r}")
        named[name] = count
    return named


def _memory(value, what, low=0):
    if not whole_number(value, low, MAX_MEMORY):
        raise UserError(f"{what}: mem must be a number of bytes from {low}, not {value!r}")
    return value


def _option_resources(source, split=False):
    """A job's resources as requests and documents carry them, {"gpus": GPUs (0.5 shares
    one), "mem": bytes, NAME: count} (each optional); in the column form (JSON,
    GPUs in thousandths: see migration 13), or None for none."""
    value = source.get("resources")
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise UserError("'resources' must be an object: {\"gpus\": 1, \"mem\": BYTES, "
                        "NAME: COUNT}")
    need = {}
    gpus = value.get("gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)):
        raise UserError(f"resources: gpus must be a number of GPUs, not {gpus!r}")
    if gpus:
        need["gpus"] = job_gpus(repr(gpus))
        if split and need["gpus"] % GPU_UNITS:
            raise UserError(f"--gpus {gpus:g} with --split: a split job takes whole GPUs per "
                            "slot (ask for 1 per slot, or do not split)")
    if value.get("mem"):
        need["mem"] = _memory(value["mem"], "resources")
    named = {name: count for name, count in _resource_counts(value, "resources", 0).items()
             if count}
    if named:
        need["named"] = named
    return json.dumps(need) if need else None


def _worker_resources(value, name="resources", edit=False):
    """A worker's resources as add_slave sends them, {"gpus": [device ids], "mem":
    bytes, NAME: count}, in the column form (JSON, or None for none).  EDIT
    (edit_slave: a change to them): gpus [] or mem 0 takes them away, and so
    does NAME: 0; the result is the change, to merge (merged_resources)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"malformed request: {name} must be an object")
    declared = {}
    if "gpus" in value:
        gpus = value["gpus"]
        if not isinstance(gpus, list) or len(gpus) > MAX_GPUS or \
                not all(isinstance(device, str) and plain_number(device) for device in gpus) \
                or len(set(gpus)) < len(gpus) or not (gpus or edit):
            raise UserError("--gpus: give a count (--gpus 4) or distinct device ids "
                            "(--gpus 0,2,5)")
        declared["gpus"] = gpus
    if "mem" in value:
        declared["mem"] = _memory(value["mem"], "--mem", 0 if edit else 1)
    named = _resource_counts(value, "--resource", 0 if edit else 1)
    if named:
        declared["named"] = named
    if edit:
        return declared
    return json.dumps(declared) if declared else None


def _worker_resources_change(value, name):
    return _worker_resources(value, name, edit=True)


def merged_resources(column, change):
    """A worker's resources column after edit_slave's CHANGE (see _worker_resources)."""
    resources = json.loads(column or "{}")
    if "gpus" in change:
        resources["gpus"] = change["gpus"]
    if "mem" in change:
        resources["mem"] = change["mem"]
    named = {**resources.get("named", {}), **change.get("named", {})}
    resources["named"] = {name: count for name, count in named.items() if count}
    resources = {key: value for key, value in resources.items() if value}
    return json.dumps(resources) if resources else None


def _split_option(source):
    """--split: the job's slots may come from several workers; it needs 2 or more."""
    split = source.get("split", False)
    if not isinstance(split, bool):
        raise UserError("'split' must be true or false")
    if split and source.get("slots_wanted", source.get("slots", 1)) == 1:
        raise UserError("--split needs --slots of 2 or more (the slots to split across "
                        "workers)")
    return split


def _option_bool(source, name):
    value = source.get(name, JOB_OPTIONS[name])
    if not isinstance(value, bool):
        raise UserError(f"'{name}' must be true or false")
    return value


def _option_int(source, name, low, high):
    value = source.get(name, JOB_OPTIONS[name])
    if not whole_number(value, low, high):
        raise UserError(f"'{name}' must be a whole number from {low} to {high}")
    return value


def _priority(value, name):
    return _option_int({name: value}, name, -MAX_PRIORITY, MAX_PRIORITY)


def _option_seconds(source, name):
    """A duration option: timeout may be null (none) but not 0; retry_delay may be 0."""
    optional = JOB_OPTIONS[name] is None
    value = source.get(name, JOB_OPTIONS[name])
    if value is None and optional:
        return None
    if not _seconds(value, 0, MAX_DURATION):
        raise UserError(f"'{name}' must be a number of seconds from 0 to {MAX_DURATION}")
    if value == 0 and optional:
        raise UserError(f"'{name}' must be more than 0 seconds (or null for none)")
    return float(value)


def _option_program(source, name):
    """A hook (--on-end): a non-empty list of strings, its program an absolute path
    to an executable file (the client resolved it: see hook_command); in its
    column form, JSON."""
    value = source.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(word, str) and "\0" not in word for word in value):
        raise UserError(f"'{name}' must be a program and its arguments: a non-empty list "
                        "of strings")
    check_script(value[0], what="--on-end program")
    return json.dumps(value)


def _option_time(source, name):
    value = source.get(name)
    if value is None:
        return None
    try:
        return parse_iso_time(value)
    except (ValueError, TypeError, OverflowError):
        raise UserError(f"'{name}' {value!r} is not an ISO 8601 time") from None


def _arg_lists(value, name):
    """add_job's args_list: one list of arguments per job."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise UserError("malformed request: args_list must be a non-empty list")
    for args in value:
        _strings_or_empty(args, "args")
    return value


def validate_status_document(document, defaults):
    """Check a status --json document whole (this tool's, or the original tool's: see
    from_original_status); return (workers, jobs, notes on what was left out)."""
    if not isinstance(document, dict):
        raise UserError("not a status document: expected a JSON object with "
                        "'slaves' and 'job_waitlist'")
    for key in ("slaves", "job_waitlist"):
        if not isinstance(document.get(key), list):
            raise UserError(f"not a status document: '{key}' must be a list")
    document, notes = from_original_status(document, defaults["cwd"])
    environments = document.get("environments", {})
    if not isinstance(environments, dict):
        raise UserError("'environments' must be an object")
    if not isinstance(document.get("paused", False), bool):
        raise UserError("'paused' must be true or false")
    workers, names = [], set()
    for index, slave in enumerate(document["slaves"]):
        where = f"slaves[{index}]"
        workers.append(_status_worker(slave, where))
        if workers[-1]["ip"] in names:
            raise UserError(f"{where}: worker {workers[-1]['ip']} is listed twice")
        names.add(workers[-1]["ip"])
    arrays = document.get("arrays", [])
    if not isinstance(arrays, list) or not all(
            isinstance(array, dict) and whole_number(array.get("id"), 1, MAX_LOADED_JOB_ID)
            for array in arrays):
        raise UserError("'arrays' must be a list of objects with an 'id'")
    arrays = {array["id"]: array for array in arrays}
    jobs, ids = [], set()
    for index, entry in enumerate(document["job_waitlist"]):
        where = f"job_waitlist[{index}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: each job must be an object")
        if entry.get("service") is not None:
            # A replica is its service's to start: not a job of its own to queue.
            notes.append(f"job {entry.get('id')} (replica {entry.get('replica')} of service "
                         f"{entry['service']}) was left out: replicas are not loaded as jobs")
            continue
        try:
            jobs.append(_status_job(entry, environments, defaults))
            jobs[-1]["task"] = _status_task(entry, arrays)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        job_id = jobs[-1]["id"]
        if job_id is not None:
            if job_id in ids:
                raise UserError(f"{where}: job id {job_id} is listed twice")
            ids.add(job_id)
    return workers, jobs, notes


def _status_task(entry, arrays):
    """A document's job that is a task of an array: {array, task, task_arg, spec,
    max_running} (the array's from the document's 'arrays'); None for other jobs."""
    array_id = entry.get("array")
    if array_id is None:
        return None
    task_id, task_arg = entry.get("task"), entry.get("task_arg")
    if not whole_number(array_id, 1, MAX_LOADED_JOB_ID) or \
            not whole_number(task_id, 0, MAX_JOB_ID):
        raise UserError("'array' and 'task' must be whole numbers (a task's array id and "
                        "index)")
    if task_arg is not None and not isinstance(task_arg, str) or "\0" in (task_arg or ""):
        raise UserError("'task_arg' must be a string")
    array = arrays.get(array_id, {})
    spec, most = array.get("spec"), array.get("max_running")
    if spec is not None:
        if not isinstance(spec, str) or "%" in spec:
            raise UserError(f"arrays: the spec of array {array_id} must be a string like 1-100")
        parse_array_spec(spec)
    if most is not None and not whole_number(most, 1, MAX_ARRAY_TASKS):
        raise UserError(f"arrays: max_running of array {array_id} must be a whole number")
    return {"array": array_id, "task": task_id, "task_arg": task_arg, "spec": spec,
            "max_running": most}


def from_original_status(document, cwd):
    """A status document of the tool cli.py grew out of, in this tool's shape, and
    notes on what it cannot take: {"job_waitlist": [[[SCRIPT, ARG...], [NAME=value,
    ...]], ...], "slaves": [{"ip", "envs": [NAME=value, ...], "running_job",
    "remove_after_finish"}]}.  A document in this tool's shape comes back as it is."""
    notes = []
    slaves = []
    for index, slave in enumerate(document["slaves"]):
        if not isinstance(slave, dict) or not isinstance(slave.get("envs", {}), list):
            slaves.append(slave)
            continue
        where, name = f"slaves[{index}]", slave.get("ip")
        slave = dict(slave, envs=_original_variables(slave["envs"], where))
        running = slave.pop("running_job", None)
        if isinstance(running, dict):
            command = running.get("script")
            command = " ".join(map(str, command)) if isinstance(command, list) else command
            notes.append(f"{name} was running job {running.get('id')} ({command}) under the "
                         f"original tool: not adopted (its pid {running.get('pid')} is that "
                         "tool's); queue it again if it did not finish")
        if slave.pop("remove_after_finish", False):
            notes.append(f"{name} was to be removed after its job (remove_after_finish): "
                         "left out")
            continue
        slaves.append(slave)
    jobs = []
    for index, entry in enumerate(document["job_waitlist"]):
        if not isinstance(entry, list):
            jobs.append(entry)   # this tool's job object (or not: checked later)
            continue
        where = f"job_waitlist[{index}]"
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and entry[0] and all(isinstance(word, str) for word in entry[0])
                and isinstance(entry[1], list)):
            raise UserError(f"{where}: expected a job object, or the original tool's "
                            "[[SCRIPT, ARGS...], [NAME=value, ...]]")
        script, *args = entry[0]
        jobs.append({"script": os.path.join(cwd, script), "args": args,
                     "envs": _original_variables(entry[1], where)})
    return dict(document, slaves=slaves, job_waitlist=jobs), notes


def _original_variables(assignments, where):
    """The original tool's ["NAME=value", ...] as {NAME: value}."""
    variables = {}
    for text in assignments:
        if not isinstance(text, str):
            raise UserError(f"{where}: 'envs' must hold NAME=value strings")
        try:
            name, value = parse_assignment(text)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        variables[name] = value
    return variables


def _status_worker(slave, where):
    if not isinstance(slave, dict) or not isinstance(slave.get("ip"), str):
        raise UserError(f"{where}: each slave needs an 'ip' string")
    name = slave["ip"]
    try:
        validate_host_name(name)
        validate_variables(slave.get("envs", {}), "'envs'")
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    slots = _slot_count(slave.get("slots", 1), f"{where}: 'slots'")
    # A paused worker stays paused; one that was draining is registered afresh.
    state = WorkerState.PAUSED if slave.get("state") == WorkerState.PAUSED.value \
        else WorkerState.ACTIVE
    ssh_reuse = slave.get("ssh_reuse", True)
    if not isinstance(ssh_reuse, bool):
        raise UserError(f"{where}: 'ssh_reuse' must be true or false")
    try:
        down_after = _down_after(slave.get("down_after"))
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    try:
        resources = _worker_resources(_declared_resources(slave.get("resources") or {}),
                                      "'resources'")
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    return {"ip": name, "slots": slots, "envs": slave.get("envs", {}),
            "ssh_checked": bool(slave.get("ssh_checked", False)), "state": state,
            "ssh_reuse": ssh_reuse, "down_after": down_after, "resources": resources}


def _declared_resources(shown):
    """What a worker declares, from its resources as status --json shows them
    ({"gpus": {"ids": [...]}, "mem": {"total": BYTES}, NAME: {"total": COUNT}}: see
    Worker.resources_json) or as add_slave sends them."""
    if not isinstance(shown, dict):
        raise UserError("'resources' must be an object")
    declared = {}
    for name, value in shown.items():
        if isinstance(value, dict):
            value = value.get("ids") if name == "gpus" else value.get("total")
        if value not in (None, 0, []):
            declared[name] = value
    return declared


def _entry_command(entry, defaults):
    """The script, args, cwd and envs of a job or service in a document, checked."""
    script = entry.get("script")
    if not isinstance(script, str) or not script:
        raise UserError("'script' must be the path of an executable script")
    check_script(script)
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(arg, str) and "\0" not in arg
                                             for arg in args):
        raise UserError("'args' must be a list of strings")
    cwd = entry.get("cwd", defaults["cwd"])
    if not isinstance(cwd, str) or not os.path.isabs(cwd) or "\0" in cwd:
        raise UserError("'cwd' must be an absolute path")
    variables = validate_variables(entry.get("envs", {}), "'envs'")
    return script, args, cwd, variables


def _status_job(entry, environments, defaults):
    script, args, cwd, variables = _entry_command(entry, defaults)
    job_id = entry.get("id")
    if job_id is not None and not whole_number(job_id, 1, MAX_LOADED_JOB_ID):
        raise UserError(f"'id' must be a whole number from 1 to {MAX_LOADED_JOB_ID}")
    environment_key = entry.get("environment")
    if environment_key is None:
        environment = defaults["environment"]
    else:
        environment = environments.get(str(environment_key))
        if environment is None:
            raise UserError(f"environment {environment_key} is not in 'environments'")
        try:
            environment = _environment(environment)
        except UserError:
            raise UserError(f"environments[{str(environment_key)!r}] must be an object of "
                            "NAME: VALUE strings (names without '=', no NUL bytes)") from None
    submitted_at = entry.get("submitted_at")
    umask = entry.get("umask", defaults["umask"])
    if not whole_number(umask, 0, 0o777):
        raise UserError("'umask' must be a number from 0 to 511 (0o777)")
    after = {}
    for name in ("after", "after_any"):
        value = entry.get(name, [])
        if not isinstance(value, list) or not all(whole_number(item, 1, MAX_JOB_ID)
                                                  for item in value):
            raise UserError(f"'{name}' must be a list of job ids")
        after[name] = list(dict.fromkeys(value))
    if set(after["after"]) & set(after["after_any"]):
        raise UserError("a job id is in both 'after' and 'after_any'")
    return {"id": job_id, "script": script, "args": args, "cwd": cwd, "envs": variables,
            "environment": environment, "umask": umask, "options": _job_options(entry, True),
            "submitted_at": _submitted_at(submitted_at), **after}


def _submitted_at(text):
    try:
        return parse_iso_time(text)
    except (ValueError, OverflowError):
        raise UserError(f"'submitted_at' {text!r} is not an ISO 8601 time") from None


# A service in a document (load_services, load_status) has the fields services
# --json prints; the ones it prints about the running replicas are left out.
SERVICE_FIELDS = ("name", "script", "args", "cwd", "envs", "replicas", "port", "enabled",
                  "health", "slots", "on", "prefer", "exclude", "ssh_reuse", "resources")
SERVICE_READ_ONLY_FIELDS = ("running", "healthy", "restarts", "last_end", "instances")


def services_in(document):
    """The list of services of a load_services document: a list, or {"services": [...]}
    (other keys, such as those of a status document, are not read)."""
    entries = document.get("services") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise UserError('not a services document: expected a list of services, or '
                        '{"services": [...]} (what services --json or status --json prints)')
    return entries


def validate_services(entries, defaults):
    """Check the services of a document whole; return each as a spec (see
    Services.spec_of) with its place in the document ("where"), and the
    environment and umask it would be added with (DEFAULTS: the client's)."""
    specs, names = [], set()
    for index, entry in enumerate(entries):
        place = f"services[{index}]"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            place += f" ({entry['name']})"
        try:
            spec = _service_entry(entry, defaults)
        except UserError as error:
            raise UserError(f"{place}: {error}") from None
        if spec["name"] in names:
            raise UserError(f"{place}: service {spec['name']} is listed twice")
        names.add(spec["name"])
        specs.append(dict(spec, where=place))
    return specs


def _service_entry(entry, defaults):
    """One service of a document, checked as add_service checks its request."""
    if not isinstance(entry, dict):
        raise UserError("each service must be an object")
    unknown = sorted(set(entry) - set(SERVICE_FIELDS) - set(SERVICE_READ_ONLY_FIELDS))
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r} (a service has "
                        f"{', '.join(SERVICE_FIELDS)})")
    if "name" not in entry:
        raise UserError("'name' is missing")
    name = _service_name(entry["name"], "name")
    script, args, cwd, variables = _entry_command(entry, defaults)
    replicas = entry.get("replicas", 1)
    if not whole_number(replicas, 0, MAX_REPLICAS):
        raise UserError(f"'replicas' must be a whole number from 0 to {MAX_REPLICAS}")
    port = entry.get("port")
    if port is not None and not whole_number(port, 1, 65535):
        raise UserError("'port' must be a port number from 1 to 65535, or null")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise UserError("'enabled' must be true or false")
    try:
        health = _health(entry.get("health"), "health")
    except UserError:
        raise UserError("'health' must be null, or {\"tcp\": true} or {\"cmd\": COMMAND} "
                        "with an optional \"interval\" (seconds, at least 0.1) and "
                        "\"failures\" (1 to 1000)") from None
    placement = {"slots_wanted": _slot_count(entry.get("slots", 1), "'slots'")}
    for key in ("on", "prefer", "exclude", "ssh_reuse", "resources"):
        if entry.get(key) is not None:
            placement[key] = entry[key]
    params = {"port": port, "replicas": replicas, "health": health, "variables": variables}
    params.update(_add_service_whole(params, placement))
    return {"name": name, "script": script, "args": args, "cwd": cwd, "envs": variables,
            "port": port, "health": health, "options": params["options"],
            "replicas": replicas, "enabled": enabled,
            "environment": defaults["environment"], "umask": defaults["umask"]}


# A schedule in a status document has the fields schedules --json prints; those
# about its latest run are not read.
SCHEDULE_FIELDS = ("name", "rule", "script", "args", "cwd", "envs", "environment", "umask",
                   "overlap", "skip_missed", "paused", "next_due", "runs", "skipped",
                   "slots_wanted", "split", "on", "prefer", "exclude", "ssh_reuse",
                   "priority", "retries", "retry_delay", "timeout", "on_end", "resources",
                   "estimate")
SCHEDULE_READ_ONLY_FIELDS = ("rule_text", "last_job", "last_state", "last_result")


def validate_schedules(entries, environments, defaults):
    """Check the schedules of a status document whole; return each as a spec for
    Schedules.replace."""
    if not isinstance(entries, list):
        raise UserError("'schedules' must be a list")
    if not isinstance(environments, dict):
        raise UserError("'environments' must be an object")
    specs = {}
    for index, entry in enumerate(entries):
        try:
            spec = _status_schedule(entry, environments, defaults)
        except UserError as error:
            raise UserError(f"schedules[{index}]: {error}") from None
        if spec["name"] in specs:
            raise UserError(f"schedules[{index}]: schedule {spec['name']} is listed twice")
        specs[spec["name"]] = spec
    for spec in specs.values():
        followed = spec["rule"].get("after")
        if followed is not None and followed not in specs:
            raise UserError(f"schedule {spec['name']} follows {followed}, which is not in "
                            "'schedules'")
    return list(specs.values())


def _status_schedule(entry, environments, defaults):
    if not isinstance(entry, dict):
        raise UserError("each schedule must be an object")
    unknown = sorted(set(entry) - set(SCHEDULE_FIELDS) - set(SCHEDULE_READ_ONLY_FIELDS))
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r} (a schedule has "
                        f"{', '.join(SCHEDULE_FIELDS)})")
    name = _schedule_name(entry.get("name"), "name")
    rule = entry.get("rule")
    if not isinstance(rule, dict) or set(rule) - {"every", "daily", "days", "cron", "after"}:
        raise UserError("'rule' must be an object with one of every, daily (and days), cron "
                        "or after")
    rule = schedule_rule(rule.get("every"), rule.get("daily"), rule.get("days"),
                         rule.get("cron"), rule.get("after"))
    job = _status_job({key: entry[key] for key in SCHEDULE_FIELDS[1:] if key in entry},
                      environments, defaults)
    flags = {key: entry.get(key, False) for key in ("overlap", "skip_missed", "paused")}
    counters = {key: entry.get(key, 0) for key in ("runs", "skipped")}
    if not all(isinstance(value, bool) for value in flags.values()):
        raise UserError("'overlap', 'skip_missed' and 'paused' must be true or false")
    if not all(whole_number(value, 0, MAX_JOB_ID) for value in counters.values()):
        raise UserError("'runs' and 'skipped' must be whole numbers")
    return {"name": name, "rule": rule, **{key: job[key] for key in
            ("script", "args", "cwd", "envs", "environment", "umask", "options")},
            "overlap": flags["overlap"], "skip_missed": flags["skip_missed"],
            "enabled": not flags["paused"], "next_due": _option_time(entry, "next_due"),
            **counters}


def check_script(path, shown=None, what="script"):
    """PATH must be an executable file; errors name it as the user wrote it (SHOWN),
    and as WHAT."""
    shown = shown or path
    if not os.path.isabs(path):
        raise UserError(f"the {what} path {shown!r} must be absolute")
    if not os.path.exists(path):
        raise UserError(f"no such {what}: {shown}")
    if not os.path.isfile(path):
        raise UserError(f"{shown} is not a file")
    if not os.access(path, os.X_OK):
        raise UserError(f"{shown} is not executable: run chmod +x {shown}")


# --- the requests ------------------------------------------------------------

class Request:
    """One request the server takes: the Handlers method that serves it, and its
    parameters, name -> (check, default); a parameter without a default
    (NO_DEFAULT) must be given.  WHOLE, if given, checks the parameters together
    (and as given) and returns more of them, in their checked form."""

    def __init__(self, handler, whole=None, **params):
        self.handler = handler
        self.whole = whole
        self.params = {name: spec if isinstance(spec, tuple) else (spec, NO_DEFAULT)
                       for name, spec in params.items()}


def _add_job_whole(params, given):
    if params["args_list"] is None and params["args"] is None:
        raise UserError("malformed request: args must be a list of strings")
    if params["task_args"] is not None and params["args_list"] is not None:
        raise UserError("malformed request: task_args and args_list together")
    if params["task_args"] is not None:
        if len(params["task_args"]) > MAX_BULK_JOBS:
            raise UserError(f"more than {MAX_BULK_JOBS} tasks in one array; split the file")
        try:
            "".join(params["task_args"]).encode()
        except UnicodeEncodeError:
            raise UserError("malformed request: task_args must be UTF-8 text") from None
    return {"options": _job_options(given, True),
            "array": array_request(params["array"], params["args_list"], params["task_args"])}


def _add_schedule_whole(params, given):
    taken = sorted(set(params["variables"]) & set(SCHEDULE_VARIABLES))
    if taken:
        raise UserError(f"{taken[0]} is set by the schedule for each run; choose another name")
    return {"rule": schedule_rule(params["every"], params["daily"], params["days"],
                                  params["cron"], params["after_schedule"]),
            "options": _job_options(given, True)}


def _remove_job_whole(params, given):
    if params["ids"] is None:
        _string(params["script"], "script")
    return {}


def _edit_slave_whole(params, given):
    """HOSTS, or the one HOST that clients before host lists sent."""
    hosts = params["hosts"] + ([params["host"]] if params["host"] is not None else [])
    if not hosts:
        raise UserError("malformed request: hosts must be a non-empty list of strings")
    return {"hosts": unique_hosts(hosts)}


def _load_status_whole(params, given):
    workers, jobs, notes = validate_status_document(
        params["document"], {"cwd": params["cwd"], "environment": params["environment"],
                             "umask": params["umask"]})
    # A document from before services (or the original tool's) leaves them as they are.
    services = params["document"].get("services")
    if services is not None:
        if not isinstance(services, list):
            raise UserError("'services' must be a list")
        services = validate_services(services, {"cwd": params["cwd"],
                                                "environment": params["environment"],
                                                "umask": params["umask"]})
    # Likewise for schedules.
    schedules = params["document"].get("schedules")
    if schedules is not None:
        schedules = validate_schedules(schedules, params["document"].get("environments", {}),
                                       {"cwd": params["cwd"],
                                        "environment": params["environment"],
                                        "umask": params["umask"]})
    return {"workers": workers, "jobs": jobs, "notes": notes, "services": services,
            "schedules": schedules}


def _load_services_whole(params, given):
    defaults = {"cwd": params["cwd"], "environment": params["environment"],
                "umask": params["umask"]}
    return {"services": validate_services(services_in(params["document"]), defaults)}


def _dashboard_whole(params, given):
    if params["stop"] and (params["listen"] is not None or params["metrics_open"]):
        raise UserError("dashboard --stop takes no --listen or --metrics-open: it turns the "
                        "dashboard off")
    return {}


def _wait_whole(params, given):
    if params["ids"] is not None and params["children_of"] is not None:
        raise UserError("wait takes either job ids or --children, not both")
    return {}


_JOB_SHAPE = {"cwd": _string, "environment": _environment, "umask": (_umask, 0o022)}
REQUESTS = {
    "ping": Request("ping"),
    "stop": Request("stop"),
    "status": Request("status", waiting_limit=(_row_limit, None),
                      environments=(_flag, True)),
    "workers": Request("worker_names"),
    "ssh_config": Request("ssh_config"),
    "add_slave": Request("add_slave", hosts=_hosts, slots=(_slots_flag, 1),
                         slots_of=(_slots_of, {}),
                         variables=(_variables("add_slave"), {}), ssh_reuse=(_flag, True),
                         down_after=(_down_after, None), endpoints=(_endpoints, {}),
                         ssh_checked=(_truth, False), resources=(_worker_resources, None)),
    "remove_slave": Request("remove_slave", hosts=_hosts, mode=(_removal_mode, None),
                            grace=(_grace, DEFAULT_KILL_GRACE)),
    "edit_slave": Request("edit_slave", _edit_slave_whole, host=(_optional_string, None),
                          hosts=(_hosts_or_empty, []), slots=(_optional_slots_flag, None),
                          variables=(_variables("edit_slave -e"), {}),
                          unset=(_strings_or_empty, []), ssh_reuse=(_flag, ABSENT),
                          down_after=(_down_after, ABSENT),
                          resources=(_worker_resources_change, None)),
    "add_job": Request("add_job", _add_job_whole, script=_string,
                       args=(_strings_or_empty, None), args_list=(_arg_lists, None),
                       variables=(_variables("add_job -e"), {}),
                       after=(_job_ids_or_empty, []), after_any=(_job_ids_or_empty, []),
                       array=(_optional_string, None), task_args=(_optional_strings, None),
                       parent=(_optional_job_id, None), nohup=(_flag, False), **_JOB_SHAPE),
    "remove_job": Request("remove_job", _remove_job_whole, ids=(_optional_job_ids, None),
                          script=(_optional_string, None), args=(_strings_or_empty, [])),
    "load_status": Request("load_status", _load_status_whole, document=_anything,
                           **_JOB_SHAPE),
    "kill": Request("kill", ids=_job_ids, grace=(_grace, DEFAULT_KILL_GRACE)),
    "priority": Request("priority", ids=_job_ids, priority=(_priority, 0)),
    "add_service": Request("add_service", _add_service_whole, name=_service_name,
                           script=_string, args=(_strings_or_empty, []),
                           variables=(_variables("add_service -e"), {}),
                           replicas=(_replica_count, 1), port=(_service_port, None),
                           health=(_health, None), **_JOB_SHAPE),
    "scale": Request("scale", name=_service_name, replicas=_replica_count,
                     grace=(_grace, DEFAULT_KILL_GRACE)),
    "stop_service": Request("stop_service", name=_service_name,
                            grace=(_grace, DEFAULT_KILL_GRACE)),
    "start_service": Request("start_service", name=_service_name),
    "remove_service": Request("remove_service", name=_service_name,
                              grace=(_grace, DEFAULT_KILL_GRACE)),
    "services": Request("list_services", name=(_optional_string, None)),
    "load_services": Request("load_services", _load_services_whole, document=_anything,
                             grace=(_grace, DEFAULT_KILL_GRACE), **_JOB_SHAPE),
    "retry": Request("retry", ids=(_optional_job_ids, None), state=(_state_filter, (None, None)),
                     failed=(_flag, False), script=(_optional_string, None)),
    "jobs": Request("jobs", id=(_optional_job_name, None),
                    state=(_state_filter, (None, None)), last=(_last, None),
                    worker=(_optional_string, None), script=(_optional_string, None),
                    array=(_optional_job_id, None), tree=(_flag, False),
                    schedule=(_optional_string, None), offset=(_offset, 0)),
    "purge": Request("purge", older_than=(_age, 0)),
    "wait": Request("wait", _wait_whole, ids=(_optional_job_ids, None),
                    children_of=(_optional_job_id, None)),
    "pause": Request("pause", hosts=(_hosts_or_empty, [])),
    "watch": Request("watch", interval=(_snapshot_interval, LIVE_MIN_INTERVAL)),
    "dashboard": Request("dashboard", _dashboard_whole, listen=(_listen_address, None),
                         metrics_open=(_flag, False), stop=(_flag, False)),
    "add_schedule": Request("add_schedule", _add_schedule_whole, name=_schedule_name,
                            every=(_anything, None), daily=(_anything, None),
                            days=(_anything, None), cron=(_anything, None),
                            after_schedule=(_anything, None), overlap=(_flag, False),
                            skip_missed=(_flag, False), script=_string,
                            args=(_strings_or_empty, []),
                            variables=(_variables("add_schedule -e"), {}), **_JOB_SHAPE),
    "schedules": Request("list_schedules", name=(_optional_string, None)),
    "pause_schedule": Request("pause_schedule", name=_schedule_name),
    "resume_schedule": Request("resume_schedule", name=_schedule_name),
    "remove_schedule": Request("remove_schedule", name=_schedule_name),
    "run_schedule": Request("run_schedule", name=_schedule_name),
    "resume": Request("resume", hosts=(_hosts_or_empty, [])),
}


def check_request(line):
    """(command, its Request, its checked parameters) of a request line; UserError if
    the line is malformed."""
    try:
        message = json.loads(line)
        if not isinstance(message, dict) or not isinstance(message.get("command"), str) \
                or not isinstance(message.get("params", {}), dict):
            raise ValueError("not a request object")
    except (ValueError, RecursionError) as error:
        raise UserError(f"malformed request: {error}") from None
    spec = REQUESTS.get(message["command"])
    if spec is None:
        raise UserError(f"unknown command {message['command']!r}")
    given = message.get("params", {})
    params = {}
    for name, (check, default) in spec.params.items():
        if name in given or default is NO_DEFAULT:
            # A missing required one is checked as null: the check says what it wants.
            params[name] = check(given.get(name), name)
        else:
            params[name] = type(default)(default) if isinstance(default, (list, dict)) \
                else default
    if spec.whole is not None:
        params.update(spec.whole(params, given))
    return message["command"], spec, params


###############################################################################
# Storage ######################################################################
###############################################################################

# One list of migrations; PRAGMA user_version counts how many are applied.
# A migration that has been released is never edited: add a new one.
MIGRATIONS = [
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);   -- JSON values
    CREATE TABLE environments (
        id INTEGER PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,
        variables TEXT NOT NULL            -- JSON object, the submitter's environment
    );
    CREATE TABLE workers (
        position INTEGER PRIMARY KEY AUTOINCREMENT,   -- order of addition
        name TEXT NOT NULL UNIQUE,
        slots INTEGER NOT NULL CHECK (slots >= 1),
        variables TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL,
        ssh_checked INTEGER NOT NULL DEFAULT 0,
        added_at REAL NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,         -- never reused
        state TEXT NOT NULL,
        result TEXT,
        script TEXT NOT NULL,
        args TEXT NOT NULL,                            -- JSON list of strings
        cwd TEXT NOT NULL,
        environment_id INTEGER NOT NULL REFERENCES environments(id),
        variables TEXT NOT NULL DEFAULT '{}',          -- the job's own -e
        umask INTEGER NOT NULL DEFAULT 18,             -- the submitter's (0o022)
        worker TEXT,
        slot INTEGER,
        attempt INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        signal INTEGER,
        reason TEXT,
        kill_requested_at REAL,
        kill_grace REAL,
        log TEXT,                                      -- set when it starts
        submitted_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL
    );
    CREATE INDEX jobs_by_state ON jobs (state, id);
    CREATE INDEX jobs_by_result ON jobs (state, result);
    CREATE INDEX jobs_by_end ON jobs (ended_at) WHERE state = 'done';
    """,
    # 2: job scripts share one SSH connection per host, unless the worker or
    # the job turns it off.
    """
    ALTER TABLE workers ADD COLUMN ssh_reuse INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN ssh_reuse INTEGER NOT NULL DEFAULT 1;
    """,
    # 3: scheduling policy: priorities, retries, timeouts, start times,
    # dependencies, multi-slot jobs, placement, worker health.
    """
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;      -- more attempts allowed
    ALTER TABLE jobs ADD COLUMN retry_delay REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN timeout REAL;                          -- seconds an attempt may run
    ALTER TABLE jobs ADD COLUMN timed_out INTEGER NOT NULL DEFAULT 0;  -- its kill is the timeout's
    ALTER TABLE jobs ADD COLUMN not_before REAL;                       -- --at, --delay, --retry-delay
    ALTER TABLE jobs ADD COLUMN slots_wanted INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN slots TEXT;                            -- JSON list, while it runs
    ALTER TABLE jobs ADD COLUMN run_on TEXT;                           -- JSON lists of workers
    ALTER TABLE jobs ADD COLUMN prefer TEXT;
    ALTER TABLE jobs ADD COLUMN exclude TEXT;
    -- 1 while a waiting job may not start: open dependencies, or a start time
    -- still to come.  Kept up to date so that choosing the next job never
    -- scans the blocked ones.
    ALTER TABLE jobs ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_ready ON jobs (priority DESC, id) WHERE state = 'waiting' AND blocked = 0;
    CREATE INDEX jobs_not_before ON jobs (not_before) WHERE state = 'waiting' AND blocked = 1;
    -- A row is a condition not yet met: it goes when the prerequisite succeeds
    -- (or, for --after-any, when any of them does).
    CREATE TABLE dependencies (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        prerequisite INTEGER NOT NULL,
        any_of INTEGER NOT NULL,                        -- 0: --after, 1: --after-any
        PRIMARY KEY (job_id, prerequisite)
    );
    CREATE INDEX dependencies_by_prerequisite ON dependencies (prerequisite);
    CREATE TABLE attempts (                             -- every ended attempt of every job
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        worker TEXT,
        slots TEXT,
        started_at REAL,
        ended_at REAL,
        result TEXT,
        exit_code INTEGER,
        signal INTEGER,
        reason TEXT,
        PRIMARY KEY (job_id, attempt)
    );
    ALTER TABLE workers ADD COLUMN health TEXT NOT NULL DEFAULT 'up';
    ALTER TABLE workers ADD COLUMN checked_at REAL;
    ALTER TABLE workers ADD COLUMN check_reason TEXT;
    """,
    # 4: where ssh really goes for each worker (SLAVE_HOST, SLAVE_PORT,
    # SLAVE_USER), and the per-worker limit of failures in a row that sets a
    # worker aside (NULL: the server's --down-after).
    """
    ALTER TABLE workers ADD COLUMN ssh_host TEXT;
    ALTER TABLE workers ADD COLUMN ssh_port INTEGER;
    ALTER TABLE workers ADD COLUMN ssh_user TEXT;
    ALTER TABLE workers ADD COLUMN down_after INTEGER;
    """,
    # 5: retry.  The conditions no longer waited on, with how each was settled,
    # so that a retried job can bring back the dependents its failure skipped;
    # and how many attempts a job had before its latest retry, which its
    # --retries no longer counts.
    """
    CREATE TABLE settled_dependencies (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        prerequisite INTEGER NOT NULL,
        any_of INTEGER NOT NULL,
        -- met: the prerequisite (or, for --after-any, one of them) succeeded;
        -- failed: it ended without success; dropped: the dependent ended first.
        outcome TEXT NOT NULL,
        PRIMARY KEY (job_id, prerequisite)
    );
    CREATE INDEX settled_dependencies_by_prerequisite ON settled_dependencies (prerequisite);
    ALTER TABLE jobs ADD COLUMN attempts_before_retry INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: services.  A service is a job template and a number of replicas; each
    # replica runs as a job (service, replica), and starts again when it ends
    # while wanted.  The unique index keeps a replica number to one job not done.
    """
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        script TEXT NOT NULL,
        args TEXT NOT NULL,                            -- JSON list of strings
        cwd TEXT NOT NULL,
        environment_id INTEGER NOT NULL REFERENCES environments(id),
        variables TEXT NOT NULL DEFAULT '{}',
        umask INTEGER NOT NULL,
        options TEXT NOT NULL,                         -- JSON: the replicas' JOB_OPTIONS
        replicas INTEGER NOT NULL,
        port INTEGER,                                  -- PORT = port + REPLICA
        health TEXT,                                   -- JSON: tcp or cmd, interval, failures
        enabled INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL
    );
    CREATE TABLE replicas (                            -- what the restart policy remembers
        service TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
        replica INTEGER NOT NULL,
        restarts INTEGER NOT NULL DEFAULT 0,
        delay REAL NOT NULL DEFAULT 0,                 -- before its latest restart
        last_end TEXT,                                 -- how its latest job ended
        PRIMARY KEY (service, replica)
    );
    ALTER TABLE jobs ADD COLUMN service TEXT;
    ALTER TABLE jobs ADD COLUMN replica INTEGER;
    CREATE UNIQUE INDEX jobs_live_replica ON jobs (service, replica)
        WHERE service IS NOT NULL AND state != 'done';
    CREATE INDEX jobs_by_service ON jobs (service, ended_at) WHERE service IS NOT NULL;
    """,
    # 7: arrays.  Many tasks from one add_job (--array, :::, --args-file,
    # --each-line), each a job of its own; the array's id is its first task's
    # job id.  The tasks of an array with a limit (%K) are kept out of the
    # ready index: the scheduler takes at most the room their limit leaves
    # from an index of their own, so they neither exceed it nor hide the
    # jobs behind them.
    """
    CREATE TABLE arrays (
        id INTEGER PRIMARY KEY,                        -- its first task's job id
        tasks INTEGER NOT NULL,
        spec TEXT,                                     -- --array SPEC; NULL: :::, lines
        max_running INTEGER,                           -- %K; NULL: no limit
        created_at REAL NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN array_id INTEGER;
    ALTER TABLE jobs ADD COLUMN task_id INTEGER;       -- TASK_ID
    ALTER TABLE jobs ADD COLUMN task_arg TEXT;         -- TASK_ARG (--each-line)
    ALTER TABLE jobs ADD COLUMN limited INTEGER NOT NULL DEFAULT 0;   -- its array has %K
    CREATE INDEX jobs_by_array ON jobs (array_id, state, result) WHERE array_id IS NOT NULL;
    DROP INDEX jobs_ready;
    CREATE INDEX jobs_ready ON jobs (priority DESC, id)
        WHERE state = 'waiting' AND blocked = 0 AND limited = 0;
    CREATE INDEX jobs_ready_limited ON jobs (array_id, priority DESC, id)
        WHERE state = 'waiting' AND blocked = 0 AND limited = 1;
    """,
    # 8: each scheduling pass looks for the arrays with a limit: find them without
    # reading every array (one per add_job with :::).
    """
    CREATE INDEX arrays_limited ON arrays (id) WHERE max_running IS NOT NULL;
    """,
    # 9: split jobs (add_job --split).  split: its slots may come from several
    # workers; split_parts: where its attempt runs (or ran), JSON [[worker,
    # [slots]], ...], the first part being the one in worker and slots; each
    # attempt keeps its parts in its history.
    """
    ALTER TABLE jobs ADD COLUMN split INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN split_parts TEXT;
    ALTER TABLE attempts ADD COLUMN parts TEXT;
    """,
    # 10: parent and child jobs.  A job added from a process of a running job is
    # its child (parent: that job's id, checked against the requesting process,
    # never taken from JOB_ID alone); it is killed when its parent ends, unless
    # it was added with --nohup.
    """
    ALTER TABLE jobs ADD COLUMN parent INTEGER;
    ALTER TABLE jobs ADD COLUMN nohup INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_by_parent ON jobs (parent) WHERE parent IS NOT NULL;
    """,
    # 11: schedules (add_schedule): a job template and a rule (JSON: {"every":
    # seconds}, {"daily": "07:30,19:00", "days": "mon-fri" or null}, {"cron":
    # "M H DOM MON DOW"} or {"after": NAME}).  A firing inserts the job and moves
    # next_due in one transaction, so that no due time fires twice.  Each job
    # keeps the schedule that made it and the time it was due.
    """
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        script TEXT NOT NULL,
        args TEXT NOT NULL,                  -- JSON list
        cwd TEXT NOT NULL,
        environment_id INTEGER NOT NULL REFERENCES environments(id),
        variables TEXT NOT NULL,             -- JSON object, -e
        umask INTEGER NOT NULL,
        options TEXT NOT NULL,               -- JSON object, the job options (JOB_OPTIONS)
        overlap INTEGER NOT NULL DEFAULT 0,
        skip_missed INTEGER NOT NULL DEFAULT 0,
        enabled INTEGER NOT NULL DEFAULT 1,
        next_due REAL,                       -- NULL: it follows another schedule
        last_job INTEGER,                    -- the job of its latest run
        runs INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,  -- due while its previous run was not done
        followed_job INTEGER,                -- {"after": NAME}: the run of NAME last followed
        created_at REAL NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (next_due) WHERE enabled = 1;
    ALTER TABLE jobs ADD COLUMN schedule TEXT;
    ALTER TABLE jobs ADD COLUMN scheduled_for REAL;
    CREATE INDEX jobs_by_schedule ON jobs (schedule, id) WHERE schedule IS NOT NULL;
    """,
    # 12: completion hooks.  on_end: the job's own --on-end, a JSON argv.  A row
    # of hook_runs is one hook to run for one end of a job (its own, and start
    # --on-end's, the setting 'on_end'), with what that end was (the job_
    # columns), and how the hook went once it ran.  The trigger makes the rows in
    # the statement that moves the job to done, so in its transaction, whichever
    # code ends it: no end can be recorded without its hooks, nor twice.  A row
    # stays pending until its hook has ended and that is saved: a server killed
    # meanwhile runs it again (at least once).  Only new tables and columns.
    """
    ALTER TABLE jobs ADD COLUMN on_end TEXT;
    CREATE TABLE hook_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        origin TEXT NOT NULL,                          -- job: add_job's; server: start's
        argv TEXT NOT NULL,                            -- JSON list, its program absolute
        job_result TEXT NOT NULL,
        job_exit_code INTEGER,
        job_signal INTEGER,
        job_worker TEXT,
        job_attempts INTEGER NOT NULL,
        job_log TEXT,
        job_ended_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',         -- pending, done
        starts INTEGER NOT NULL DEFAULT 0,             -- more than 1: run again after a stop
        started_at REAL,
        ended_at REAL,
        duration REAL,
        exit_code INTEGER,                             -- the hook's own
        signal INTEGER,
        timed_out INTEGER NOT NULL DEFAULT 0,
        error TEXT                                     -- why it could not run
    );
    CREATE INDEX hook_runs_pending ON hook_runs (id) WHERE state = 'pending';
    CREATE INDEX hook_runs_by_job ON hook_runs (job_id);
    CREATE TRIGGER hook_runs_at_end AFTER UPDATE OF state ON jobs
    WHEN NEW.state = 'done' AND OLD.state != 'done'
    BEGIN
        INSERT INTO hook_runs (job_id, origin, argv, job_result, job_exit_code, job_signal,
                               job_worker, job_attempts, job_log, job_ended_at)
        SELECT NEW.id, 'job', NEW.on_end, NEW.result, NEW.exit_code, NEW.signal, NEW.worker,
               NEW.attempt, NEW.log, NEW.ended_at WHERE NEW.on_end IS NOT NULL;
        INSERT INTO hook_runs (job_id, origin, argv, job_result, job_exit_code, job_signal,
                               job_worker, job_attempts, job_log, job_ended_at)
        SELECT NEW.id, 'server', value, NEW.result, NEW.exit_code, NEW.signal, NEW.worker,
               NEW.attempt, NEW.log, NEW.ended_at FROM settings WHERE key = 'on_end';
    END;
    """,
    # 13: resources beyond slots.  A worker's: JSON {"gpus": [device ids], "mem":
    # bytes, "named": {name: count}}, NULL for none.  A job's need: the same form
    # but "gpus" in thousandths of a GPU (GPU_UNITS; a --split job's per slot), and
    # its --estimate in seconds.  resource_grant: what its latest attempt holds (or held),
    # JSON {worker: its Resources.take grant there}; written with the move to running, so
    # that a restart rebuilds every holding from the rows, and kept after it ends:
    # a retry on the same worker asks for the same devices.  Only new columns.
    """
    ALTER TABLE workers ADD COLUMN resources TEXT;
    ALTER TABLE jobs ADD COLUMN resources TEXT;
    ALTER TABLE jobs ADD COLUMN estimate REAL;
    ALTER TABLE jobs ADD COLUMN resource_grant TEXT;
    """,
]

# Per-job options beyond the command itself: column -> default.  add_job,
# load_status and the JSON forms all take them from here (see _job_options).
JOB_OPTIONS = {"ssh_reuse": True, "priority": 0, "retries": 0, "retry_delay": 0.0,
               "timeout": None, "not_before": None, "slots_wanted": 1, "run_on": None,
               "prefer": None, "exclude": None, "on_end": None, "resources": None,
               "estimate": None}


def storage_fault(path, error):
    """(what is wrong, what to do) when the disk that holds PATH refused a write (an
    sqlite3 error or an OSError); None when the disk is not to blame (corruption)."""
    import errno
    text = getattr(error, "strerror", None) or str(error)
    try:
        file_system = os.statvfs(path)
    except OSError:
        file_system = None
    if getattr(error, "errno", None) == errno.EROFS or "readonly" in text or \
            file_system is not None and file_system.f_flag & os.ST_RDONLY or \
            _refuses_new_files(path) == errno.EROFS:
        return (f"the file system of {path} is read-only ({text})",
                "make it writable again")
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "is full" in text \
            or file_system is not None and file_system.f_bavail == 0:
        return f"no space left on device for {path} ({text})", "free some space"
    if "disk I/O error" in text or "unable to open" in text:
        return (f"cannot write to {path} ({text})",
                "check its disk, free space and permissions")
    return None


def _refuses_new_files(path):
    """The errno with which the file system of PATH refuses a new (nameless) file, or None.

    A file system that went read-only after an error (ext4 errors=remount-ro)
    may still look writable to statvfs."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except OSError as error:
        return error.errno
    return None


def migrate(db):
    """Apply the migrations this database has not had yet."""
    import sqlite3
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise UserError(f"the database was written by a newer cli.py (schema {version}); "
                        "upgrade cli.py")
    for number in range(version, len(MIGRATIONS)):
        try:
            db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[number]}; "
                             f"PRAGMA user_version = {number + 1}; COMMIT;")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def open_database(path):
    """The database of a data dir, checked and migrated; UserError if it cannot be used."""
    import sqlite3
    existed = os.path.exists(path)
    wal = path + "-wal"
    if existed and os.path.getsize(path) == 0 and \
            not (os.path.exists(wal) and os.path.getsize(wal)):
        # SQLite would take it for a new database: a truncated one must not
        # become an empty queue without a word.
        raise UserError(f"the database {path} is empty (0 bytes): truncated, or never "
                        "written; refusing to start. Nothing was changed: restore it "
                        "from a backup, or remove it to start with an empty queue")
    try:
        # Autocommit mode: every change goes through Store.transaction().
        db = sqlite3.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 5000")
        if existed:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a crash of the process; only a power
        # loss can drop the last transactions.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db)
    except sqlite3.DatabaseError as error:
        fault = storage_fault(path, error)
        if fault:   # not the database's fault: never advise moving it away
            raise UserError(f"{fault[0]}; refusing to start. Nothing was changed: "
                            f"{fault[1]}, then start again") from None
        raise UserError(
            f"the database {path} is unreadable or corrupt ({error}); refusing to start. "
            "Nothing was changed: restore it from a backup, or move it away to start "
            "with an empty queue") from None
    return db


class Store:
    """The SQLite database of one data dir.  Only the server opens it, and only the Queue
    and Workers write to it (reads are free), but for the settings start takes
    from its command line (Server.load)."""

    def __init__(self, path):
        import sqlite3
        self.sqlite3 = sqlite3
        self.db = open_database(path)
        self.dependencies = Dependencies(self)
        self.service_rows = ServiceRows(self)
        self.arrays = ArrayRows(self)
        self.families = FamilyRows(self)
        self.schedules = ScheduleRows(self)
        self.hook_rows = HookRows(self)
        self.worker_rows = WorkerRows(self)

    def transaction(self):
        return _Transaction(self.db)

    def close(self):
        self.db.close()

    # --- settings ------------------------------------------------------------

    def setting(self, key, default=None):
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                        (key, json.dumps(value)))

    def drop_setting(self, key):
        self.db.execute("DELETE FROM settings WHERE key = ?", (key,))

    # --- environments --------------------------------------------------------

    def intern_environment(self, variables):
        """The id of this exact environment, stored once however many jobs use it."""
        import hashlib
        text = json.dumps(variables, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        row = self.db.execute("SELECT id FROM environments WHERE digest = ?", (digest,)).fetchone()
        if row:
            return row[0]
        return self.db.execute("INSERT INTO environments (digest, variables) VALUES (?, ?)",
                               (digest, text)).lastrowid

    def environment(self, environment_id):
        row = self.db.execute("SELECT variables FROM environments WHERE id = ?",
                              (environment_id,)).fetchone()
        return json.loads(row[0])

    def environments(self, ids):
        ids = sorted(ids)
        rows = self.db.execute(f"SELECT id, variables FROM environments WHERE id IN "
                               f"({', '.join('?' * len(ids))})", ids).fetchall()
        return {row["id"]: json.loads(row["variables"]) for row in rows}

    def drop_unused_environments(self):
        self.db.execute("DELETE FROM environments WHERE id NOT IN "
                        "(SELECT DISTINCT environment_id FROM jobs UNION "
                        "SELECT environment_id FROM services UNION "
                        "SELECT environment_id FROM schedules)")

    # --- jobs: the one state change ------------------------------------------

    def change_jobs(self, job_ids, old, new, **columns):
        """The one way a job's state is written: move JOB_IDS, every one of them in
        state OLD (or in one of the states of a tuple OLD), to NEW.

        The move must be in JOB_TRANSITIONS; COLUMNS may only name the columns NEW
        owns (JOB_STATE_COLUMNS), which are set to them or to their defaults.  A
        job no longer in OLD (a lost race, a bug) makes it raise LostRace, and
        the caller's transaction roll back: never a silent half move.
        """
        olds = old if isinstance(old, tuple) else (old,)
        for state in olds:
            check_transition(JOB_TRANSITIONS, state, new)
        owned = JOB_STATE_COLUMNS[new]
        unknown = set(columns) - set(owned)
        if unknown:
            raise IllegalTransition(f"{new.value} does not own {', '.join(sorted(unknown))}")
        values = {}
        for name, default in owned.items():
            value = columns.get(name, default)
            if value is REQUIRED:
                raise IllegalTransition(f"a move to {new.value} needs {name}")
            if value is not UNCHANGED:
                values[name] = value
        if not job_ids:
            return
        values["state"], blocked = JOB_STATE_ROWS[new]
        if blocked is not None:
            values["blocked"] = blocked
        where, where_values = [], []
        for state in olds:
            state_value, blocked = JOB_STATE_ROWS[state]
            where.append("state = ?" if blocked is None else "(state = ? AND blocked = ?)")
            where_values += [state_value] if blocked is None else [state_value, blocked]
        assignments = ", ".join(f"{name} = ?" for name in values)
        cursor = self.db.executemany(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND ({' OR '.join(where)})",
            [(*values.values(), job_id, *where_values) for job_id in job_ids])
        if cursor.rowcount != len(job_ids):
            raise LostRace(f"{len(job_ids) - cursor.rowcount} of {len(job_ids)} job(s) "
                           f"were not {' or '.join(state.value for state in olds)}")

    def retry(self, job_id, not_before, reason):
        """A failed attempt with retries left: the job waits again (until NOT_BEFORE);
        returns the state it waits in."""
        state = waiting_state(not_before is not None and not_before > time.time())
        self.change_jobs([job_id], JobState.RUNNING, state, reason=reason,
                         not_before=not_before)
        return state

    def requeue(self, job_id, attempt):
        """An attempt whose script never started goes back to the queue, unnumbered."""
        self.change_jobs([job_id], JobState.RUNNING, JobState.WAITING, attempt=attempt - 1,
                         log=None)

    def skip(self, job_id, reason):
        """A waiting job that can no longer run ends as skipped (LostRace if it was not
        waiting: only waiting jobs have conditions to fail)."""
        self.change_jobs([job_id], (JobState.WAITING, JobState.BLOCKED), JobState.DONE,
                         result=JobResult.SKIPPED.value, reason=reason, ended_at=time.time())
        self.dependencies.drop([job_id])

    def release_due(self, now):
        """Unblock the blocked jobs whose start time has come and that wait on nothing
        else; return their ids."""
        # INDEXED BY (here and below): without statistics SQLite would read every
        # waiting job, on each add_job.
        job_ids = [row[0] for row in self.db.execute(
            "SELECT id FROM jobs INDEXED BY jobs_not_before WHERE state = 'waiting' AND "
            "blocked = 1 AND not_before <= ? AND NOT EXISTS (SELECT 1 FROM dependencies "
            "WHERE dependencies.job_id = jobs.id)", (now,))]
        self.change_jobs(job_ids, JobState.BLOCKED, JobState.WAITING)
        return job_ids

    def unblock(self, job_ids):
        """Let those of JOB_IDS that wait on nothing any more (nor on a time) be
        scheduled; return their ids."""
        if not job_ids:
            return []
        free = []
        for chunk in _chunks(job_ids):
            free += [row[0] for row in self.db.execute(
                f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * len(chunk))}) AND "
                f"state = 'waiting' AND blocked = 1 AND (not_before IS NULL OR not_before <= ?) "
                f"AND NOT EXISTS (SELECT 1 FROM dependencies WHERE job_id = jobs.id)",
                (*chunk, time.time()))]
        self.change_jobs(free, JobState.BLOCKED, JobState.WAITING)
        return free

    def next_release(self, now):
        """The earliest start time still to come among blocked jobs, or None."""
        return self.db.execute(
            "SELECT min(not_before) FROM jobs INDEXED BY jobs_not_before WHERE "
            "state = 'waiting' AND blocked = 1 AND not_before > ?", (now,)).fetchone()[0]

    # --- jobs: born, changed, gone -------------------------------------------

    def insert_job(self, script, args, cwd, environment_id, variables, umask, options,
                   job_id=None, submitted_at=None, service=None, replica=None, schedule=None,
                   scheduled_for=None):
        columns = ", ".join(JOB_OPTIONS)
        return self.db.execute(
            f"INSERT INTO jobs (id, state, blocked, script, args, cwd, environment_id, "
            f"variables, umask, submitted_at, service, replica, split, schedule, "
            f"scheduled_for, {columns}) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{', ?' * len(JOB_OPTIONS)})",
            (job_id, *JOB_STATE_ROWS[first_state(options)], script, json.dumps(args), cwd,
             environment_id, json.dumps(variables), umask, submitted_at or time.time(),
             service, replica, int(options.get("split", False)), schedule, scheduled_for,
             *(options[name] for name in JOB_OPTIONS))).lastrowid


    def insert_jobs(self, script, arg_lists, cwd, environment_id, variables, umask, options,
                    array=None, parent=None, nohup=False):
        """Queue one job per argument list, or the tasks of ARRAY (an ArrayRequest: one
        list for all, or one per task); return the (contiguous) first and last ids.
        The array's id is its first job's.  PARENT: the running job they were added
        from (see Families), if any."""
        now = time.time()
        variables_text = json.dumps(variables)
        option_values = tuple(options[name] for name in JOB_OPTIONS)
        state_columns = JOB_STATE_ROWS[first_state(options)]
        common = (script, cwd, environment_id, variables_text, umask, now, *option_values)
        split = int(options.get("split", False))
        common = (*common, split, parent, int(nohup))
        columns = (f"INSERT INTO jobs (state, blocked, args, script, cwd, environment_id, "
                   f"variables, umask, submitted_at, {', '.join(JOB_OPTIONS)}, split, parent, "
                   f"nohup")
        if array is None:
            self.db.executemany(
                f"{columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?{', ?' * len(JOB_OPTIONS)}, "
                f"?, ?, ?)",
                ((*state_columns, json.dumps(args), *common) for args in arg_lists))
            count = len(arg_lists)
        else:
            count = len(array.task_ids)
            first = self.db.execute("SELECT coalesce(max(seq), 0) + 1 FROM sqlite_sequence "
                                    "WHERE name = 'jobs'").fetchone()[0]
            import itertools
            shared = json.dumps(arg_lists[0]) if len(arg_lists) == 1 else None
            task_args = array.task_args or itertools.repeat(None)
            self.db.executemany(
                f"{columns}, array_id, task_id, task_arg, limited) VALUES "
                f"(?, ?, ?, ?, ?, ?, ?, ?, ?{', ?' * len(JOB_OPTIONS)}, ?, ?, ?, ?, ?, ?, ?)",
                ((*state_columns, shared or json.dumps(args), *common, first, task_id,
                  task_arg, int(array.max_running is not None))
                 for args, task_id, task_arg in zip(
                     itertools.repeat(None) if shared else arg_lists, array.task_ids,
                     task_args)))
            self.db.execute("INSERT INTO arrays (id, tasks, spec, max_running, created_at) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (first, count, array.spec, array.max_running, now))
        last = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()[0]
        if array is not None and last - count + 1 != first:
            raise LostRace(f"array {first}: its tasks got ids from {last - count + 1}")
        return last - count + 1, last

    def set_priority(self, job_ids, priority):
        self.db.executemany("UPDATE jobs SET priority = ? WHERE id = ? AND state = ?",
                            [(priority, job_id, JobState.WAITING.value) for job_id in job_ids])

    def request_kill(self, job_id, grace, reason):
        """Record a kill before it is sent, so that a restart can finish it."""
        self.db.execute(
            "UPDATE jobs SET kill_requested_at = coalesce(kill_requested_at, ?), "
            "kill_grace = ?, reason = ?, timed_out = 0 WHERE id = ? AND state = ?",
            (time.time(), grace, reason, job_id, JobState.RUNNING.value))

    def mark_timed_out(self, job_id):
        """The kill just requested is the job's --timeout's: the attempt ends timed_out."""
        self.db.execute("UPDATE jobs SET timed_out = 1 WHERE id = ? AND state = ?",
                        (job_id, JobState.RUNNING.value))

    def delete_waiting_jobs(self, job_ids):
        deleted = self.db.executemany("DELETE FROM jobs WHERE id = ? AND state = ?",
                                      [(job_id, JobState.WAITING.value)
                                       for job_id in job_ids]).rowcount
        if deleted != len(job_ids):
            raise LostRace(f"{len(job_ids) - deleted} of {len(job_ids)} job(s) were not waiting")
        self.arrays.drop_empty()

    def delete_all_waiting(self):
        self.db.execute("DELETE FROM jobs WHERE state = ?", (JobState.WAITING.value,))
        self.arrays.drop_empty()

    def purge_jobs(self, ended_before):
        """Delete finished jobs that ended before then; return their (id, log) pairs.
        A job whose hook has not run yet stays until it has (its cwd and
        environment are the hook's)."""
        # 'done' is spelled out so that SQLite can use the partial index jobs_by_end.
        ended = ("state = 'done' AND ended_at < ? AND NOT EXISTS (SELECT 1 FROM hook_runs "
                 "WHERE hook_runs.job_id = jobs.id AND hook_runs.state = 'pending')")
        rows = self.db.execute(f"SELECT id, log FROM jobs WHERE {ended}",
                               (ended_before,)).fetchall()
        self.db.execute(f"DELETE FROM jobs WHERE {ended}", (ended_before,))
        self.drop_unused_environments()
        self.arrays.drop_empty()
        return [(row["id"], row["log"]) for row in rows]

    # --- jobs: queries -------------------------------------------------------

    def job(self, job_id):
        return self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def jobs_in_state(self, state, limit=-1):
        """Jobs in STATE; waiting ones in the order they would start (the first LIMIT:
        from the indexes of ready and of blocked jobs, never sorting the queue)."""
        if state != JobState.WAITING:
            return self.db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY id LIMIT ?",
                                   (state.value, limit)).fetchall()
        if limit < 0:
            return self.db.execute("SELECT * FROM jobs WHERE state = 'waiting' "
                                   "ORDER BY blocked, priority DESC, id").fetchall()
        rows = self.ready_jobs(limit)
        for array_id, _, _ in self.arrays.limited():
            rows += self.arrays.ready_tasks(array_id, limit)
        if len(rows) < limit:
            rows += self.db.execute(
                "SELECT * FROM jobs INDEXED BY jobs_not_before WHERE state = 'waiting' AND "
                "blocked = 1 ORDER BY priority DESC, id LIMIT ?", (limit,)).fetchall()
        return sorted(rows, key=lambda row: (row["blocked"], -row["priority"], row["id"]))[:limit]

    def ready_jobs(self, limit, after=None):
        """Waiting jobs free to start, highest priority first, then oldest; the
        ones after AFTER, the (priority, id) of the last one seen, if given.  The
        tasks of arrays with a limit are not among them (see ArrayRows.ready_tasks)."""
        if after is None:
            # INDEXED BY: without statistics SQLite would rather sort every waiting job.
            return self.db.execute(
                "SELECT * FROM jobs INDEXED BY jobs_ready WHERE state = 'waiting' AND "
                "blocked = 0 AND limited = 0 ORDER BY priority DESC, id LIMIT ?",
                (limit,)).fetchall()
        priority, job_id = after
        return self.db.execute(
            "SELECT * FROM jobs INDEXED BY jobs_ready WHERE state = 'waiting' AND blocked = 0 "
            "AND limited = 0 AND (priority < ? OR (priority = ? AND id > ?)) "
            "ORDER BY priority DESC, id LIMIT ?", (priority, priority, job_id, limit)).fetchall()

    def counts(self):
        counts = {"waiting": 0, "running": 0}
        for row in self.db.execute("SELECT state, result, count(*) FROM jobs "
                                   "GROUP BY state, result"):
            key = row[1] if row[0] == JobState.DONE.value else row[0]
            counts[key] = counts.get(key, 0) + row[2]
        return counts

    def latest_ends(self, count, failed=False):
        """The COUNT jobs that ended last (that ended without success, if FAILED: looked
        for among the last LIVE_FAILURE_SCAN ends only, so that the cost stays flat)."""
        if not failed:
            return self.db.execute("SELECT * FROM jobs INDEXED BY jobs_by_end WHERE state = "
                                   "'done' ORDER BY ended_at DESC LIMIT ?", (count,)).fetchall()
        return self.db.execute(
            "SELECT * FROM jobs WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_by_end "
            "WHERE state = 'done' ORDER BY ended_at DESC LIMIT ?) AND result != 'succeeded' "
            "ORDER BY ended_at DESC LIMIT ?", (LIVE_FAILURE_SCAN, count)).fetchall()

    def find_jobs(self, state=None, result=None, worker=None, script=None, last=None,
                  array=None, schedule=None, offset=0):
        """Jobs matching every filter given, oldest first (the LAST most recent if given,
        after skipping the OFFSET most recent: a page of a long list)."""
        conditions, values = [], []
        for column, value in (("state", state), ("result", result), ("array_id", array),
                              ("schedule", schedule)):
            if value is not None:
                conditions.append(f"{column} = ?")
                values.append(value)
        if worker is not None:
            # Any part of a --split job counts, not only the first (in worker): its
            # entry in split_parts as json.dumps wrote it, '["w2", [' (names have no
            # quotes or backslashes that JSON would escape).
            conditions.append("(worker = ? OR instr(split_parts, ?) > 0)")
            values += [worker, json.dumps([worker, []])[:-2]]
        if script is not None:
            # An absolute path matches exactly; a bare name matches any script of that name.
            conditions.append("(script = ? OR substr(script, -length(?) - 1) = '/' || ?)")
            values += [script, script, script]
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        if last is None and not offset:
            return self.db.execute(f"SELECT * FROM jobs {where} ORDER BY id", values).fetchall()
        rows = self.db.execute(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                               (*values, -1 if last is None else last, offset)).fetchall()
        return rows[::-1]

    def jobs_by_id(self, job_ids, columns="id, state, result"):
        """COLUMNS of those of JOB_IDS that exist, 500 ids per query."""
        rows = []
        for first in range(0, len(job_ids), 500):
            chunk = job_ids[first:first + 500]
            rows += self.db.execute(f"SELECT {columns} FROM jobs WHERE id IN "
                                    f"({', '.join('?' * len(chunk))})", chunk).fetchall()
        return rows

    def not_succeeded(self, job_ids):
        """How those of JOB_IDS that ended without success ended."""
        return [row for row in self.jobs_by_id(job_ids, "id, result, exit_code, signal, reason")
                if row["result"] != JobResult.SUCCEEDED.value]

    def unfinished_jobs(self):
        """The jobs not done, but services' replicas (which never are)."""
        return self.db.execute("SELECT id, state FROM jobs WHERE state != ? AND service IS NULL",
                               (JobState.DONE.value,)).fetchall()

    def waiting_ids(self):
        return [row[0] for row in self.db.execute("SELECT id FROM jobs WHERE state = ?",
                                                  (JobState.WAITING.value,))]

    def ids_not_waiting(self):
        return {row[0] for row in self.db.execute("SELECT id FROM jobs WHERE state != ?",
                                                  (JobState.WAITING.value,))}

    def waiting_with_command(self, script, args):
        return [row[0] for row in self.db.execute(
            "SELECT id FROM jobs WHERE state = ? AND script = ? AND args = ? AND service IS NULL "
            "ORDER BY id", (JobState.WAITING.value, script, json.dumps(args)))]

    def pinned_waiting_jobs(self):
        """Waiting --on jobs (not replicas: a service waits for its workers to come)."""
        return self.db.execute("SELECT id, run_on, slots_wanted, split FROM jobs "
                               "WHERE state = ? AND run_on IS NOT NULL AND service IS NULL",
                               (JobState.WAITING.value,)).fetchall()

    # --- history: every ended attempt ----------------------------------------

    def record_attempt(self, row, result, outcome, reason, ended_at):
        """Keep how one attempt went, for the job's history (jobs ID)."""
        self.db.execute(
            "INSERT OR REPLACE INTO attempts (job_id, attempt, worker, slots, started_at, "
            "ended_at, result, exit_code, signal, reason, parts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row["id"], row["attempt"], row["worker"], json.dumps(attempt_slots(row)),
             row["started_at"], ended_at, result.value, outcome.get("exit_code"),
             outcome.get("signal"), reason, row["split_parts"]))

    def attempts(self, job_id):
        return self.db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt",
                               (job_id,)).fetchall()

    def failed_on(self, job_ids):
        """{job id: workers its earlier attempts failed on}, for the retried ones of JOB_IDS."""
        failed = {}
        for chunk in _chunks(job_ids):
            for job_id, worker in self.db.execute(
                    f"SELECT job_id, worker FROM attempts WHERE job_id IN "
                    f"({', '.join('?' * len(chunk))}) AND result != ?",
                    (*chunk, JobResult.SUCCEEDED.value)):
                failed.setdefault(job_id, set()).add(worker)
        return failed

    def unreached_attempts(self, job_id, after=0):
        """How many ended attempts of the job after the first AFTER ssh could not get
        through (exit 255)."""
        return self.db.execute("SELECT count(*) FROM attempts WHERE job_id = ? AND "
                               "attempt > ? AND exit_code = ?",
                               (job_id, after, SSH_EXIT_STATUS)).fetchone()[0]


class WorkerRows:
    """The workers table: registered, edited, moved between states, removed."""

    def __init__(self, store):
        self.store = store

    def all(self):
        return self.store.db.execute("SELECT * FROM workers ORDER BY position").fetchall()

    def insert(self, name, slots, variables, ssh_checked, state=WorkerState.ACTIVE,
                      ssh_reuse=True, endpoint=None, down_after=None, resources=None):
        """Register NAME in STATE, its first; ENDPOINT (see resolved_endpoint), if
        given, is where ssh goes for it; RESOURCES: see migration 13."""
        endpoint = endpoint or {}
        self.store.db.execute(
            "INSERT INTO workers (name, slots, variables, state, ssh_checked, ssh_reuse, "
            "added_at, ssh_host, ssh_port, ssh_user, down_after, resources) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, slots, json.dumps(variables), state.value, int(ssh_checked), int(ssh_reuse),
             time.time(), endpoint.get("host"), endpoint.get("port"), endpoint.get("user"),
             down_after, resources))

    def update(self, name, slots, variables, ssh_reuse, down_after, resources,
                      ssh_checked=None):
        """A worker's settings (its state moves only through change_state)."""
        self.store.db.execute("UPDATE workers SET slots = ?, variables = ?, ssh_reuse = ?, "
                        "down_after = ?, resources = ?, ssh_checked = coalesce(?, ssh_checked) "
                        "WHERE name = ?",
                        (slots, json.dumps(variables), int(ssh_reuse), down_after, resources,
                         None if ssh_checked is None else int(ssh_checked), name))

    def set_endpoint(self, name, endpoint):
        self.store.db.execute("UPDATE workers SET ssh_host = ?, ssh_port = ?, ssh_user = ? "
                        "WHERE name = ?",
                        (endpoint["host"], endpoint["port"], endpoint["user"], name))

    def change_state(self, name, old, new):
        """The one way a worker's state is written: a move WORKER_TRANSITIONS allows, on
        a worker that was OLD."""
        check_transition(WORKER_TRANSITIONS, old, new)
        changed = self.store.db.execute("UPDATE workers SET state = ? WHERE name = ? AND state = ?",
                                  (new.value, name, old.value)).rowcount
        if changed != 1:
            raise LostRace(f"worker {name} was not {old.value}")

    def change_health(self, name, old, new, reason, checked_at):
        """The one way a worker's health is written: a move the table allows (or a new
        reason for the same health), on a worker that was OLD."""
        if new != old:
            check_transition(HEALTH_TRANSITIONS, old, new)
        changed = self.store.db.execute(
            "UPDATE workers SET health = ?, check_reason = ?, checked_at = ? "
            "WHERE name = ? AND health = ?",
            (new.value, reason, checked_at, name, old.value)).rowcount
        if changed != 1:
            raise LostRace(f"worker {name} was not {old.value}")

    def delete(self, name):
        self.store.db.execute("DELETE FROM workers WHERE name = ?", (name,))


class Dependencies:
    """The --after graph: a row per condition not yet met (see migration 3), and
    one per condition settled, with how (see migration 5)."""

    def __init__(self, store):
        self.store = store
        self.db = store.db

    def add(self, first, last, conditions):
        """Jobs FIRST..LAST wait for CONDITIONS, (prerequisite, any_of) pairs."""
        if conditions:
            self.db.executemany(
                "INSERT INTO dependencies (job_id, prerequisite, any_of) VALUES (?, ?, ?)",
                ((job_id, prerequisite, int(any_of)) for job_id in range(first, last + 1)
                 for prerequisite, any_of in conditions))

    def add_settled(self, first, last, settled):
        """Jobs FIRST..LAST were queued with SETTLED conditions (see settled_at_once)."""
        if settled:
            self.db.executemany(
                "INSERT OR REPLACE INTO settled_dependencies (job_id, prerequisite, any_of, "
                "outcome) VALUES (?, ?, ?, ?)",
                ((job_id, prerequisite, int(any_of), outcome)
                 for job_id in range(first, last + 1)
                 for prerequisite, any_of, outcome in settled))

    def unmet(self, job_ids=None):
        """{job id: ([--after ids], [--after-any ids])} still unmet, for JOB_IDS (or all)."""
        rows = self.db.execute("SELECT job_id, prerequisite, any_of FROM dependencies "
                               "ORDER BY job_id, prerequisite").fetchall() \
            if job_ids is None else [
                row for chunk in _chunks(job_ids) for row in self.db.execute(
                    f"SELECT job_id, prerequisite, any_of FROM dependencies WHERE job_id IN "
                    f"({', '.join('?' * len(chunk))}) ORDER BY job_id, prerequisite", chunk)]
        found = {}
        for job_id, prerequisite, any_of in rows:
            found.setdefault(job_id, ([], []))[any_of].append(prerequisite)
        return found

    def resolve(self, ended):
        """Settle what waits on jobs that have just ended or gone, in the caller's
        transaction, so that no crash can leave a dependent waiting for ever.

        ENDED: (job id, succeeded, how it ended) triples.  A success meets the
        conditions on it (every --after-any condition of a dependent at once);
        anything else skips the --after dependents, and the --after-any ones
        whose last hope it was.  Skipped jobs count as ended-without-success
        for their own dependents, at once (transitively).  Returns the ids of
        the jobs skipped, and of those now free to start.
        """
        skipped, met = [], set()
        work = list(ended)
        while work:
            prerequisite, succeeded, how = work.pop()
            for job_id, any_of in self.db.execute(
                    "SELECT job_id, any_of FROM dependencies WHERE prerequisite = ?",
                    (prerequisite,)).fetchall():
                if succeeded:
                    self._settle("job_id = ? AND (prerequisite = ? OR any_of = 1 AND ? = 1)",
                                 (job_id, prerequisite, any_of), "met")
                    met.add(job_id)
                    continue
                self._settle("job_id = ? AND prerequisite = ?", (job_id, prerequisite), "failed")
                if any_of:
                    if self.db.execute("SELECT 1 FROM dependencies WHERE job_id = ? AND "
                                       "any_of = 1", (job_id,)).fetchone():
                        continue   # another of its --after-any jobs may still succeed
                    reason = (f"none of its --after-any jobs succeeded (the last, "
                              f"{prerequisite}, {how})")
                else:
                    reason = f"job {prerequisite}, which it runs --after, {how}"
                self.store.skip(job_id, reason)
                skipped.append(job_id)
                work.append((job_id, False, "was skipped"))
        return skipped, self.store.unblock(met - set(skipped))

    def drop(self, job_ids):
        """Jobs that will never run stop waiting for anything."""
        for job_id in job_ids:
            self._settle("job_id = ?", (job_id,), "dropped")

    def _settle(self, where, values, outcome):
        """Conditions (WHERE, on the dependencies table) no longer waited on, kept
        with OUTCOME for retry."""
        self.db.execute(f"INSERT OR REPLACE INTO settled_dependencies (job_id, prerequisite, "
                        f"any_of, outcome) SELECT job_id, prerequisite, any_of, ? FROM "
                        f"dependencies WHERE {where}", (outcome, *values))
        self.db.execute(f"DELETE FROM dependencies WHERE {where}", values)

    def skipped_by(self, prerequisites):
        """The skipped jobs whose --after (or last --after-any) condition on one of
        PREREQUISITES failed."""
        found = set()
        for chunk in _chunks(sorted(prerequisites)):
            found.update(row[0] for row in self.db.execute(
                f"SELECT DISTINCT s.job_id FROM settled_dependencies s JOIN jobs j ON "
                f"j.id = s.job_id WHERE s.outcome = 'failed' AND j.result = 'skipped' AND "
                f"s.prerequisite IN ({', '.join('?' * len(chunk))})", chunk))
        return found

    def settled_unmet(self, job_id):
        """[(prerequisite, any_of, how it ended: a result, 'removed', or None while it
        has not)] for the conditions of a job that were settled without being met.
        Its --after-any ones count only if none of them was met."""
        return [tuple(row) for row in self.db.execute(
            "SELECT s.prerequisite, s.any_of, CASE WHEN j.id IS NULL THEN 'removed' "
            "WHEN j.state = 'done' THEN j.result END FROM settled_dependencies s "
            "LEFT JOIN jobs j ON j.id = s.prerequisite WHERE s.job_id = ? AND "
            "s.outcome != 'met' AND NOT (s.any_of = 1 AND EXISTS (SELECT 1 FROM "
            "settled_dependencies m WHERE m.job_id = s.job_id AND m.any_of = 1 AND "
            "m.outcome = 'met')) ORDER BY s.prerequisite", (job_id,))]

    def reopen(self, job_id):
        """A retried job waits again for the conditions it never had met (see
        settled_unmet); returns how many."""
        conditions = self.settled_unmet(job_id)
        self.db.executemany(
            "INSERT INTO dependencies (job_id, prerequisite, any_of) VALUES (?, ?, ?)",
            [(job_id, prerequisite, any_of) for prerequisite, any_of, _ in conditions])
        self.db.executemany(
            "DELETE FROM settled_dependencies WHERE job_id = ? AND prerequisite = ?",
            [(job_id, prerequisite) for prerequisite, _, _ in conditions])
        return len(conditions)

    def reopen_failed_on(self, prerequisites):
        """Waiting jobs whose --after-any condition on one of PREREQUISITES (retried)
        failed wait for it again."""
        for prerequisite in prerequisites:
            where = ("prerequisite = ? AND outcome = 'failed' AND job_id IN "
                     "(SELECT id FROM jobs WHERE state = 'waiting')")
            self.db.execute("INSERT INTO dependencies (job_id, prerequisite, any_of) SELECT "
                            f"job_id, prerequisite, any_of FROM settled_dependencies WHERE {where}",
                            (prerequisite,))
            self.db.execute(f"DELETE FROM settled_dependencies WHERE {where}", (prerequisite,))

    def stale(self):
        """Prerequisites that ended (or went) without their dependents hearing of it."""
        return [(row[0], row[1] == JobResult.SUCCEEDED.value,
                 f"ended {row[1]}" if row[1] else "was removed")
                for row in self.db.execute(
                    "SELECT DISTINCT d.prerequisite, j.result FROM dependencies d LEFT JOIN jobs j "
                    "ON j.id = d.prerequisite WHERE j.id IS NULL OR j.state = 'done'")]


class ArrayRows:
    """The Store's statements about arrays (store.arrays): their rows, and their
    tasks as the scheduler, the names in commands and status need them.  The
    tasks of an array took consecutive job ids from the array's own."""

    def __init__(self, store):
        self.db = store.db

    def restore(self, job_id, task):
        """load_status: job JOB_ID is again a task of its array, which comes back too
        (see _status_task)."""
        self.db.execute("INSERT OR IGNORE INTO arrays (id, tasks, spec, max_running, "
                        "created_at) VALUES (?, ?, ?, ?, ?)",
                        (task["array"], len(parse_array_spec(task["spec"])[0])
                         if task["spec"] else task["task"], task["spec"], task["max_running"],
                         time.time()))
        self.db.execute("UPDATE arrays SET tasks = max(tasks, ?) WHERE id = ? AND spec IS NULL",
                        (task["task"], task["array"]))
        self.db.execute("UPDATE jobs SET array_id = ?, task_id = ?, task_arg = ?, limited = "
                        "(SELECT max_running IS NOT NULL FROM arrays WHERE id = ?) WHERE id = ?",
                        (task["array"], task["task"], task["task_arg"], task["array"], job_id))

    def among(self, ids):
        """{id: row} of the arrays whose ids are among IDS."""
        arrays = {}
        for chunk in _chunks(ids):
            for row in self.db.execute(f"SELECT * FROM arrays WHERE id IN "
                                       f"({', '.join('?' * len(chunk))})", chunk):
                arrays[row["id"]] = row
        return arrays

    def job_ids(self, array):
        """The ids of the tasks of ARRAY (a row) still here, in order."""
        # Its tasks took consecutive ids from its own: the primary key finds them.
        return [row[0] for row in self.db.execute(
            "SELECT id FROM jobs WHERE id BETWEEN ? AND ? AND array_id = ?",
            (array["id"], array["id"] + array["tasks"] - 1, array["id"]))]

    def counts(self, array_ids):
        """{array id: {state or result: tasks}} (waiting counts blocked tasks too)."""
        counts = {array_id: {} for array_id in array_ids}
        for array_id in array_ids:
            for state, result, number in self.db.execute(
                    "SELECT state, result, count(*) FROM jobs WHERE array_id = ? "
                    "GROUP BY state, result", (array_id,)):
                key = result or state
                counts[array_id][key] = counts[array_id].get(key, 0) + number
        return counts

    def live(self):
        """The arrays some of whose tasks are still waiting or running, oldest first."""
        return self.db.execute(
            "SELECT * FROM arrays a WHERE EXISTS (SELECT 1 FROM jobs WHERE array_id = a.id "
            "AND state IN ('waiting', 'running')) ORDER BY id").fetchall()

    def limited(self):
        """[(array id, %K, tasks running)] of the arrays with a limit that have tasks
        ready to start."""
        return self.db.execute(
            "SELECT a.id, a.max_running, (SELECT count(*) FROM jobs WHERE array_id = a.id "
            "AND state = 'running') FROM arrays a WHERE a.max_running IS NOT NULL AND "
            "EXISTS (SELECT 1 FROM jobs WHERE array_id = a.id AND state = 'waiting' AND "
            "blocked = 0 AND limited = 1)").fetchall()

    def ready_tasks(self, array_id, limit):
        """Tasks of limited array ARRAY_ID free to start, in the order they would."""
        return self.db.execute(
            "SELECT * FROM jobs INDEXED BY jobs_ready_limited WHERE array_id = ? AND "
            "state = 'waiting' AND blocked = 0 AND limited = 1 ORDER BY priority DESC, id "
            "LIMIT ?", (array_id, limit)).fetchall()

    def drop_empty(self):
        """Arrays none of whose tasks is left (removed, purged) go too."""
        self.db.execute("DELETE FROM arrays WHERE NOT EXISTS "
                        "(SELECT 1 FROM jobs WHERE array_id = arrays.id)")


class ServiceRows:
    """The services' rows (see migration 6): their templates, and what the restart
    policy remembers of each replica."""

    def __init__(self, store):
        self.store = store
        self.db = store.db

    def all(self):
        return self.db.execute("SELECT * FROM services ORDER BY name").fetchall()

    def get(self, name):
        return self.db.execute("SELECT * FROM services WHERE name = ?", (name,)).fetchone()

    def insert(self, name, script, args, cwd, environment_id, variables, umask,
                       options, replicas, port, health):
        self.db.execute(
            "INSERT INTO services (name, script, args, cwd, environment_id, variables, umask, "
            "options, replicas, port, health, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?)", (name, script, json.dumps(args), cwd, environment_id, json.dumps(variables),
                      umask, json.dumps(options), replicas, port,
                      None if health is None else json.dumps(health), time.time()))

    def set(self, name, **columns):
        """REPLICAS or ENABLED of a service."""
        unknown = set(columns) - {"replicas", "enabled"}
        if unknown:
            raise ValueError(f"not a service setting: {', '.join(sorted(unknown))}")
        self.db.execute(f"UPDATE services SET {', '.join(f'{name} = ?' for name in columns)} "
                        f"WHERE name = ?", (*columns.values(), name))

    def delete(self, name):
        self.db.execute("DELETE FROM services WHERE name = ?", (name,))

    def live_replicas(self, name):
        """{replica number: its job's row} for the jobs of service NAME not done."""
        return {row["replica"]: row for row in self.db.execute(
            "SELECT * FROM jobs WHERE service = ? AND state != 'done'", (name,))}

    def with_live_jobs(self):
        """Names of services (even removed ones) that have jobs not done."""
        return {row[0] for row in self.db.execute(
            "SELECT DISTINCT service FROM jobs WHERE service IS NOT NULL AND state != 'done'")}

    def running_on(self, worker):
        """The replicas running on WORKER that nothing is ending yet."""
        return self.db.execute("SELECT id, run_on, exclude FROM jobs WHERE state = 'running' "
                               "AND worker = ? AND service IS NOT NULL AND kill_requested_at "
                               "IS NULL", (worker,)).fetchall()

    def last_end(self, name):
        """How the latest job of service NAME to end ended (a row, or None)."""
        return self.db.execute(
            "SELECT result, exit_code, signal, ended_at FROM jobs WHERE service = ? AND "
            "state = 'done' ORDER BY ended_at DESC LIMIT 1", (name,)).fetchone()

    def replica_records(self, name):
        """{replica number: its row of the replicas table}."""
        return {row["replica"]: row for row in self.db.execute(
            "SELECT * FROM replicas WHERE service = ?", (name,))}

    def insert_replica(self, service, replica, not_before=None):
        """Queue the next job of replica REPLICA of SERVICE (its row): the service's
        script and options, SERVICE, REPLICA and PORT, before any batch job."""
        # (JOB_OPTIONS first: a service stored before an option existed has none of it.)
        options = {**JOB_OPTIONS, **json.loads(service["options"]),
                   "priority": SERVICE_PRIORITY, "retries": 0, "retry_delay": 0.0,
                   "timeout": None, "not_before": not_before}
        variables = dict(json.loads(service["variables"]), SERVICE=service["name"],
                         REPLICA=str(replica))
        if service["port"] is not None:
            variables["PORT"] = str(service["port"] + replica)
        self.db.execute("INSERT OR IGNORE INTO replicas (service, replica) VALUES (?, ?)",
                        (service["name"], replica))
        return self.store.insert_job(service["script"], json.loads(service["args"]), service["cwd"],
                               service["environment_id"], variables, service["umask"], options,
                               service=service["name"], replica=replica)

    def replica_ended(self, name, replica, how, delay):
        """Replica REPLICA of NAME ended HOW and starts again after DELAY seconds."""
        self.db.execute("UPDATE replicas SET restarts = restarts + 1, delay = ?, last_end = ? "
                        "WHERE service = ? AND replica = ?", (delay, how, name, replica))


class FamilyRows:
    """Parents and children (see migration 9 and Families): who descends from whom,
    and the children whose parent has ended while they have not."""

    def __init__(self, store):
        self.db = store.db

    # A child that runs --after (or --after-any) its own parent is meant to run once
    # the parent has ended: the parent's end does not end it (its condition settles
    # it as any job's does), and the parent cannot wait for it.
    _NOT_AFTER_PARENT = (
        "NOT EXISTS (SELECT 1 FROM dependencies d WHERE d.job_id = c.id AND "
        "d.prerequisite = c.parent) AND NOT EXISTS (SELECT 1 FROM settled_dependencies s "
        "WHERE s.job_id = c.id AND s.prerequisite = c.parent)")

    def children_to_wait_for(self, job_id):
        """The children of JOB_ID, but those that run --after it (see above)."""
        return self.db.execute(f"SELECT c.id, c.state FROM jobs c WHERE c.parent = ? AND "
                               f"{self._NOT_AFTER_PARENT} ORDER BY c.id", (job_id,)).fetchall()

    def children_of(self, job_ids):
        """{parent id: [child ids]} for those of JOB_IDS that have children."""
        found = {}
        for chunk in _chunks(job_ids):
            for row in self.db.execute(
                    f"SELECT parent, id FROM jobs WHERE parent IN "
                    f"({', '.join('?' * len(chunk))}) ORDER BY id", chunk):
                found.setdefault(row[0], []).append(row[1])
        return found

    def descendants(self, job_ids):
        """The ids of the children of JOB_IDS, theirs, and so on (nohup ones too)."""
        found = set()
        for chunk in _chunks(job_ids):
            found.update(row[0] for row in self.db.execute(
                f"WITH RECURSIVE family(id) AS (SELECT id FROM jobs WHERE parent IN "
                f"({', '.join('?' * len(chunk))}) UNION SELECT jobs.id FROM jobs JOIN family "
                f"ON jobs.parent = family.id) SELECT id FROM family", chunk))
        return sorted(found)

    def root(self, job_id):
        """The eldest ancestor of JOB_ID (JOB_ID itself if it has no parent)."""
        return self.db.execute(
            "WITH RECURSIVE line(id, parent) AS (SELECT id, parent FROM jobs WHERE id = ? "
            "UNION SELECT jobs.id, jobs.parent FROM jobs JOIN line ON jobs.id = line.parent) "
            "SELECT id FROM line WHERE parent IS NULL OR parent NOT IN (SELECT id FROM jobs)",
            (job_id,)).fetchone()[0]

    def members(self):
        """Every job that has a parent or a child."""
        return self.db.execute(
            "SELECT * FROM jobs WHERE parent IS NOT NULL OR id IN "
            "(SELECT parent FROM jobs WHERE parent IS NOT NULL) ORDER BY id").fetchall()

    def let_outlive_parents(self, job_ids):
        """Those of JOB_IDS whose parent has ended (or gone) become --nohup children."""
        for chunk in _chunks(job_ids):
            self.db.execute(
                f"UPDATE jobs SET nohup = 1 WHERE id IN ({', '.join('?' * len(chunk))}) AND "
                f"parent IS NOT NULL AND nohup = 0 AND NOT EXISTS (SELECT 1 FROM jobs p WHERE "
                f"p.id = jobs.parent AND p.state != 'done')", chunk)

    def orphans(self, parents=None):
        """The children, not --nohup nor --after their parent, still waiting or running
        (and not being killed already) whose parent has ended, or is gone; only those
        of PARENTS if given."""
        query = ("SELECT c.id, c.state, c.parent FROM jobs c LEFT JOIN jobs p ON "
                 "p.id = c.parent WHERE c.parent IS NOT NULL AND c.nohup = 0 AND "
                 "c.state != 'done' AND c.kill_requested_at IS NULL AND "
                 f"(p.id IS NULL OR p.state = 'done') AND {self._NOT_AFTER_PARENT}")
        if parents is None:
            return self.db.execute(query).fetchall()
        rows = []
        for chunk in _chunks(parents):
            rows += self.db.execute(f"{query} AND c.parent IN ({', '.join('?' * len(chunk))})",
                                    chunk).fetchall()
        return rows


class ScheduleRows:
    """The schedules' rows (see migration 11) and what they ask of their jobs."""

    COUNTERS = ("runs", "skipped")

    def __init__(self, store):
        self.db = store.db

    def all(self):
        return self.db.execute("SELECT * FROM schedules ORDER BY name").fetchall()

    def get(self, name):
        return self.db.execute("SELECT * FROM schedules WHERE name = ?", (name,)).fetchone()

    def insert(self, name, rule, script, args, cwd, environment_id, variables, umask, options,
               overlap, skip_missed, next_due, enabled=True, runs=0, skipped=0, last_job=None,
               followed=None):
        self.db.execute(
            "INSERT INTO schedules (name, rule, script, args, cwd, environment_id, variables, "
            "umask, options, overlap, skip_missed, enabled, next_due, runs, skipped, last_job, "
            "followed_job, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?)",
            (name, json.dumps(rule), script, json.dumps(args), cwd, environment_id,
             json.dumps(variables), umask, json.dumps(options), int(overlap), int(skip_missed),
             int(enabled), next_due, runs, skipped, last_job, followed, time.time()))

    def delete(self, name):
        self.db.execute("DELETE FROM schedules WHERE name = ?", (name,))

    def delete_all(self):
        self.db.execute("DELETE FROM schedules")

    def moved_on(self, name, expected_due, next_due, outcome, job_id=None, followed=None):
        """The one write of a firing (OUTCOME: fire, skip or miss) or a run_schedule
        (EXPECTED_DUE: None): the next due time, the counters, the run's job.  Raises
        LostRace if the schedule changed since it was read, so that a due time that
        was handled is never handled twice."""
        changed = self.db.execute(
            "UPDATE schedules SET next_due = ?, runs = runs + ?, skipped = skipped + ?, "
            "last_job = coalesce(?, last_job), followed_job = coalesce(?, followed_job) "
            "WHERE name = ? AND (? IS NULL OR next_due = ?)",
            (next_due, int(outcome == "fire"), int(outcome == "skip"), job_id, followed, name,
             expected_due, expected_due)).rowcount
        if not changed:
            raise LostRace(f"schedule {name}: changed while it fired")

    def set_enabled(self, name, enabled, next_due, followed=None):
        self.db.execute("UPDATE schedules SET enabled = ?, next_due = ?, "
                        "followed_job = coalesce(?, followed_job) WHERE name = ?",
                        (int(enabled), next_due, followed, name))

    def due(self, now):
        """The enabled schedules whose time has come, the earliest first."""
        return self.db.execute("SELECT * FROM schedules WHERE enabled = 1 AND next_due <= ? "
                               "ORDER BY next_due", (now,)).fetchall()

    def next_due(self):
        """The earliest due time of an enabled schedule, or None."""
        return self.db.execute("SELECT min(next_due) FROM schedules WHERE enabled = 1"
                               ).fetchone()[0]

    def followers(self, names=None):
        """The schedules that follow another's runs (of NAMES, if given)."""
        rows = self.db.execute("SELECT * FROM schedules WHERE next_due IS NULL").fetchall()
        return [row for row in rows if json.loads(row["rule"]).get("after") is not None and
                (names is None or json.loads(row["rule"])["after"] in names)]

    def latest_success(self, name, after_job):
        """The newest run of schedule NAME that succeeded, if newer than AFTER_JOB."""
        return self.db.execute(
            "SELECT id, ended_at FROM jobs WHERE schedule = ? AND id > ? AND state = 'done' "
            "AND result = 'succeeded' ORDER BY id DESC LIMIT 1",
            (name, after_job or 0)).fetchone()

    def succeeded_among(self, job_ids, names):
        """Whether any of JOB_IDS is a run of a schedule in NAMES that succeeded."""
        return any(self.db.execute(
            f"SELECT 1 FROM jobs WHERE id IN ({', '.join('?' * len(chunk))}) AND schedule IN "
            f"({', '.join('?' * len(names))}) AND result = 'succeeded' LIMIT 1",
            (*chunk, *names)).fetchone() for chunk in _chunks(list(job_ids)))

    def job_states(self, job_ids):
        """{job id: (state, result)} of the latest runs JOB_IDS."""
        ids = [job_id for job_id in job_ids if job_id is not None]
        return {row["id"]: (row["state"], row["result"]) for chunk in _chunks(ids)
                for row in self.db.execute(
                    f"SELECT id, state, result FROM jobs WHERE id IN "
                    f"({', '.join('?' * len(chunk))})", chunk)}


class HookRows:
    """The hook runs (see migration 12): one per hook to run for one end of a job,
    made by a trigger as the job moves to done; pending until its hook has run."""

    def __init__(self, store):
        self.db = store.db

    def pending(self, limit, running):
        """The first LIMIT pending runs, oldest first, but those RUNNING (ids)."""
        running = sorted(running)
        return self.db.execute(
            f"SELECT * FROM hook_runs WHERE state = 'pending' AND id NOT IN "
            f"({', '.join('?' * len(running))}) ORDER BY id LIMIT ?",
            (*running, limit)).fetchall()

    def pending_count(self):
        return self.db.execute("SELECT count(*) FROM hook_runs WHERE state = 'pending'"
                               ).fetchone()[0]

    def started(self, run_id, now):
        self.db.execute("UPDATE hook_runs SET starts = starts + 1, started_at = ? "
                        "WHERE id = ? AND state = 'pending'", (now, run_id))

    def ended(self, run_id, outcome, ended_at):
        """The hook of run RUN_ID has ended: OUTCOME has its exit_code, signal,
        timed_out, error and duration."""
        self.db.execute(
            "UPDATE hook_runs SET state = 'done', ended_at = ?, duration = ?, exit_code = ?, "
            "signal = ?, timed_out = ?, error = ? WHERE id = ? AND state = 'pending'",
            (ended_at, outcome["duration"], outcome["exit_code"], outcome["signal"],
             int(outcome["timed_out"]), outcome["error"], run_id))

    def of_jobs(self, job_ids):
        """{job id: its hook runs, oldest first} for those of JOB_IDS that have any."""
        found = {}
        if not job_ids or not self.db.execute("SELECT 1 FROM hook_runs LIMIT 1").fetchone():
            return found   # (the usual case: no hooks at all, and no query per job)
        if len(job_ids) <= 500:
            rows = self.db.execute(f"SELECT * FROM hook_runs WHERE job_id IN "
                                   f"({', '.join('?' * len(job_ids))}) ORDER BY id", job_ids)
        else:   # (status of a long queue: one pass, not a query per 500 jobs)
            rows = self.db.execute("SELECT * FROM hook_runs WHERE job_id BETWEEN ? AND ? "
                                   "ORDER BY id", (min(job_ids), max(job_ids)))
        wanted = set(job_ids)
        for row in rows:
            if row["job_id"] in wanted:
                found.setdefault(row["job_id"], []).append(row)
        return found


def first_state(options):
    """BLOCKED if a new job with OPTIONS may not start yet: it waits for other jobs
    (the caller says so), or its start time is to come; else WAITING."""
    return waiting_state(bool(options.get("blocked")) or
                         options["not_before"] is not None and
                         options["not_before"] > time.time())


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, error, trace):
        if kind is None:
            try:
                self.db.execute("COMMIT")
                return False
            except Exception:
                self.rollback()
                raise
        self.rollback()
        return False

    def rollback(self):
        # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR);
        # a second ROLLBACK would fail and hide the error that matters.  Others
        # (a failed COMMIT when busy) leave the transaction open.
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")


def _chunks(items, size=500):
    """ITEMS in lists short enough for one SQL statement's parameters."""
    items = list(items)
    return [items[start:start + size] for start in range(0, len(items), size)]


def job_to_json(row, log_dir):
    """The public form of a job: status --json, load_status and later `jobs`."""
    return {
        "id": row["id"],
        "state": row["state"],
        "result": row["result"],
        "script": row["script"],
        "args": json.loads(row["args"]),
        "cwd": row["cwd"],
        "envs": json.loads(row["variables"]),
        "environment": row["environment_id"],
        "umask": row["umask"],
        "worker": row["worker"],
        "slot": row["slot"],
        "attempt": row["attempt"],
        "exit_code": row["exit_code"],
        "signal": row["signal"],
        "reason": row["reason"],
        "submitted_at": iso_time(row["submitted_at"]),
        "started_at": iso_time(row["started_at"]),
        "ended_at": iso_time(row["ended_at"]),
        "log": row["log"] or job_log_path(log_dir, row["id"]),
        "ssh_reuse": bool(row["ssh_reuse"]),
        "priority": row["priority"],
        "retries": row["retries"],
        "retry_delay": row["retry_delay"],
        "timeout": row["timeout"],
        "not_before": iso_time(row["not_before"]),
        "slots_wanted": row["slots_wanted"],
        "slots": json.loads(row["slots"]) if row["slots"] else
        (None if row["slot"] is None else [row["slot"]]),
        "on": json.loads(row["run_on"] or "null"),
        "prefer": json.loads(row["prefer"] or "null"),
        "exclude": json.loads(row["exclude"] or "null"),
        "service": row["service"],
        "replica": row["replica"],
        "array": row["array_id"],
        "task": row["task_id"],
        "task_arg": row["task_arg"],
        "split": bool(row["split"]),
        "parts": split_parts(row),
        "parent": row["parent"],
        "nohup": bool(row["nohup"]),
        "schedule": row["schedule"],
        "scheduled_for": iso_time(row["scheduled_for"]),
        "on_end": json.loads(row["on_end"] or "null"),
        "resources": need_json(row["resources"]),
        "estimate": row["estimate"],
        "grant": {worker: grant_json(grant) for worker, grant in
                  previous_grants(row).items()} or None,
    }


LIVE_JOB_FIELDS = ("id", "state", "result", "exit_code", "signal", "reason", "worker", "slot",
                   "slots", "attempt", "priority", "submitted_at", "started_at", "ended_at",
                   "script", "args", "cwd", "log", "service", "replica", "array", "task", "parts",
                   "schedule", "waiting_for")


def live_job(job):
    """A job as the live views list it: where it is and what it runs (not its
    environment)."""
    return {key: job[key] for key in LIVE_JOB_FIELDS if key in job}


def job_workers(job):
    """The workers a job (its JSON form) runs or ran on: those of its parts, if split."""
    return [worker for worker, _ in job["parts"]] if job.get("parts") else [job["worker"]]


def previous_grants(row):
    """{worker: grant} of what a job's latest attempt holds or held (see migration 13)."""
    return json.loads(row["resource_grant"]) if row["resource_grant"] else {}


def split_parts(row):
    """The parts of a --split job's latest attempt, [[worker, [slots]], ...]; None for
    other jobs, and for one that has not run."""
    return json.loads(row["split_parts"]) if row["split_parts"] else None


def attempt_slots(row):
    """The slots a running job (or one attempt of it) holds."""
    return json.loads(row["slots"]) if row["slots"] else [row["slot"]]


def hook_run_to_json(row, running):
    """One hook run of a job (RUNNING: its hook runs now), for jobs and status."""
    return {"program": json.loads(row["argv"]), "from": row["origin"],
            "state": "running" if running else row["state"], "starts": row["starts"],
            "exit_code": row["exit_code"], "signal": row["signal"],
            "timed_out": bool(row["timed_out"]), "error": row["error"],
            "duration": row["duration"], "started_at": iso_time(row["started_at"]),
            "ended_at": iso_time(row["ended_at"])}


def attempt_to_json(row):
    """One ended attempt of a job, from its history."""
    return {"attempt": row["attempt"], "worker": row["worker"],
            "slots": json.loads(row["slots"] or "null"),
            "parts": json.loads(row["parts"] or "null"), "result": row["result"],
            "exit_code": row["exit_code"], "signal": row["signal"], "reason": row["reason"],
            "started_at": iso_time(row["started_at"]), "ended_at": iso_time(row["ended_at"])}


def iso_time(timestamp):
    if timestamp is None:
        return None
    from datetime import datetime, timezone
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")



def parse_iso_time(text):
    """Seconds since the epoch from an ISO 8601 time (None stays None).

    A time that iso_time cannot write back (before year 1 or after 9999 in UTC)
    is a ValueError too: stored, it would break every status and jobs.
    """
    if text is None:
        return None
    from datetime import datetime
    timestamp = datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    iso_time(timestamp)
    return timestamp


def end_text(result, exit_code, signal_number):
    """How a job ended, in a few words: 'exit 3', 'signal 9', or its result."""
    if exit_code is not None:
        return f"exit {exit_code}"
    if signal_number is not None:
        return f"signal {signal_number}"
    return result


def _duration_text(seconds):
    """30m, 2h, 1d12h: the way durations are written on the command line."""
    seconds = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts)


###############################################################################
# Scheduling policy (pure functions, no I/O) ###################################
###############################################################################

GPU_UNITS = 1000   # a GPU in thousandths: --gpus 0.5 is 500, and sums stay exact


class ResourceNeed:
    """What a job asks for beyond slots: GPUS in thousandths (a share of one device
    below GPU_UNITS, else whole devices), MEM bytes, NAMED {name: count}."""

    def __init__(self, gpus=0, mem=0, named=None):
        self.gpus = gpus
        self.mem = mem
        self.named = dict(named or {})

    def __bool__(self):
        return bool(self.gpus or self.mem or any(self.named.values()))

    @classmethod
    def of(cls, column):
        """The need a job's resources column (JSON, see migration 13) holds, or None."""
        if not column:
            return None
        need = json.loads(column)
        return cls(need.get("gpus", 0), need.get("mem", 0), need.get("named"))

    @classmethod
    def shown(cls, shown):
        """The need of a job's resources in their public form (need_json), or None."""
        if not shown:
            return None
        named = {name: count for name, count in shown.items() if name not in ("gpus", "mem")}
        return cls(round(shown.get("gpus", 0) * GPU_UNITS), shown.get("mem", 0), named)

    def kinds(self):
        """The resources it asks for by kind: gpus, mem and the names."""
        return {kind for kind, amount in (("gpus", self.gpus), ("mem", self.mem),
                                          *self.named.items()) if amount}

    def times(self, count):
        """COUNT times this need: what COUNT slots of a --split job take (per slot)."""
        return ResourceNeed(self.gpus * count, self.mem * count,
                            {name: amount * count for name, amount in self.named.items()})


class Resources:
    """What one worker has beyond slots, and how much of it is free: GPUs by device
    id (each GPU_UNITS, shared by jobs that take less), memory in bytes, named
    countable resources.  HELD: the grants of the jobs running there."""

    def __init__(self, gpus=(), mem=0, named=None, held=()):
        self.devices = list(gpus)                         # in the order declared
        self.gpu_free = {device: GPU_UNITS for device in self.devices}
        self.mem_total = self.mem_free = mem
        self.named_total = dict(named or {})
        self.named_free = dict(self.named_total)
        for grant in held:
            self.hold(grant)

    def copy(self):
        twin = Resources()
        twin.devices, twin.gpu_free = self.devices, dict(self.gpu_free)
        twin.mem_total, twin.mem_free = self.mem_total, self.mem_free
        twin.named_total, twin.named_free = self.named_total, dict(self.named_free)
        return twin

    def hold(self, grant):
        """Count GRANT (see take) as in use.  A device or resource the worker no longer
        has (edited down) is in use all the same: its free amount goes below 0, so
        nothing more is granted until the holders end."""
        for device in grant.get("gpus", ()):
            self.gpu_free[device] = self.gpu_free.get(device, 0) - grant["gpu_share"]
        self.mem_free -= grant.get("mem", 0)
        for name, count in grant.get("named", {}).items():
            self.named_free[name] = self.named_free.get(name, 0) - count

    def release(self, grant):
        """GRANT is no longer in use (for reckoning when a reserved job could start)."""
        self.hold({"gpus": grant.get("gpus", ()), "gpu_share": -grant.get("gpu_share", 0),
                   "mem": -grant.get("mem", 0),
                   "named": {name: -count for name, count in grant.get("named", {}).items()}})

    def could_fit(self, need):
        """Whether NEED fits here once everything running has ended."""
        return (need.gpus <= GPU_UNITS * len(self.devices) if need.gpus >= GPU_UNITS else
                not need.gpus or bool(self.devices)) and need.mem <= self.mem_total and \
            all(count <= self.named_total.get(name, 0) for name, count in need.named.items())

    def free_gpus(self):
        """How much GPU is free here, in thousandths (what placement compares)."""
        return sum(max(0, free) for free in self.gpu_free.values())

    def choose_gpus(self, amount, prefer=()):
        """The devices a job taking AMOUNT thousandths of GPUs gets now, or None.
        PREFER, the devices it held in its previous attempt here: those again if
        they have room (a retry keeps its GPUs).  Else a share goes to the device
        with the least room that still holds it (whole devices stay free for jobs
        that need them); whole GPUs are the free devices first declared."""
        if not amount:
            return []
        share = min(amount, GPU_UNITS)
        if prefer and len(prefer) * share == max(amount, share) and \
                all(self.gpu_free.get(device, 0) >= share for device in prefer):
            return list(prefer)
        if amount < GPU_UNITS:
            room = [(free, position, device) for position, (device, free)
                    in enumerate(self.gpu_free.items()) if free >= amount]
            return [min(room)[2]] if room else None
        whole = [device for device in self.devices if self.gpu_free.get(device) == GPU_UNITS]
        count = amount // GPU_UNITS
        return whole[:count] if len(whole) >= count else None

    def fits(self, need):
        return self.choose_gpus(need.gpus) is not None and need.mem <= self.mem_free and \
            all(count <= self.named_free.get(name, 0) for name, count in need.named.items())

    def take(self, need, prefer=()):
        """Hold NEED (which fits) and return its grant: {"gpus": [device ids],
        "gpu_share": thousandths of each, "mem": bytes, "named": {name: count}};
        PREFER: see choose_gpus."""
        devices = self.choose_gpus(need.gpus, prefer)
        grant = {"gpus": devices, "gpu_share": min(need.gpus, GPU_UNITS) if devices else 0,
                 "mem": need.mem, "named": {name: count for name, count in need.named.items()
                                            if count}}
        self.hold(grant)
        return grant

    def missing(self, need):
        """How far NEED is from fitting now, GPUs first: for choosing the worker a job
        that fits nowhere reserves (the closest)."""
        if need.gpus >= GPU_UNITS:
            whole = sum(1 for free in self.gpu_free.values() if free == GPU_UNITS)
            gpus = max(0, need.gpus // GPU_UNITS - whole)
        else:
            gpus = int(bool(need.gpus) and self.choose_gpus(need.gpus) is None)
        return (gpus, max(0, need.mem - self.mem_free),
                sum(max(0, count - self.named_free.get(name, 0))
                    for name, count in need.named.items()))


NO_RESOURCES = Resources()
SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(?:i?B)?\Z", re.IGNORECASE)
SIZE_UNITS = "KMGTP"


def parse_size(text, what):
    """Bytes from 512, 512M, 16G, 1.5T (powers of 1024, as free -h shows them)."""
    match = SIZE.match(text.strip())
    if not match:
        raise UserError(f"{what} {text!r} is not an amount of memory: write it like 512M, "
                        "16G or 1.5T")
    unit = match[2].upper()
    return int(float(match[1]) * 1024 ** (SIZE_UNITS.index(unit) + 1 if unit else 0))


def size_text(count):
    """16G, 1.5T, 512M: COUNT bytes as --mem takes them."""
    for power in range(len(SIZE_UNITS), 0, -1):
        if count >= 1024 ** power:
            return f"{count / 1024 ** power:.3g}{SIZE_UNITS[power - 1]}"
    return str(count)


def worker_gpus(text):
    """add_slave --gpus: a count (4: devices 0-3) or device ids (0,2,5); the ids."""
    text = text.strip()
    if plain_number(text):
        count = int(text)
        if not 0 < count <= MAX_GPUS:
            raise UserError(f"--gpus {text}: a worker has 1 to {MAX_GPUS} GPUs")
        return [str(device) for device in range(count)]
    devices = [device.strip() for device in text.split(",")]
    if not all(plain_number(device) for device in devices) or len(set(devices)) < len(devices) \
            or len(devices) > MAX_GPUS:
        raise UserError(f"--gpus {text!r}: give a count (--gpus 4) or distinct device ids "
                        "(--gpus 0,2,5)")
    return [str(int(device)) for device in devices]


def job_gpus(text):
    """add_job --gpus: whole GPUs (2), or a share of one (0.5); in thousandths."""
    text = text.strip()
    if "," in text:
        raise UserError(f"--gpus {text}: a job asks for a number of GPUs, not device ids; "
                        "it gets free ones in CUDA_VISIBLE_DEVICES (pin a job to a worker "
                        "with --on)")
    try:
        amount = round(float(text) * GPU_UNITS)
    except (ValueError, OverflowError):
        raise UserError(f"--gpus {text!r} is not a number of GPUs (like 2, or 0.5 to share "
                        "one)") from None
    if not 0 < amount <= MAX_GPUS * GPU_UNITS or \
            abs(float(text) * GPU_UNITS - amount) > 1e-6:
        raise UserError(f"--gpus {text}: ask for 1 to {MAX_GPUS} GPUs, or a share of one "
                        "in thousandths (0.5, 0.25)")
    if amount > GPU_UNITS and amount % GPU_UNITS:
        raise UserError(f"--gpus {text}: more than one GPU must be whole GPUs (shares are of "
                        "one device: 0.5, not 1.5)")
    return amount


def resource_variables(grant):
    """What a job's grant puts in its environment: CUDA_VISIBLE_DEVICES and GPU_IDS
    (its devices, comma-separated), MEM (bytes) and RESOURCE_<NAME> per named one."""
    variables = {}
    if grant.get("gpus"):
        variables["CUDA_VISIBLE_DEVICES"] = variables["GPU_IDS"] = ",".join(grant["gpus"])
    if grant.get("mem"):
        variables["MEM"] = str(grant["mem"])
    for name, count in grant.get("named", {}).items():
        variables["RESOURCE_" + re.sub(r"[^A-Za-z0-9_]", "_", name).upper()] = str(count)
    return variables


def grant_json(grant):
    """What a job holds on one worker, as its environment tells it: {"gpus": [ids],
    "gpu_share": GPUs of each, "mem": bytes, NAME: count}, only what it has."""
    if not grant:
        return {}
    shown = {}
    if grant.get("gpus"):
        shown["gpus"] = grant["gpus"]
        shown["gpu_share"] = grant["gpu_share"] / GPU_UNITS
    if grant.get("mem"):
        shown["mem"] = grant["mem"]
    return {**shown, **grant.get("named", {})}


def grant_text(grants):
    """What a running job holds (its JSON "grant"), short: gpu 1,3 16G licence=1."""
    words = []
    for worker, grant in (grants or {}).items():
        if grant.get("gpus"):
            words.append("gpu " + ",".join(grant["gpus"])
                         + (f" ({grant['gpu_share']:g} each)" if grant["gpu_share"] < 1 else ""))
        if grant.get("mem"):
            words.append(size_text(grant["mem"]))
        words += [f"{name}={count}" for name, count in grant.items()
                  if name not in ("gpus", "gpu_share", "mem")]
        if len(grants) > 1:
            words[-1:] = [f"{words[-1]} on {worker}"] if words else []
    return " ".join(words) or "-"


def need_json(column):
    """A job's resources column in its public form (status --json, jobs --json,
    load_status): {"gpus": GPUs, "mem": bytes, NAME: count}; None for none."""
    if not column:
        return None
    need = json.loads(column)
    shown = {}
    if need.get("gpus"):
        shown["gpus"] = need["gpus"] / GPU_UNITS
        if need["gpus"] % GPU_UNITS == 0:
            shown["gpus"] = need["gpus"] // GPU_UNITS
    if need.get("mem"):
        shown["mem"] = need["mem"]
    return {**shown, **need.get("named", {})}


def resource_totals(slaves):
    """Each resource over all workers (their JSON), {"total", "used"}: status --json."""
    totals = {}
    for slave in slaves:
        for name, usage in slave.get("resources", {}).items():
            total = totals.setdefault(name, {"total": 0, "used": 0})
            total["total"] += usage["total"]
            total["used"] += usage["used"]
    return totals


def resource_usage_lines(shown):
    """A worker's resources as status shows them (Worker.resources_json), one short
    phrase each: gpus 1.5/4 (0,1 in use), mem 16G/256G, licence 1/2."""
    phrases = []
    for name, usage in shown.items():
        if name == "gpus":
            busy = ",".join(usage.get("in_use", ()))
            phrases.append(f"gpus {usage['used']:g}/{usage['total']}"
                           + (f" ({busy} in use)" if busy else ""))
        elif name == "mem":
            phrases.append(f"mem {size_text(usage['used'])}/{size_text(usage['total'])}")
        else:
            phrases.append(f"{name} {usage['used']}/{usage['total']}")
    return phrases


def resources_text(column):
    """A worker's resources column in a few words: 4 GPUs (0,1,2,3), 256G memory,
    licence=2."""
    if not column:
        return ""
    resources = json.loads(column)
    words = []
    gpus = resources.get("gpus")
    if gpus:
        words.append(f"{len(gpus)} GPU{'s' * (len(gpus) != 1)} ({','.join(gpus)})")
    if resources.get("mem"):
        words.append(f"{size_text(resources['mem'])} memory")
    words += [f"{name}={count}" for name, count in resources.get("named", {}).items()]
    return ", ".join(words)


def gpu_text(thousandths):
    return f"{thousandths / GPU_UNITS:g} GPU" + ("s" if thousandths > GPU_UNITS else "")


def resource_shortfall(need, workers):
    """Why a job with NEED (ResourceNeed) cannot start on any of WORKERS (the
    accepting ones it may use, WorkerCapacity) now: the first resource short on
    every one, and the most of it free on one worker; None if one holds it all."""
    if not need or any(worker.resources.fits(need) for worker in workers):
        return None
    resources = [worker.resources for worker in workers]
    if need.gpus and not all(resource.choose_gpus(need.gpus) is not None
                             for resource in resources):
        if need.gpus >= GPU_UNITS:
            most = max((sum(1 for free in resource.gpu_free.values() if free == GPU_UNITS)
                        for resource in resources), default=0)
            return f"needs {gpu_text(need.gpus)}{' together' * (need.gpus > GPU_UNITS)}; " \
                f"most free on one worker: {most}"
        most = max((free for resource in resources for free in resource.gpu_free.values()),
                   default=0)
        return (f"needs {gpu_text(need.gpus)} of one device; most free on one device: "
                f"{gpu_text(max(0, most))}")
    if need.mem and not all(need.mem <= resource.mem_free for resource in resources):
        most = max((resource.mem_free for resource in resources), default=0)
        return f"needs {size_text(need.mem)} memory; most free on one worker: " \
               f"{size_text(max(0, most))}"
    for name, count in need.named.items():
        most = max((resource.named_free.get(name, 0) for resource in resources), default=0)
        if most < count:
            return f"needs {name}={count}; most free on one worker: {max(0, most)}"
    return "its resources free together on one worker"


def resources_beyond(need, split_slots, allowed, declared_names, pinned):
    """Why a job asking for NEED (ResourceNeed; per slot if SPLIT_SLOTS, its slots
    when --split) could never start, or None: ALLOWED maps the workers it may
    use to (slots, Resources declared); DECLARED_NAMES: the named resources any
    worker declares; PINNED: it names its workers (--on)."""
    unknown = sorted(set(need.named) - declared_names)
    if unknown:
        return (f"unknown resource {unknown[0]!r}: no worker declares it (declare it with "
                f"./cli.py add_slave --resource {unknown[0]}=COUNT HOST, or edit_slave)")
    which = "in --on " if pinned else ""
    if split_slots:
        # Each worker holds as many of its slots as its resources allow.
        def held(slots, resources):
            count = min(slots, split_slots)
            while count and not resources.could_fit(need.times(count)):
                count -= 1
            return count
        together = sum(held(*worker) for worker in allowed.values())
        if together < split_slots:
            return (f"the workers {which}hold {together} slots with {need_text(need)} each "
                    f"together, fewer than --slots {split_slots}: declare more (./cli.py "
                    "edit_slave), or ask for fewer")
        return None
    if any(resources.could_fit(need) for _, resources in allowed.values()):
        return None
    resources = [resources for _, resources in allowed.values()]
    if need.gpus and not any(resources.could_fit(ResourceNeed(need.gpus))
                             for resources in resources):
        most = max((len(resources.devices) for resources in resources), default=0)
        return (f"no worker {which}has {gpu_text(need.gpus)} (the most is {most}): declare "
                f"them with ./cli.py add_slave --gpus N HOST (or edit_slave), or ask for fewer")
    if need.mem and not any(need.mem <= resources.mem_total for resources in resources):
        most = max((resources.mem_total for resources in resources), default=0)
        return (f"no worker {which}has {size_text(need.mem)} memory (the most is "
                f"{size_text(most)}): declare it with ./cli.py edit_slave --mem SIZE HOST, or "
                "ask for less")
    for name, count in need.named.items():
        most = max((resources.named_total.get(name, 0) for resources in resources), default=0)
        if most < count:
            return (f"no worker {which}has {name}={count} (the most is {most}): declare it "
                    f"with ./cli.py edit_slave --resource {name}=COUNT HOST, or ask for fewer")
    return f"no worker {which}has {need_text(need)} together: ask for less"


def need_text(need):
    """A ResourceNeed in a few words: 2 GPUs, 16G memory, licence=1."""
    return ", ".join([gpu_text(need.gpus)] * bool(need.gpus) +
                     [f"{size_text(need.mem)} memory"] * bool(need.mem) +
                     [f"{name}={count}" for name, count in need.named.items()])


class WorkerCapacity:
    """What the scheduler needs to know of one worker."""

    def __init__(self, name, slots, busy_slots, accepting=True, resources=NO_RESOURCES,
                 running=()):
        self.name = name
        self.slots = slots
        self.busy_slots = set(busy_slots)
        self.accepting = accepting     # active, and not down
        self.resources = resources     # GPUs, memory, named resources (see Resources)
        # Its running jobs as (expected end or None without --estimate, slot count,
        # grant or None): when a job that reserves it could start (backfill).  Read
        # only (not copied: a pass may never look); STARTED: those a plan adds.
        self.running = running
        self.started = []

    @property
    def free_slots(self):
        return max(0, self.slots - len(self.busy_slots)) if self.accepting else 0

    def take(self, count):
        """Hold the COUNT lowest free slots; return them."""
        taken = []
        for slot in range(self.slots):
            if len(taken) == count:
                break
            if slot not in self.busy_slots:
                taken.append(slot)
        self.busy_slots.update(taken)
        return taken


class JobNeeds:
    """What the scheduler needs to know of one waiting job."""

    def __init__(self, job_id, slots=1, on=None, prefer=(), exclude=(), avoid=(), split=False,
                 need=None, estimate=None, previous=None):
        self.job_id = job_id
        self.estimate = estimate       # seconds it expects to run (--estimate), or None
        # {worker name: grant} of its previous attempt: a retry there gets the same
        # devices if they are free.
        self.previous = previous or {}
        self.slots = slots
        self.split = split and slots > 1   # may run as parts on several workers (--split)
        self.on = on                   # None: any worker
        self.prefer = set(prefer)
        self.exclude = set(exclude)
        self.avoid = set(avoid)        # workers its earlier attempts failed on
        # GPUs, memory, named resources: a --split job's per slot (per_slot), and so
        # for all of its slots when one worker holds them.
        self.per_slot = need if self.split and need else None
        self.need = (need.times(slots) if self.per_slot else need) or ResourceNeed()

    def preferred_gpus(self, worker_name):
        """The devices its previous attempt held on WORKER_NAME (see previous)."""
        return (self.previous.get(worker_name) or {}).get("gpus", ())

    @property
    def plain(self):
        return self.slots == 1 and self.on is None and not (self.prefer or self.exclude or
                                                             self.avoid or self.need)

    def fits(self, worker):
        """Whether WORKER (a WorkerCapacity) holds all this job needs now."""
        return worker.free_slots >= self.slots and \
            (not self.need or worker.resources.fits(self.need))

    def could_fit(self, worker):
        """Whether WORKER could hold it all once its running jobs have ended."""
        return worker.accepting and worker.slots >= self.slots and \
            (not self.need or worker.resources.could_fit(self.need))

    def allowed(self, capacity, among=None):
        """The workers of CAPACITY (name -> WorkerCapacity) this job may run on; only
        those named in AMONG, if given (a set: faster than all of CAPACITY)."""
        names = (capacity if among is None else among) if self.on is None else \
            [name for name in self.on if name in capacity and (among is None or name in among)]
        return [capacity[name] for name in names if name not in self.exclude]

    def must_avoid(self, capacity, big_enough):
        """True while some allowed, accepting worker big enough for this job is not one
        its earlier attempts failed on: then those are out.  BIG_ENOUGH(k) counts the
        accepting workers with at least k slots, so that a job that may go anywhere
        costs len(avoid), not a pass over every worker."""
        if not self.avoid:
            return False

        def usable(worker):
            return worker.accepting and worker.slots >= self.slots
        if self.on is None and not self.exclude:
            failed_here = sum(1 for name in self.avoid
                              if name in capacity and usable(capacity[name]))
            return big_enough(self.slots) > failed_here
        return any(usable(worker) and worker.name not in self.avoid
                   for worker in self.allowed(capacity))


PLACEMENTS = ("spread", "pack")   # start --placement; the first is the default


def plan_starts(jobs, workers, placement="spread", now=0.0):
    """Which waiting jobs start now, where, and in which slots.

    JOBS (JobNeeds) come in the order they should start: priority, then age.
    PLACEMENT "spread": a plain job goes to the accepting worker with the most
    free slots, so load spreads across machines; "pack": to the one with the
    fewest free slots that still holds it (best fit), so large workers stay
    free for large jobs.  Ties go to the worker added first.  That is a
    heap, so 500 workers cost little more than 4.  A job with wishes goes to
    the allowed worker with enough free slots that it prefers (--prefer),
    then the one the placement picks.  A --split job that no one worker holds
    runs as parts: see _split_parts.  A retry waits for a worker it has not
    failed on while one is up (as GNU parallel's --retries does): a broken
    worker frees its slot at once and would otherwise take every retry before
    its health check notices.  Once it has failed everywhere, anywhere will do.

    A multi-slot job, or one that needs GPUs, memory or named resources, that
    fits nowhere reserves the allowed worker closest to fitting (the most free
    slots; GPUs first): nothing after it starts there, so what it needs frees
    up instead of going to a stream of small jobs; ageing would still let
    small jobs take every freed slot in between.  A job short only of
    resources (its slots are free) keeps its slots and the kinds of resource
    it asks for (.kept): later jobs that take none of those still start
    there, so a waiting 4-GPU job idles the GPUs it waits for, not the
    worker's CPUs.  Backfill (Slurm's): when
    every job running on the reserved worker has an --estimate, the reserving
    job could start there at a known time (reservation_time, from NOW); a
    later job with an estimate that fits there now and ends by then starts
    anyway.  A job that outlives its estimate makes that time now: the
    reservation holds from then on.  Without estimates nothing is backfilled.

    Returns a Plan: [(job_id, worker name, [slots])], with the reserved
    workers' names in .reserved and, for each --split job, all its parts in
    .parts (job id -> [(worker name, [slots])], the first part being the one
    in the list); WORKERS are not modified.
    """
    import heapq
    capacity = {worker.name: WorkerCapacity(worker.name, worker.slots, worker.busy_slots,
                                            worker.accepting,
                                            worker.resources if worker.resources is NO_RESOURCES
                                            else worker.resources.copy(), worker.running)
                for worker in workers}
    order = {name: position for position, name in enumerate(capacity)}
    sign = 1 if placement == "pack" else -1   # the heap's key: sign * free slots
    heap = [(sign * worker.free_slots, order[name], name) for name, worker in capacity.items()
            if worker.free_slots > 0]
    heapq.heapify(heap)
    reserved = set()
    kept = {}    # worker -> the kinds of resource a job short of them keeps there
    # Workers with a free slot that no reservation holds: a job with wishes
    # looks only at these, so a full cluster costs it nothing.
    open_workers = {name for name, worker in capacity.items() if worker.free_slots > 0}
    starts = Plan()
    starts.reserved = reserved
    starts.kept = kept
    shadows = {}             # reserved worker -> when its reserving job could start there
    backfill_looks = 0       # jobs looked at for backfill once no worker is open
    accepting_sizes = None   # sorted slots of the accepting workers, once a retry asks

    def start(job, worker):
        starts.append((job.job_id, worker.name, worker.take(job.slots)))
        grant = worker.resources.take(job.need, job.preferred_gpus(worker.name)) \
            if job.need else None
        if grant is not None:
            starts.grants[job.job_id] = {worker.name: grant}
        worker.started.append((None if job.estimate is None else now + job.estimate,
                               job.slots, grant))

    def backfilled(job):
        """Start JOB on a reserved worker it ends on before the reservation's time."""
        worker = _backfill_worker(job, capacity, shadows, now)
        if worker is not None:
            start(job, worker)
            starts.backfilled.append(job.job_id)
        return worker is not None

    def big_enough(slots):
        import bisect
        nonlocal accepting_sizes
        if accepting_sizes is None:
            accepting_sizes = sorted(worker.slots for worker in capacity.values()
                                     if worker.accepting)
        return len(accepting_sizes) - bisect.bisect_left(accepting_sizes, slots)
    for job in jobs:
        if not open_workers:
            if not shadows or backfill_looks >= BACKFILL_DEPTH:
                break
            backfill_looks += 1
            backfilled(job)
            continue
        if job.plain:
            worker = _most_free(heap, capacity, reserved, sign)
            if worker is None:
                # No free slot left but on reserved workers.
                if not shadows or backfill_looks >= BACKFILL_DEPTH:
                    break
                backfill_looks += 1
                backfilled(job)
                continue
            start(job, worker)
        else:
            avoid = job.avoid if job.must_avoid(capacity, big_enough) else ()
            fits = [worker for worker in job.allowed(capacity, open_workers)
                    if job.fits(worker) and worker.name not in avoid and
                    not (kept and job.need and kept.get(worker.name, set()) & job.need.kinds())]
            if fits:
                # A GPU job is placed by free GPUs first: spread puts it where most are
                # free, pack where fewest still hold it, so whole GPU workers stay free.
                worker = min(fits, key=lambda worker: (worker.name not in job.prefer,
                                                       sign * worker.resources.free_gpus()
                                                       if job.need.gpus else 0,
                                                       sign * worker.free_slots,
                                                       order[worker.name]))
                start(job, worker)
                if job.split:
                    starts.parts[job.job_id] = [starts[-1][1:]]
            elif job.split:
                parts = _split_parts(job, capacity, open_workers, reserved, avoid, order, kept)
                if parts:
                    starts.append((job.job_id, *parts[0][:2]))
                    starts.parts[job.job_id] = [part[:2] for part in parts]
                    if job.per_slot:
                        starts.grants[job.job_id] = {name: grant for name, _, grant in parts}
                    open_workers.difference_update(
                        name for name, _, _ in parts if not capacity[name].free_slots)
                continue
            elif shadows and backfilled(job):
                continue
            elif job.slots > 1 or job.need:
                _reserve(job, capacity, starts, avoid, order, open_workers, shadows, now)
                continue
            else:
                continue
        if worker.free_slots == 0:
            open_workers.discard(worker.name)
    starts.left = sum(capacity[name].free_slots for name in open_workers)
    return starts


def _reserve(job, capacity, starts, avoid, order, open_workers, shadows, now):
    """A job that fits nowhere now keeps the allowed worker closest to fitting (see
    plan_starts): all of it in STARTS.reserved, or, if only resources are short,
    its slots and the kinds of resource it asks for in STARTS.kept; and when it
    could start there, in SHADOWS (for backfill)."""
    reserved, kept = starts.reserved, starts.kept
    kinds = job.need.kinds() if job.need else set()
    could = [worker for worker in job.allowed(capacity) if job.could_fit(worker)
             and worker.name not in reserved and worker.name not in avoid
             and not kept.get(worker.name, set()) & kinds]
    if not could:
        return
    worker = min(could, key=lambda worker: (worker.resources.missing(job.need),
                                            -worker.free_slots, order[worker.name]))
    shadow = reservation_time(job, worker, now)
    if kinds and worker.free_slots >= job.slots:
        worker.take(job.slots)   # (held for it, as the kinds below)
        kept.setdefault(worker.name, set()).update(kinds)
    else:
        reserved.add(worker.name)
    starts.holders.setdefault(worker.name, job.job_id)
    if not worker.free_slots or worker.name in reserved:
        open_workers.discard(worker.name)
    if shadow is not None:
        shadows[worker.name] = min(shadow, shadows.get(worker.name, shadow))


class Plan(list):
    """What plan_starts decided: a list of starts, .reserved (worker names), .parts
    (the parts of --split jobs), and .left, the free slots that no start took
    and no reservation holds."""

    reserved = frozenset()
    kept = {}
    left = 0

    def __init__(self):
        super().__init__()
        self.parts = {}   # (each Plan its own: a class-wide dict would be shared)
        # job id -> {worker: the GPUs, memory and resources it takes there (Resources.take)}
        self.grants = {}
        self.backfilled = []   # the jobs started on a reserved worker (see plan_starts)
        self.holders = {}      # worker -> the job it is reserved or kept for


def _split_parts(job, capacity, open_workers, reserved, avoid, order, kept=None):
    """The parts of a --split job that no one worker holds: [(worker name, [slots],
    grant or None)], taken from CAPACITY; or [] if it cannot start now, and then
    the workers it waits for are RESERVED.

    The fewest workers: most free slots first, the last part taking only what
    is left (6 over 4+4 free: 4+2); a job with resources per slot counts on
    each worker only the slots whose resources are free too.  All or nothing:
    a part never starts alone.
    What it reserves keeps it from starving behind small jobs, as for one
    worker: one allowed worker that could hold it all, if any (the most free);
    else as many as could hold it together, most free first.
    """
    allowed = [worker for worker in job.allowed(capacity)
               if worker.accepting and worker.name not in avoid]

    def most_free(worker):
        return (-worker.free_slots, order[worker.name])

    def room(worker):
        """The slots of it this job could take now, resources and all."""
        most = min(worker.free_slots, job.slots)
        if job.per_slot and (kept or {}).get(worker.name, set()) & job.per_slot.kinds():
            return 0   # (what it needs there is kept for a job ahead of it)
        if job.per_slot:
            while most and not worker.resources.fits(job.per_slot.times(most)):
                most -= 1
        return most
    rooms = {worker.name: room(worker) for worker in allowed if worker.name in open_workers}
    usable = sorted((worker for worker in allowed if rooms.get(worker.name)),
                    key=lambda worker: (-rooms[worker.name], order[worker.name]))
    if sum(rooms.values()) >= job.slots:
        parts, wanted = [], job.slots
        for worker in usable:
            share = min(wanted, rooms[worker.name])
            grant = worker.resources.take(job.per_slot.times(share),
                                          job.preferred_gpus(worker.name)) \
                if job.per_slot else None
            parts.append((worker.name, worker.take(share), grant))
            wanted -= share
            if not wanted:
                return parts
    free_to_reserve = sorted((worker for worker in allowed if worker.name not in reserved),
                             key=most_free)
    whole = [worker for worker in free_to_reserve if worker.slots >= job.slots]
    chosen, total = whole[:1], 0
    if not chosen:
        for worker in free_to_reserve:
            if total >= job.slots:
                break
            chosen.append(worker)
            total += worker.slots
        if total < job.slots:
            chosen = []   # (other jobs hold the rest: it waits for them first)
    for worker in chosen:
        reserved.add(worker.name)
        open_workers.discard(worker.name)
    return []


def reservation_time(job, worker, now):
    """When JOB could start on WORKER (whose running jobs hold what it lacks) if they end
    as their estimates say: NOW at the earliest (one that overran may end any
    moment); None if it waits on a job without an estimate."""
    slots = worker.slots - len(worker.busy_slots)
    resources = worker.resources.copy()
    if slots >= job.slots and (not job.need or resources.fits(job.need)):
        return now
    import itertools
    for end, count, grant in sorted(itertools.chain(worker.running, worker.started),
                                    key=lambda run: (run[0] is None, run[0] or 0)):
        if end is None:
            return None
        slots += count
        if grant:
            resources.release(grant)
        if slots >= job.slots and (not job.need or resources.fits(job.need)):
            return max(end, now)
    return None


def _backfill_worker(job, capacity, shadows, now):
    """A reserved worker where JOB (with an estimate) fits now and ends before the
    reserving job could start there; None."""
    if job.estimate is None:
        return None
    for name, shadow in shadows.items():
        worker = capacity[name]
        if now + job.estimate <= shadow and job.fits(worker) and \
                job.allowed(capacity, {name}) and name not in job.avoid:
            return worker
    return None


def _most_free(heap, capacity, reserved, sign=-1):
    """The worker on top of HEAP (keyed by SIGN * free slots: -1 most free first, 1
    fewest first), once stale entries (slots taken since, or reserved) are
    dropped or corrected."""
    import heapq
    while heap:
        key, position, name = heap[0]
        worker = capacity[name]
        if name in reserved or worker.free_slots == 0:
            heapq.heappop(heap)
        elif key != sign * worker.free_slots:
            heapq.heapreplace(heap, (sign * worker.free_slots, position, name))
        else:
            # Its entry after this job takes a slot; the heap stays a heap.
            if worker.free_slots > 1:
                heapq.heapreplace(heap, (sign * (worker.free_slots - 1), position, name))
            else:
                heapq.heappop(heap)
            return worker
    return None


def dependency_conditions(after, after_any, ended):
    """What a new job waits on, from its --after and --after-any ids.

    ENDED maps the prerequisites that have already ended to their result; the
    others are still to come.  Returns ([(prerequisite, any_of)], None), or
    ([], why) when the conditions can never be met and the job is skipped.
    """
    failed = [job_id for job_id in after if job_id in ended and
              ended[job_id] != JobResult.SUCCEEDED.value]
    if failed:
        return [], f"job {failed[0]}, which it runs --after, ended {ended[failed[0]]}"
    conditions = [(job_id, False) for job_id in after if job_id not in ended]
    if after_any and JobResult.SUCCEEDED.value not in [ended.get(job_id) for job_id in after_any]:
        still = [job_id for job_id in after_any if job_id not in ended]
        if not still:
            return [], "none of its --after-any jobs succeeded"
        conditions += [(job_id, True) for job_id in still]
    return conditions, None


def settled_at_once(after, after_any, ended, skipped):
    """The conditions of a new job settled as it is queued, kept for `retry`:
    [(prerequisite, any_of, 'met', 'failed' or 'dropped')].  ENDED as for
    dependency_conditions; SKIPPED: the job is skipped at once, and its
    conditions still to come are dropped."""
    settled = []
    for any_of, job_ids in ((False, after), (True, after_any)):
        for job_id in job_ids:
            if job_id in ended:
                settled.append((job_id, any_of, "met" if ended[job_id] ==
                                JobResult.SUCCEEDED.value else "failed"))
            elif skipped:
                settled.append((job_id, any_of, "dropped"))
    return settled


def find_cycle(prerequisites):
    """A list of job ids that wait on each other in a circle, or None.

    PREREQUISITES maps each job to the jobs it waits on (ids not in the map
    wait on nothing).
    """
    done = set()
    for start in prerequisites:
        if start in done:
            continue
        stack = [(start, iter(prerequisites.get(start, ())))]
        path, on_path = [start], {start}
        while stack:
            job, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(path.pop())
                done.add(job)
            elif child in on_path:
                return path[path.index(child):] + [child]
            elif child not in done:
                stack.append((child, iter(prerequisites.get(child, ()))))
                path.append(child)
                on_path.add(child)
    return None


def waiting_reason(job, workers, paused, now, failed_on=(), array_limit=None, holders=None):
    """Why a waiting job (its JSON form) has not started yet, in a few words.

    WORKERS: WorkerCapacity of every registered worker (accepting: active and
    up); FAILED_ON: the workers its earlier attempts failed on; ARRAY_LIMIT, for
    a task of an array with %K: (K, its tasks running); HOLDERS: {worker: job
    id} of the workers the latest scheduling pass kept for a job (Plan.holders).
    Order matters: the first thing that holds the job back is named.
    """
    holders = holders or {}
    if job["after"] or job["after_any"]:
        def some(ids):
            return ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        return "; ".join([f"after {some(job['after'])}"] * bool(job["after"]) +
                         [f"after any of {some(job['after_any'])}"] * bool(job["after_any"]))
    if job["not_before"] is not None:
        moment = parse_iso_time(job["not_before"])
        if moment > now:
            same_day = time.localtime(moment)[:3] == time.localtime(now)[:3]
            return "until " + time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M",
                                            time.localtime(moment))
    if paused:
        return "queue paused"
    if array_limit is not None and array_limit[1] >= array_limit[0]:
        return f"array {job['array']} runs {array_limit[1]} tasks, its limit (%{array_limit[0]})"
    allowed = [worker for worker in workers if
               (job["on"] is None or worker.name in job["on"]) and
               worker.name not in (job["exclude"] or ())]
    wanted = job["slots_wanted"]
    where = f"on {', '.join(job['on'])}" if job["on"] else \
        "outside --exclude" if job["exclude"] else "on any worker"
    split = job.get("split") and wanted > 1
    if sum(worker.slots for worker in allowed) < wanted if split else \
            not any(worker.slots >= wanted for worker in allowed):
        if split and allowed:
            return f"workers with {wanted} slots together"
        return f"no worker with {wanted} slots" if wanted > 1 and allowed else \
            f"no worker {where}" if job["on"] or job["exclude"] else "no worker yet"
    if not any(worker.accepting for worker in allowed):
        return f"every worker {where} is paused, down or draining"
    untried = [worker.name for worker in allowed if worker.accepting and
               (split or worker.slots >= wanted) and worker.name not in failed_on]
    if failed_on and untried:
        return f"a worker it has not failed on ({', '.join(untried[:3])}" + \
            (", ...)" if len(untried) > 3 else ")")
    need = ResourceNeed.shown(job.get("resources"))
    if need and not split and not any(worker.slots >= wanted and worker.resources.could_fit(need)
                                      for worker in allowed):
        return f"no worker with {need_text(need)} (add one, or declare them: edit_slave)"
    if need and not split:
        shortfall = resource_shortfall(need, [worker for worker in allowed if worker.accepting
                                              and worker.slots >= wanted])
        if shortfall:
            return shortfall
    fits_now = [worker for worker in allowed if worker.accepting and
                worker.free_slots >= wanted and (not need or worker.resources.fits(need))]
    if not split and fits_now and all(holders.get(worker.name, job.get("id")) != job.get("id")
                                      for worker in fits_now):
        return f"room on {fits_now[0].name} is kept for job {holders[fits_now[0].name]}, " \
            "ahead of it"
    if split:
        return f"{wanted} free slots at once (--split)"
    return f"{wanted} free slots on one worker" if wanted > 1 else f"a free slot {where}"


def worker_verdict(exit_code, signal_number, duration, ended_by_us, script_ran=True):
    """What an ended attempt says of its worker, for the rule that sets a black-hole
    worker aside (one where every job fails at once, for reasons that have nothing to
    do with the job: ssh cannot get through, its disk is full).

    True: it counts towards setting the worker aside: ssh's own exit status 255,
    or a non-zero end within QUICK_FAILURE seconds.  False: the worker works
    (a success, or a slower failure).  None: it says nothing (a kill or timeout
    of ours, or a script that could not even start here).
    """
    if ended_by_us or not script_ran:
        return None
    if exit_code == SSH_EXIT_STATUS:
        return True
    if exit_code == 0 and signal_number is None:
        return False
    return duration < QUICK_FAILURE


def set_aside(failures_in_row, down_after, others_working):
    """True if a worker whose last FAILURES_IN_ROW attempts all failed (see
    worker_verdict) is set aside: the rule is on (DOWN_AFTER > 0), the count has
    reached it, and jobs do work on some other worker that takes jobs
    (OTHERS_WORKING).  Where they fail everywhere, the jobs are to blame, not the
    worker, and setting every worker aside would only stall the queue."""
    return down_after > 0 and failures_in_row >= down_after and others_working


def parse_array_spec(text):
    """add_job --array in Slurm's syntax: '1-1000', '0-99:5' (a step), '1,4,9-12', and
    '%K' at the end (at most K tasks running at once).  Returns (the task ids, in
    order and each once; K or None)."""
    spec, _, limit = text.partition("%")
    most = None
    if limit or text.endswith("%"):
        if not plain_number(limit) or int(limit) < 1:
            raise UserError(f"--array {text}: %K needs a whole number of at least 1 (at "
                            "most K tasks running at once), like 1-1000%50")
        most = int(limit)
        if not spec:
            return None, most   # the tasks come from :::, --args-file or --each-line
    task_ids, seen = [], set()
    for part in spec.split(","):
        match = re.fullmatch(r"(\d{1,7})(?:-(\d{1,7})(?::(\d{1,7}))?)?", part)
        if not match:
            raise UserError(f"--array {text}: {part!r} is not an index, a range like 1-100 "
                            "or a range with a step like 0-99:5")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        step = int(match[3]) if match[3] is not None else 1
        if last < first:
            raise UserError(f"--array {text}: the range {part} runs backwards: write "
                            f"{last}-{first}")
        if step < 1:
            raise UserError(f"--array {text}: the step of {part} must be at least 1")
        if sum(map(len, task_ids)) + (last - first) // step + 1 > MAX_ARRAY_TASKS:
            raise UserError(f"--array {text}: more than {MAX_ARRAY_TASKS} tasks; split it "
                            "into several arrays")
        task_ids.append(range(first, last + 1, step))
    if len(task_ids) == 1:
        return list(task_ids[0]), most    # (a million in a few milliseconds)
    return [task_id for part in task_ids for task_id in part
            if task_id not in seen and not seen.add(task_id)], most


def task_position(spec, tasks, task_id):
    """Where task TASK_ID is among the tasks of an array, from 0 (and so its job id,
    less the array's); None if it has no such task.  SPEC: its --array SPEC, or None
    for TASKS tasks counted from 1 (:::, lines)."""
    if spec is None:
        return task_id - 1 if 1 <= task_id <= tasks else None
    task_ids, _ = parse_array_spec(spec)
    try:
        return task_ids.index(task_id)
    except ValueError:
        return None


class ArrayRequest:
    """The tasks of a new array: TASK_IDS (each task's TASK_ID, in the order of their
    job ids), TASK_ARGS (each one's TASK_ARG, --each-line) or None, the --array SPEC
    that gave them (None for ::: and lines), and MAX_RUNNING (%K) or None."""

    def __init__(self, task_ids, task_args=None, spec=None, max_running=None):
        self.task_ids = task_ids
        self.task_args = task_args
        self.spec = spec
        self.max_running = max_running


def array_request(spec_text, arg_lists, task_args):
    """The ArrayRequest of an add_job request, or None for one plain job: --array SPEC
    (SPEC_TEXT) makes one task per index; ARG_LISTS (:::, --args-file) or TASK_ARGS
    (--each-line) one per list or line, TASK_ID counting from 1, and a SPEC_TEXT
    of '%K' alone then only sets their limit."""
    task_ids, most = parse_array_spec(spec_text) if spec_text is not None else (None, None)
    many = arg_lists if arg_lists is not None else task_args
    if task_ids is not None and many is not None:
        raise UserError(f"--array {spec_text} gives the tasks their indexes; so do ::: and "
                        f"--each-line: use one (or --array %K to only limit the others)")
    if task_ids is not None:
        return ArrayRequest(task_ids, None, spec_text.partition("%")[0], most)
    if many is None:
        if most is not None:
            raise UserError(f"--array {spec_text} limits the tasks of :::, --args-file or "
                            "--each-line, and there are none: give the indexes too, like "
                            f"--array 1-100{spec_text}")
        return None
    return ArrayRequest(range(1, len(many) + 1), task_args, None, most)


# --- schedules: their rules, when a rule fires next, what a due schedule does ---

def schedule_rule(every=None, daily=None, days=None, cron=None, after=None):
    """The rule of add_schedule from its rule options (one of EVERY seconds, DAILY
    times with DAYS, a CRON line, or AFTER: another schedule's name), checked; the
    dict stored (see migration 11)."""
    given = [flag for flag, value in (("--every", every), ("--daily", daily), ("--cron", cron),
                                      ("--after-schedule", after)) if value is not None]
    if days is not None and daily is None:
        raise UserError("--days goes with --daily (a cron line has its own day-of-week field)")
    if not given:
        raise UserError("a schedule needs a rule: --every DURATION, --daily HH:MM, "
                        "--cron 'M H DOM MON DOW' or --after-schedule NAME")
    if len(given) > 1:
        raise UserError(f"{given[0]} and {given[1]} are two rules: a schedule has one")
    if every is not None:
        if not _seconds(every, MIN_SCHEDULE_INTERVAL, MAX_DURATION):
            raise UserError(f"--every must be from {MIN_SCHEDULE_INTERVAL:g}s to "
                            f"{MAX_DURATION // 86400}d")
        return {"every": float(every)}
    if daily is not None:
        if not isinstance(daily, str) or days is not None and not isinstance(days, str):
            raise UserError("malformed request: daily and days must be strings")
        times = parse_daily(daily)
        weekdays = parse_days(days) if days is not None else None
        return {"daily": ",".join(f"{hour:02}:{minute:02}" for hour, minute in times),
                "days": None if weekdays is None or len(weekdays) == 7 else
                ",".join(CRON_FIELDS[4][3].split()[day] for day in sorted(weekdays))}
    if cron is not None:
        if not isinstance(cron, str):
            raise UserError("malformed request: cron must be a string")
        from datetime import timezone
        if next_cron_time(parse_cron(cron), 0, timezone.utc) is None:
            raise UserError(f"--cron {cron!r} never fires (no such day in any year): check "
                            "its day-of-month and month fields")
        return {"cron": " ".join(cron.split())}
    return {"after": _schedule_name(after, "--after-schedule")}


def next_due_time(rule, after, zone):
    """When RULE fires next after AFTER (seconds since the epoch), in ZONE's local time
    for --daily and --cron; None for a rule that follows another schedule's runs."""
    if "every" in rule:
        return after + rule["every"]
    if "daily" in rule:
        weekdays = parse_days(rule["days"]) if rule.get("days") else set(range(7))
        return next_daily_time(parse_daily(rule["daily"]), weekdays, after, zone)
    if "cron" in rule:
        return next_cron_time(parse_cron(rule["cron"]), after, zone)
    return None


def rule_text(rule):
    """A rule as schedules shows it: every 1h, daily 07:30 (mon-fri), cron 0 2 * * *."""
    if "every" in rule:
        return f"every {_duration_text(rule['every'])}"
    if "daily" in rule:
        return f"daily {rule['daily']}" + (f" ({rule['days']})" if rule.get("days") else "")
    if "cron" in rule:
        return f"cron {rule['cron']}"
    return f"after {rule['after']} succeeds"


def schedule_firing(due, now, server_started, skip_missed, overlap, previous_live):
    """What a schedule due at DUE does at NOW: "fire"; "skip", if its previous run
    still waits or runs and it may not overlap (the skips are counted); or "miss",
    with --skip-missed, for a time that passed while no server ran (before
    SERVER_STARTED) or the machine slept (SCHEDULE_LATE or more ago).  A missed
    time without --skip-missed fires, once however many passed: the next due
    time is always taken from NOW."""
    missed = due < server_started or now - due >= SCHEDULE_LATE
    if missed and skip_missed:
        return "miss"
    if previous_live and not overlap:
        return "skip"
    return "fire"


CRON_FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None),
               ("day of month", 1, 31, None),
               ("month", 1, 12, "jan feb mar apr may jun jul aug sep oct nov dec"),
               ("day of week", 0, 7, "sun mon tue wed thu fri sat"))


def parse_cron(text):
    """A cron line's five fields (minute, hour, day of month, month, day of week) with
    *, lists, ranges, steps and names (jan, mon): returns (the five sets of values,
    whether day of month and day of week are both restricted: then either one
    matches, as cron has it).  Day of week 7 is Sunday, as 0 is."""
    fields = text.split()
    if len(fields) != 5:
        raise UserError(f"--cron {text!r}: a cron line has 5 fields (minute hour "
                        f"day-of-month month day-of-week), this one has {len(fields)}")
    values = [_cron_field(field, *spec) for field, spec in zip(fields, CRON_FIELDS)]
    if 7 in values[4]:
        values[4] = (values[4] - {7}) | {0}
    both = not fields[2].startswith("*") and not fields[4].startswith("*")
    return values, both


def _cron_field(text, name, low, high, names):
    numbers = {word: index + low for index, word in enumerate(names.split())} if names else {}

    def number(word):
        word = word.lower()
        if word in numbers:
            return numbers[word]
        if not plain_number(word) or not low <= int(word) <= high:
            raise UserError(f"cron {name} {text!r}: {word!r} is not in the {name} field's "
                            f"range ({low}-{high}"
                            + (f" or {names.split()[0]}-{names.split()[-1]}" if names else "")
                            + ")")
        return int(word)
    chosen = set()
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and (not plain_number(step) or int(step) < 1):
            raise UserError(f"cron {name} {text!r}: the step {step!r} must be a whole number "
                            "of at least 1")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = map(number, span.split("-", 1))
            if last < first:
                raise UserError(f"cron {name} {text!r}: the range {span} runs backwards")
        else:
            first = number(span)
            last = high if step else first
        chosen.update(range(first, last + 1, int(step or 1)))
    return chosen


def parse_daily(text):
    """--daily HH:MM[,HH:MM...]: the times of day, as sorted (hour, minute) pairs."""
    times = set()
    for part in text.split(","):
        match = re.fullmatch(r"([0-9]{1,2}):([0-9]{2})", part.strip())
        if not match or int(match[1]) > 23 or int(match[2]) > 59:
            raise UserError(f"--daily {text!r}: {part!r} is not a time of day like 07:30 "
                            "(00:00 to 23:59)")
        times.add((int(match[1]), int(match[2])))
    return sorted(times)


def parse_days(text):
    """--days mon-fri, sat,sun, ...: the days of the week as cron numbers (0 = Sunday)."""
    return _cron_field(text, "day of week", 0, 6, CRON_FIELDS[4][3])


def next_cron_time(rule, after, zone):
    """The first moment after AFTER (seconds since the epoch) at which RULE (from
    parse_cron) fires, in ZONE's local time; None if it never does (Feb 30)."""
    from datetime import datetime, timedelta
    (minutes, hours, days, months, weekdays), both = rule
    start = datetime.fromtimestamp(after, zone).replace(tzinfo=None, second=0, microsecond=0)
    day = start.replace(hour=0, minute=0)
    for _ in range(366 * 8):   # a leap day comes back within 8 years
        weekday = (day.weekday() + 1) % 7
        day_matches = (day.day in days or weekday in weekdays) if both else \
            (day.day in days and weekday in weekdays)
        if day.month in months and day_matches:
            for hour in sorted(hours):
                for minute in sorted(minutes):
                    wall = day.replace(hour=hour, minute=minute)
                    if wall < start - timedelta(hours=3):
                        continue   # long past (a daylight-saving change is at most 2 h)
                    moment = local_moment(wall, zone)
                    if moment > after:
                        return moment
        day += timedelta(days=1)
    return None


def next_daily_time(times, weekdays, after, zone):
    """The first moment after AFTER at which --daily TIMES (on WEEKDAYS, cron numbers)
    falls, in ZONE's local time."""
    return min(next_cron_time((({minute}, {hour}, set(range(1, 32)), set(range(1, 13)),
                                 set(weekdays)), False), after, zone)
               for hour, minute in times)


def local_moment(wall, zone):
    """Seconds since the epoch of the wall-clock time WALL (naive, whole minutes) in
    ZONE.  A time a daylight-saving change skips (02:30 on the night the clocks go
    forward) is the moment the clocks jump; a time it repeats (02:30 when they go
    back) is its first occurrence: so a daily time is neither skipped nor run twice."""
    earlier = wall.replace(tzinfo=zone, fold=0).timestamp()
    if wall_time(earlier, zone) == wall:
        return min(earlier, wall.replace(tzinfo=zone, fold=1).timestamp())
    # In the gap: from a moment before the jump, the first minute whose wall time is
    # past WALL is the jump itself (jumps fall on whole minutes).
    moment = wall.replace(tzinfo=zone, fold=1).timestamp()
    while wall_time(moment, zone) <= wall:
        moment += 60
    return moment


def wall_time(moment, zone):
    """The naive wall-clock time in ZONE at MOMENT (seconds since the epoch)."""
    from datetime import datetime
    return datetime.fromtimestamp(moment, zone).replace(tzinfo=None)


def local_zone():
    """The zone schedules run in: TZ if set, else the system's (/etc/localtime).  A TZ
    that names no zone but a POSIX offset (UTC-05:30) is that fixed offset: its
    daylight-saving rules, if it has any, are not followed."""
    import zoneinfo
    name = os.environ.get("TZ", "").lstrip(":")
    try:
        if name:
            return zoneinfo.ZoneInfo(name)
        with open("/etc/localtime", "rb") as data:
            return zoneinfo.ZoneInfo.from_file(data, key="localtime")
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        if not name:
            return zoneinfo.ZoneInfo("UTC")
    from datetime import timedelta, timezone
    time.tzset()
    return timezone(timedelta(seconds=time.localtime().tm_gmtoff))


def restart_delay(previous, ran_for):
    """Seconds before a replica whose job ended after RAN_FOR seconds starts again:
    RESTART_FIRST, doubling at each quick end up to RESTART_MAX, and RESTART_FIRST
    again once it has run for RESTART_STEADY (PREVIOUS: the delay before its
    latest start, 0 if none)."""
    if previous <= 0 or ran_for >= RESTART_STEADY:
        return RESTART_FIRST
    return min(previous * 2, RESTART_MAX)


def replicas_to_change(desired, live):
    """What makes a service's replicas what is wanted: (the numbers to start, the
    numbers to stop).  DESIRED: how many (0 while it is stopped); LIVE: the
    numbers that have a job not done.  Scaling down stops the highest."""
    return sorted(set(range(desired)) - set(live)), sorted(n for n in live if n >= desired)


# The fields of a service's spec, as a document names them; a change to any of
# them replaces the service (its replicas restart), unlike replicas and enabled.
SERVICE_SPEC_FIELDS = ("script", "args", "cwd", "envs", "port", "health")
OPTION_FIELDS = {"slots_wanted": "slots", "run_on": "on"}   # JOB_OPTIONS columns named otherwise


def service_differences(current, wanted):
    """What makes the services CURRENT ({name: spec}) those of WANTED (a list of
    specs), for load_services: one dict per difference, in WANTED's order, then
    the removed ones by name.  Each has the service's "name", its "replicas"
    and "enabled" as [before, after], and a "change": added; changed (its
    "fields" other than replicas and enabled differ: it is replaced); scaled;
    started or stopped (enabled alone changed); removed.  A spec is a dict with
    SERVICE_SPEC_FIELDS, "options" (JOB_OPTIONS), "replicas" and "enabled"."""
    def difference(name, change, old, new, fields=()):
        return {"name": name, "change": change, "fields": list(fields),
                "replicas": [old["replicas"] if old else 0, new["replicas"] if new else 0],
                "enabled": [bool(old and old["enabled"]), bool(new and new["enabled"])]}
    differences = []
    for spec in wanted:
        old = current.get(spec["name"])
        if old is None:
            differences.append(difference(spec["name"], "added", None, spec))
            continue
        fields = [field for field in SERVICE_SPEC_FIELDS if old[field] != spec[field]]
        fields += [OPTION_FIELDS.get(column, column) for column in JOB_OPTIONS
                   if old["options"].get(column) != spec["options"].get(column)]
        if fields:
            differences.append(difference(spec["name"], "changed", old, spec, fields))
            continue
        if old["replicas"] != spec["replicas"]:
            differences.append(difference(spec["name"], "scaled", old, spec))
        if old["enabled"] != spec["enabled"]:
            differences.append(difference(spec["name"], "started" if spec["enabled"]
                                          else "stopped", old, spec))
    named = {spec["name"] for spec in wanted}
    differences += [difference(name, "removed", current[name], None)
                    for name in sorted(set(current) - named)]
    return differences


def retried_together(candidates):
    """Which of CANDIDATES, ended jobs a `retry` would run again, can come back.

    CANDIDATES: {job id: [(prerequisite, any_of, how it ended: a result,
    'removed', or None while it has not)]}, the --after and --after-any
    conditions each job never had met.  A job comes back unless a condition
    would skip it again at once: an --after job that ended without success and
    does not come back itself, or every one of its --after-any jobs so.  Leaving
    one out can hold back others (the largest set that holds is the answer).
    Returns (the ids that come back, {id held back: the condition that holds it}).
    """
    def lost(prerequisite, how, back):
        return how not in (None, JobResult.SUCCEEDED.value) and prerequisite not in back

    back, held = set(candidates), {}
    while True:
        newly = {}
        for job_id in back:
            conditions = candidates[job_id]
            lost_after = [condition for condition in conditions
                          if not condition[1] and lost(condition[0], condition[2], back)]
            any_of = [condition for condition in conditions if condition[1]]
            if lost_after:
                newly[job_id] = lost_after[0]
            elif any_of and all(lost(prerequisite, how, back) for prerequisite, _, how in any_of):
                newly[job_id] = any_of[-1]
        if not newly:
            return back, held
        back -= set(newly)
        held.update(newly)


def free_retry(exit_code, ended_by_us, down_after, unreached_before):
    """True if a failed attempt goes back to the queue without spending its --retries:
    ssh could not reach its worker (255), the rule is on (DOWN_AFTER > 0), and the
    job has had fewer than DOWN_AFTER such attempts (so that a job whose own work
    exits 255 runs at most DOWN_AFTER + 1 times)."""
    return exit_code == SSH_EXIT_STATUS and not ended_by_us and down_after > 0 and \
        unreached_before < down_after


def job_environment(submitter_environment, worker_variables, job_variables, job_id, worker,
                    attempt=1, slots=(0,), endpoint=None, ssh_shim=None, task=None):
    """The environment a job script runs with; later sources override earlier ones.

    WORKER is the worker's name; the job gets the destination its ssh, rsync and
    scp all take (WorkerAddress.destination) as SLAVE_IP, and ENDPOINT (host,
    port and user, as ssh resolves them) as SLAVE_HOST, SLAVE_PORT and
    SLAVE_USER.  SSH_SHIM, if given, is (shim dir, ControlPath or None, ssh config
    or None): the shim dir goes first on PATH, so that the job's ssh, scp, sftp
    and rsync share connections and read the queue's ssh config.  TASK, for a task
    of an array, is (ARRAY_ID, TASK_ID, TASK_ARG or None).
    """
    environment = dict(submitter_environment)
    for name in TASK_VARIABLES + SCHEDULE_VARIABLES:
        environment.pop(name, None)   # a task's or a run's own, if one submitted this job
    environment.update(worker_variables)
    environment.update(job_variables)
    environment["JOB_ID"] = str(job_id)
    environment["SLAVE_IP"] = worker_address(worker).destination
    if endpoint is not None:
        environment["SLAVE_HOST"] = endpoint["host"]
        environment["SLAVE_PORT"] = str(endpoint["port"])
        environment["SLAVE_USER"] = endpoint["user"]
    environment["JOB_ATTEMPT"] = str(attempt)
    environment["SLOT"] = str(slots[0])
    environment["SLOTS"] = ",".join(map(str, slots))
    if task is not None:
        for name, value in zip(TASK_VARIABLES, task):
            if value is not None:
                environment[name] = str(value)
    for name in (SSH_SHIM_VARIABLE, SSH_CONTROL_VARIABLE, SSH_JOBS_CONFIG_VARIABLE):
        environment.pop(name, None)   # the submitter's own job may have had them
    if ssh_shim is not None:
        shim_dir, control_path, ssh_config = ssh_shim
        environment["PATH"] = shim_dir + os.pathsep + environment.get("PATH", os.defpath)
        environment[SSH_SHIM_VARIABLE] = shim_dir
        if control_path is not None:
            environment[SSH_CONTROL_VARIABLE] = control_path
        if ssh_config is not None:
            environment[SSH_JOBS_CONFIG_VARIABLE] = ssh_config
    return environment


def hook_environment(submitter_environment, job_variables, run, job_id, log, args, task=None):
    """The environment of a job's hook: the job's own, less what only its attempts
    get (the worker's variables, SLAVE_*, SLOT...), plus what RUN (a hook_runs
    row) says of the end: JOB_ID, JOB_RESULT, JOB_EXIT_CODE and JOB_SIGNAL
    (empty when none), JOB_LOG, JOB_WORKER (empty if it never ran),
    JOB_ATTEMPTS and JOB_ARGS (ARGS as JSON); and TASK, as job_environment takes it."""
    environment = dict(submitter_environment)
    for name in (*TASK_VARIABLES, SSH_SHIM_VARIABLE, SSH_CONTROL_VARIABLE,
                 SSH_JOBS_CONFIG_VARIABLE):
        environment.pop(name, None)   # the submitter's, if a job submitted this one
    environment.update(job_variables)
    environment.update(
        JOB_ID=str(job_id), JOB_RESULT=run["job_result"],
        JOB_EXIT_CODE=_text_or_empty(run["job_exit_code"]),
        JOB_SIGNAL=_text_or_empty(run["job_signal"]), JOB_LOG=log,
        JOB_WORKER=_text_or_empty(run["job_worker"]), JOB_ATTEMPTS=str(run["job_attempts"]),
        JOB_ARGS=json.dumps(args))
    if task is not None:
        for name, value in zip(TASK_VARIABLES, task):
            if value is not None:
                environment[name] = str(value)
    return environment


def _text_or_empty(value):
    return "" if value is None else str(value)


def split_variables(parts, index):
    """What part INDEX of a --split job gets beside SLOTS (its share): SPLIT_HOSTS,
    every part as destination:slots (an MPI host list, this part's place in it
    being SPLIT_PART, from 0)."""
    return {"SPLIT_HOSTS": ",".join(f"{worker_address(worker).destination}:{len(slots)}"
                                    for worker, slots in parts),
            "SPLIT_PART": str(index)}


###############################################################################
# Job runner ###################################################################
###############################################################################

# Each attempt runs under a supervisor, a process forked by the spawner (see
# Spawner), that starts the job script in a process group of its own, waits
# for it and writes how it ended to a file.  It outlives the server, so a job that ends while the server is down
# still has its exit status recorded.  Its files in DATA_DIR/run:
#   N-A.lock  held (flock) by the supervisor for as long as it lives: proof of
#             life that cannot be fooled by a reused pid
#   N-A.pid   its pid (also the job's session id), written before the script
#             starts: no pid file and a free lock mean the script never ran,
#             so recovery may queue the job again
#   N-A.exit  {"exit_code", "signal", "error", "ended_at"} once the script has
#             ended (recorded later if the server is away or the disk full); its
#             space on disk is taken (as N-A.exit.tmp) before the script
#             starts, so a disk that fills up meanwhile cannot lose it
#   N-A.kill  the grace period, written by the server before it asks the
#             supervisor (SIGTERM) to end the job's process group
#
# The supervisor is a child subreaper: whatever the script leaves behind is
# reparented to it, so it is told (SIGCHLD) when the last process of the job's
# group ends, and nothing depends on PID 1 reaping zombies.

class LaunchError(Exception):
    """The system refused to start a supervisor (process or file limits)."""


class AttemptSpec:
    """Everything a supervisor needs to run one attempt of one job."""

    def __init__(self, job_id, attempt, script, args, cwd, environment, umask, fd_limit,
                 log_path, worker, parts=None):
        self.job_id = job_id
        # A --split job's: [{"worker", "slots", "environment"}], one script each, all
        # under this one supervisor (see _run_parts); ENVIRONMENT is then None.
        self.parts = parts
        self.attempt = attempt
        self.worker = worker     # its name as registered, for the log's attempt marker
        self.script = script
        self.args = args
        self.cwd = cwd
        self.environment = environment
        self.umask = umask
        self.fd_limit = fd_limit
        self.log_path = log_path


class Spawner:
    """A small process that forks the supervisors, started before the server loads
    its database, logging and locks.

    Forking the server itself cost 1-2 ms a job: the page tables of a large
    process, and the at-fork hooks of the libraries it loaded, paid twice (the
    supervisor forks the script too).  The spawner stays small.  It opens each
    supervisor's pidfd at once (so no reaping can race it) and hands it over
    the socket; it reaps its children as they end; it exits when the server
    goes away.
    """

    def __init__(self):
        self.channel = None
        self.log = None   # the server's logger, once it has one (see open_server)
        self.start()

    def start(self):
        server_end, spawner_end = socket.socketpair()
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                server_end.close()
                _spawner_main(spawner_end)
        except OSError as error:
            server_end.close()
            raise LaunchError(f"cannot start the spawner process: {error.strerror}") from None
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            spawner_end.close()
        self.channel = server_end
        self.pid = pid

    def spawn(self, run_dir, spec):
        """Start a supervisor for SPEC; return (pid, pidfd)."""
        request = json.dumps({"run_dir": run_dir, "spec": vars(spec)}).encode() + b"\n"
        for attempt in (1, 2):   # a spawner that died is replaced once
            try:
                self.channel.sendall(request)
                reply, fds = b"", []
                while not reply.endswith(b"\n"):
                    chunk, new_fds, _, _ = socket.recv_fds(self.channel, 4096, 1)
                    if not chunk:
                        raise ConnectionError("the spawner process is gone")
                    reply += chunk
                    fds += new_fds
                break
            except OSError as error:
                if attempt == 2:
                    raise LaunchError(f"cannot reach the spawner ({error})") from None
                self.replace()
        answer = json.loads(reply)
        if "error" in answer:
            raise LaunchError(answer["error"])
        return answer["pid"], fds[0]

    def replace(self):
        """Reap a spawner that stopped answering, say how it ended, and start another."""
        self.channel.close()   # one still alive sees EOF and exits
        ended = self.reap()
        if self.log is not None:
            self.log.warning("the spawner (pid %d) %s; starting a new one", self.pid, ended)
        self.start()   # raises LaunchError if even that fails

    def reap(self):
        """Wait for the old spawner to end (killed if it has not within a second: a stuck
        one would hold up the server); return how it ended."""
        import select
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return "was gone"
        try:
            if not select.select([pidfd], [], [], 1.0)[0]:
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "was gone"
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            try:
                return f"was killed by {signal.Signals(number).name}"
            except ValueError:
                return f"was killed by signal {number}"
        return f"exited with status {os.WEXITSTATUS(status)}"

    def close(self):
        self.channel.close()   # the spawner sees EOF and exits


def _spawner_main(channel):
    """The spawner's loop: a request line in, a supervisor and its pidfd out."""
    status = 1
    try:
        setup = ChildSetup()   # before our own dispositions change
        for number in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        # (SIGCHLD too: reaping waits for it, and a starter may have left it blocked)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
        _name_process("cli.py spawner")
        # Supervisors are forks of this process: the collector must not walk
        # (and so copy) the pages of objects they inherit.  See _supervise.
        import gc
        gc.freeze()
        os.closerange(3, channel.fileno())
        os.closerange(channel.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
        # SIGCHLD wakes the loop to reap supervisors as they end.
        wakeup_read, wakeup_write = socket.socketpair()
        wakeup_write.setblocking(False)
        signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        lines = LineReader()
        while True:
            readable, _, _ = select_readable([channel, wakeup_read])
            if wakeup_read in readable:
                # Only then: each waitpid walks every child, thousands while as
                # many jobs run, and a request must not pay for that.
                wakeup_read.recv(4096)
                _reap_children(None, None)
            if channel not in readable:
                continue
            chunk = channel.recv(1 << 20)
            if not chunk:
                break
            for line in lines.feed(chunk):
                _spawn_one(channel, json.loads(line), setup)
        status = 0
    except BaseException:   # noqa: BLE001 - never unwind into the server's code
        pass
    os._exit(status)


def select_readable(sockets):
    import select
    while True:
        try:
            return select.select(sockets, [], [])
        except InterruptedError:
            continue


def _spawn_one(channel, request, setup):
    try:
        spec = AttemptSpec(**request["spec"])
        pid = launch_supervisor(request["run_dir"], spec, setup)
        pidfd = os.pidfd_open(pid)   # before any reaping: the pid cannot be reused yet
    except (LaunchError, OSError) as error:
        channel.sendall(json.dumps({"error": str(error)}).encode() + b"\n")
        return
    socket.send_fds(channel, [json.dumps({"pid": pid}).encode() + b"\n"], [pidfd])
    os.close(pidfd)


def launch_supervisor(run_dir, spec, setup):
    """Fork a supervisor for one attempt (in the spawner); return its pid.

    Never a second one: a spawner killed after its fork, before it could hand
    the supervisor over, is asked again by the server (see Spawner.spawn).  The
    lock still held, or a pid file, says that the attempt has its supervisor
    (alive, or ended already), which the server then adopts or settles (see
    Runner.start)."""
    import errno
    import fcntl
    try:
        lock_fd = os.open(run_file(run_dir, spec.job_id, spec.attempt, "lock"),
                          os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as error:
        raise LaunchError(f"cannot create its lock file: {error.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(lock_fd)
        if error.errno != errno.EWOULDBLOCK:
            raise LaunchError(f"cannot lock its lock file: {error.strerror}") from None
        raise LaunchError("it has a supervisor already") from None
    if os.path.lexists(run_file(run_dir, spec.job_id, spec.attempt, "pid")):
        os.close(lock_fd)
        raise LaunchError("it has had a supervisor already")
    # Block the signals the supervisor waits for before forking, so that none
    # reaches the spawner's own handler in the child.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    try:
        pid = os.fork()
        if pid == 0:
            _supervise(run_dir, spec, lock_fd, setup)
    except OSError as error:
        raise LaunchError(f"cannot start a supervisor: {error.strerror}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        os.close(lock_fd)   # the supervisor's copy keeps the lock
    return pid


def _supervise(run_dir, spec, lock_fd, setup):
    """The body of a supervisor process.  Never returns."""
    status = 1
    try:
        import gc
        gc.disable()   # a short life with few objects: nothing worth collecting
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # the spawner's handler, not ours
        for number in (signal.SIGINT, signal.SIGHUP):
            signal.signal(number, signal.SIG_IGN)
        os.setsid()   # out of the server's session: a stop of the server leaves us alone
        _name_process(f"cli.py job {spec.job_id}")
        setup.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        # Drop every descriptor of the server (its listener, its database, the
        # data dir lock) except our own lock.
        os.closerange(3, lock_fd)
        os.closerange(lock_fd + 1, os.sysconf("SC_OPEN_MAX"))
        # No room for the outcome, or for the pid file: the script does not
        # start, and the server queues the job again (no pid file, lock free).
        outcome_path = run_file(run_dir, spec.job_id, spec.attempt, "exit")
        outcome_fd = _reserve_file(outcome_path + ".tmp", OUTCOME_RESERVE)
        log = _open_log(spec)   # (likewise when the log's disk is full or read-only)
        _write_file(run_file(run_dir, spec.job_id, spec.attempt, "pid"), f"{os.getpid()}\n")
        outcome = dict(_run_and_wait(run_dir, spec, setup, log), ended_at=time.time())
        _write_outcome(outcome_fd, outcome_path, json.dumps(outcome))
        status = 0
    except BaseException:   # noqa: BLE001 - a supervisor must never unwind into the server
        pass
    os._exit(status)


class ChildSetup:
    """What supervisors and jobs need, looked up once in the spawner.

    Each lookup here cost a job process ~0.5 ms when done after the fork (a
    ctypes handle, the resource module, ~64 signal dispositions).
    """

    def __init__(self):
        import ctypes
        import resource
        self.prctl = ctypes.CDLL(None, use_errno=True).prctl
        self.setrlimit = resource.setrlimit
        # A program that exits at once, to lead each job's process group (_spawn_job).
        self.group_leader = next((path for path in ("/bin/true", "/usr/bin/true")
                                  if os.access(path, os.X_OK)), "true")
        self.rlimit_nofile = resource.RLIMIT_NOFILE
        # Dispositions a job must not inherit: ours, and any the server's own
        # starter left ignored (nohup, a background shell).
        ours = {signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE,
                signal.SIGXFSZ}
        self.reset_signals = sorted(ours | {
            number for number in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
            if signal.getsignal(number) not in (signal.SIG_DFL, None)})


def _name_process(name):
    """Show NAME in ps and top instead of a copy of the server's name."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass


def _open_log(spec):
    """The job's log, opened for the script's output; or why it cannot be (the job
    fails).  A full or read-only disk raises instead: the job waits for it.

    Retries append to the log of the first attempt, after a line that says which
    attempt begins, where and when.
    """
    import errno
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if spec.attempt > 1 else os.O_TRUNC)
    try:
        log_fd = os.open(spec.log_path, flags, 0o600)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        return f"cannot open its log {spec.log_path}: {error.strerror}"
    if spec.attempt > 1:
        marker = (f"--- attempt {spec.attempt} on {spec.worker} at "
                  f"{time.strftime('%H:%M:%S')} ---\n")
        _note(log_fd, ("\n" if _ends_mid_line(spec.log_path) else "") + marker)
    return log_fd


def _ends_mid_line(path):
    """True if the file at PATH ends with a line that has no newline yet."""
    try:
        with open(path, "rb") as log:
            if log.seek(0, os.SEEK_END) == 0:
                return False
            log.seek(-1, os.SEEK_END)
            return log.read(1) != b"\n"
    except OSError:
        return False


def _run_and_wait(run_dir, spec, setup, log_fd):
    if isinstance(log_fd, str):
        return {"exit_code": None, "signal": None, "error": log_fd}
    try:
        os.chdir(spec.cwd)
    except OSError as error:
        message = f"cannot enter the job's directory {spec.cwd}: {error.strerror}"
        _note(log_fd, f"cli.py: job {spec.job_id}: {message}\n")
        return {"exit_code": None, "signal": None, "error": message}
    if spec.parts:
        return _run_parts(run_dir, spec, setup, log_fd)
    started = _spawn_job(spec, log_fd, setup)
    os.close(log_fd)
    if isinstance(started, dict):
        return started
    exit_status = _wait_for_group(run_dir, spec, *started)
    if os.WIFSIGNALED(exit_status):
        return {"exit_code": None, "signal": os.WTERMSIG(exit_status), "error": None}
    return {"exit_code": os.WEXITSTATUS(exit_status), "signal": None, "error": None}


def _spawn_job(spec, log_fd, setup, environment=None):
    """Start the job script in a process group of its own, with a clean slate.

    The group is not led by the script: its leader is a process that exits at
    once (its zombie holds the group id until the first reap, after the script
    has joined).  A script whose exit trap runs `kill -- -$$`, as the original
    tool's example did, then finds no group of that id and ends with its own
    exit status, as it did there; `kill`, timeouts and the cleanup of what a
    script leaves behind signal the whole group by the leader's id.

    posix_spawn (a vfork) rather than fork: a fork of even this small Python
    process costs more than the whole script (page tables copied, then every
    page the child touches).  What posix_spawn cannot do for the child (umask,
    fd limit) is set in this process, which has no other use for it.
    Returns (script pid, group id), or the outcome if the script could not be
    started.
    """
    os.umask(spec.umask)
    setup.setrlimit(setup.rlimit_nofile, tuple(spec.fd_limit))
    try:
        group = os.posix_spawn(setup.group_leader, [setup.group_leader], {}, setpgroup=0)
    except OSError:
        group = 0   # (no process to spare) the script leads its group, as before
    try:
        pid = os.posix_spawn(
            spec.script, [spec.script, *spec.args], environment or spec.environment,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, log_fd, 1),
                          (os.POSIX_SPAWN_DUP2, log_fd, 2)],
            setpgroup=group, setsigmask=(), setsigdef=setup.reset_signals)
        return pid, group or pid
    except OSError as error:
        message = f"cannot run {spec.script}: {error.strerror}"
        _note(log_fd, f"cli.py: {message}\n")
        # not_started: says nothing of the worker (see worker_verdict).
        return {"exit_code": 127 if error.errno == 2 else 126, "signal": None, "error": None,
                "not_started": True}


def _wait_for_group(run_dir, spec, script, group):
    """Wait for the job's main process (SCRIPT), then for the rest of its
    process GROUP.

    SIGTERM (from the server) means: end the job.  The group gets SIGTERM, and
    SIGKILL once the grace period in the .kill file has passed.  Processes the
    script left behind in its group when it exited get the same treatment, so a
    freed slot is really free (as Slurm does at the end of a job).
    """
    waited = {signal.SIGTERM, signal.SIGCHLD}
    exit_status = None
    kill_deadline = None
    while True:
        exit_status = _reap_children(script, exit_status)
        if exit_status is not None:
            if not _group_alive(group):
                return exit_status
            if kill_deadline is None:
                kill_deadline = _terminate_group(group, DEFAULT_KILL_GRACE)
        if kill_deadline is None:
            received = signal.sigwaitinfo(waited)
        else:
            remaining = kill_deadline - time.monotonic()
            if remaining <= 0:
                _signal_group(group, signal.SIGKILL)
                remaining = 1.0
            received = signal.sigtimedwait(waited, remaining)
        if received and received.si_signo == signal.SIGTERM:
            # A second kill may ask for a shorter grace than the first.
            grace = _read_grace(run_dir, spec.job_id, spec.attempt)
            if kill_deadline is None:
                kill_deadline = _terminate_group(group, grace)
            else:
                kill_deadline = min(kill_deadline, time.monotonic() + grace)


def _run_parts(run_dir, spec, setup, log_fd):
    """Run each part of a --split job (its script, with that part's environment) in
    a process group of its own, and wait for all of them: the attempt succeeds
    when every part does.  The first part to fail ends the others (TERM, then
    KILL after the grace), and its exit status is the attempt's.

    One supervisor for all parts, rather than one per part: the parts start
    together, and the all-or-nothing end is decided here, in a process that
    outlives the server; a server killed at any point finds one attempt to
    adopt or settle, as for any job.  Their output shares the job's log.
    """
    count = len(spec.parts)
    groups = {}   # script pid -> (part index, process group)
    for index, part in enumerate(spec.parts):
        _note(log_fd, f"--- part {index + 1} of {count} on {part['worker']} "
                      f"(slots {','.join(map(str, part['slots']))}) ---\n")
        started = _spawn_job(spec, log_fd, setup, part["environment"])
        if isinstance(started, dict):
            for _, group in groups.values():
                _signal_group(group, signal.SIGKILL)
            _wait_for_parts(run_dir, spec, groups)
            os.close(log_fd)
            return {**started,
                    "error": f"part {index + 1} of {count} on {part['worker']} could not start"}
        groups[started[0]] = (index, started[1])
    os.close(log_fd)
    statuses, failed, stopped = _wait_for_parts(run_dir, spec, groups)
    if failed is None:
        return {"exit_code": 0, "signal": None, "error": None}
    status = statuses[failed]
    ended = {"exit_code": os.WEXITSTATUS(status), "signal": None} \
        if os.WIFEXITED(status) else {"exit_code": None, "signal": os.WTERMSIG(status)}
    worker = spec.parts[failed]["worker"]
    if stopped:
        return {**ended, "error": None, "part_worker": worker}
    how = f"exited with status {ended['exit_code']}" if ended["exit_code"] is not None \
        else f"was killed by signal {ended['signal']}"
    return {**ended, "part_worker": worker,
            "error": f"part {failed + 1} of {count} on {worker} {how}" +
                     ("; the other parts were ended" if count > 1 else "")}


def _wait_for_parts(run_dir, spec, groups):
    """_wait_for_group for the parts of a split job, GROUPS {script pid: (part index,
    group)}: returns ({part index: wait status}, the index of the first part
    that failed or None, True if the server asked us to end the job).

    A group found empty is never signalled again: a job runs for hours, and
    its number may by then lead someone else's group."""
    waited = {signal.SIGTERM, signal.SIGCHLD}
    statuses, failed, stopped = {}, None, False
    live = {group for _, group in groups.values()}
    asked = set()           # the groups sent SIGTERM: SIGKILL at the deadline
    kill_deadline = None

    def end(group_ids, grace):
        nonlocal kill_deadline
        for group in group_ids:
            _signal_group(group, signal.SIGTERM)
            asked.add(group)
        deadline = time.monotonic() + grace
        kill_deadline = deadline if kill_deadline is None else min(kill_deadline, deadline)
    while True:
        ended_scripts = []
        for pid, status in _reaped():
            if pid in groups:
                index, group = groups[pid]
                statuses[index] = status
                ended_scripts.append(group)
                if failed is None and not (os.WIFEXITED(status) and
                                           os.WEXITSTATUS(status) == 0):
                    failed = index
        live = {group for group in live if _group_alive(group)}
        # What a part's script left behind goes, as for any job (_wait_for_group);
        # once one part has failed, every other part goes too.
        to_end = (live if failed is not None else live & set(ended_scripts)) - asked
        if to_end:
            end(to_end, DEFAULT_KILL_GRACE)
        if len(statuses) == len(groups) and not live:
            return statuses, failed, stopped
        if not live & asked:
            kill_deadline = None
        if kill_deadline is None:
            received = signal.sigwaitinfo(waited)
        else:
            remaining = kill_deadline - time.monotonic()
            if remaining <= 0:
                for group in live & asked:
                    _signal_group(group, signal.SIGKILL)
                remaining = 1.0
            received = signal.sigtimedwait(waited, remaining)
        if received and received.si_signo == signal.SIGTERM:
            stopped = True
            end(live, _read_grace(run_dir, spec.job_id, spec.attempt))


def _reaped():
    """Reap every child that has ended: [(pid, wait status)]."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def _reap_children(script, script_status):
    """Reap every child that has ended; return SCRIPT's status once known."""
    for pid, status in _reaped():
        if script is not None and pid == script:
            script_status = status
    return script_status


def _terminate_group(pgid, grace):
    _signal_group(pgid, signal.SIGTERM)
    return time.monotonic() + grace


def _signal_group(pgid, number):
    try:
        os.killpg(pgid, number)
    except OSError:
        pass


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def _read_grace(run_dir, job_id, attempt):
    try:
        with open(run_file(run_dir, job_id, attempt, "kill")) as kill_file:
            return float(kill_file.read())
    except (OSError, ValueError):
        return DEFAULT_KILL_GRACE


def _write_file(path, text):
    """Write beside and rename: a reader sees the whole file or none."""
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def _note(log_fd, text):
    """A line of our own in a job's log; a full disk must not cost the outcome."""
    try:
        os.write(log_fd, text.encode(errors="replace"))
    except OSError:
        pass


def _reserve_file(path, size):
    """PATH opened for writing with SIZE bytes of the disk already its own."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_outcome(fd, path, text):
    """Write an outcome into the space reserved for it (see _reserve_file) and rename it
    to PATH.  Should that fail (a full copy-on-write file system, a disk gone
    read-only), keep trying, the lock still held: an outcome is never dropped while
    its run dir exists."""
    import errno
    data = text.encode()
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        written = True
    except OSError:
        written = False
    finally:
        os.close(fd)
    delay = STORAGE_RETRY_FIRST
    gone_since = None
    while True:
        try:
            if written:
                os.replace(path + ".tmp", path)
            else:
                _write_file(path, text)
            return
        except OSError as error:
            if error.errno == errno.ENOENT:
                # The run dir, or the copy reserved in it, is not there: its disk may
                # be being mounted again (after a repair).  Write the outcome whole
                # once it is back; give up only if it stays away.
                written = False
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > OUTCOME_ORPHAN_WAIT:
                    return   # the run dir is gone: nobody could read it
            time.sleep(delay)
            delay = min(2 * delay, STORAGE_RETRY_MAX)


def read_outcome(run_dir, job_id, attempt):
    """What the supervisor of an attempt recorded in its .exit file, or None if it
    recorded nothing.  ValueError: the file is there but unreadable (torn);
    another OSError: it cannot be read now (out of fds, I/O)."""
    try:
        with open(run_file(run_dir, job_id, attempt, "exit")) as exit_file:
            return json.loads(exit_file.read())
    except FileNotFoundError:
        return None


def read_pid(path):
    try:
        with open(path) as pid_file:
            return int(pid_file.read())
    except (OSError, ValueError):
        return None


def supervisor_alive(run_dir, job_id, attempt):
    """True while the supervisor holds its lock, whatever became of its pid."""
    import fcntl
    try:
        lock_fd = os.open(run_file(run_dir, job_id, attempt, "lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(lock_fd)


def end_orphaned_job(supervisor, started):
    """SIGKILL what is left of a job whose supervisor died without recording anything.

    The supervisor's pid is the session id of every process of its job, and
    Linux reuses a pid only once no process has it as its pid, process group or
    session.  So if a live process now has the supervisor's pid (rather than
    the supervisor's own zombie), nothing of the job is left and that process
    belongs to someone else; and pids from before the last boot (the
    supervisor wrote its pid file at STARTED) mean nothing.
    """
    try:
        with open(f"/proc/{supervisor}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                return 0
    except (OSError, IndexError):
        pass
    if started < boot_time():
        return 0
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                session = int(stat.read().rsplit(")", 1)[1].split()[3])
            if session == supervisor:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError, IndexError):
            continue
    return killed


def boot_time():
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_of_job(pid, supervisor):
    """True if process PID belongs to the job whose supervisor is SUPERVISOR.

    The supervisor's pid is the session id of every process of its job, and a
    process that left the session (setsid) is still below the supervisor in the
    process tree: a subreaper, it adopts what its job orphans.  So PID or one of
    its ancestors must be in that session or be the supervisor.  A process outside
    the job cannot make itself either (setsid names a session after the caller,
    and a live supervisor's pid is not reused), whatever its JOB_ID says.
    """
    for _ in range(4096):   # (a depth no real tree has: a guard against a /proc loop)
        if pid == supervisor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            parent, session = int(fields[1]), int(fields[3])
        except (OSError, ValueError, IndexError):
            return False
        if session == supervisor:
            return True
        if parent <= 1:
            return False
        pid = parent
    return False


def pid_file_time(run_dir, job_id, attempt):
    """When the supervisor of an attempt wrote its pid file (now, if it never did)."""
    try:
        return os.stat(run_file(run_dir, job_id, attempt, "pid")).st_mtime
    except OSError:
        return time.time()


def remove_run_files(run_dir, job_id, attempt):
    for kind in ("lock", "pid", "exit", "kill", "exit.tmp", "pid.tmp", "kill.tmp"):
        try:
            os.unlink(run_file(run_dir, job_id, attempt, kind))
        except OSError:
            pass   # what is left is removed at the next start (remove_stray_run_files)


###############################################################################
# SSH for job scripts ##########################################################
###############################################################################

# Jobs find a shim first on their PATH that runs the real ssh, scp or sftp (and
# so rsync and git, which run ssh from PATH) with two additions:
# - the queue's ssh config (start --ssh-config), and the Host entries that map
#   the destinations of workers named with a port or an IPv6 address (see
#   WorkerAddress) to their hosts: one file, jobs_ssh_config;
# - OpenSSH connection sharing: the first connection to a host becomes a
#   background master, later ones are sessions over it, instead of a full SSH
#   handshake each.  Masters live in one owner-only directory per worker; a
#   directory is left alone while a job that uses it runs (stop, restart,
#   remove_slave --wait, edit_slave --no-ssh-reuse wait for that), and its
#   masters are stopped once nothing uses it.  A dead master leaves a socket
#   that refuses connections; ssh then unlinks it and becomes the new master.

SHIMMED_PROGRAMS = ("ssh", "scp", "sftp")
SSH_CONTROL_PERSIST = 120        # seconds an idle master stays for the next job
SSH_MASTER_LOCK_WAIT = 60        # seconds a job waits for another to set up a master
# ssh appends 17 bytes to the ControlPath while it sets up a master, and %C is
# 40: the per-worker directory must leave room under the 107-byte limit.
SSH_CONTROL_DIR_LIMIT = SOCKET_PATH_LIMIT - 17 - 41
SSH_WORKER_KEY_LENGTH = 8
PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+-]*\Z")   # nothing ssh would expand (%, ~)
JOBS_SSH_CONFIG_FILE = "config"  # in the shims' root, beside bin/

# No shell re-parses anything here: "$@" is passed on as it came.  The caller's
# own -S or Control* options win (ssh takes the first value it sees): then the
# shim adds only the config.  When two jobs of a worker start at once, both
# would try to become the master, and the loser would print "ControlSocket ...
# already exists, disabling multiplexing" and go round it: so the first call to
# the worker sets up the master under a lock (ssh -f -N, then a wait of at most
# 5 s for its socket), and the others wait for it.
SSH_SHIM = f"""#!/bin/sh
# Written by cli.py: runs the next $0 on PATH with the queue's ssh config and,
# unless turned off, OpenSSH connection sharing (see cli.py: SSH for job scripts).
program=${{0##*/}}
real=
set -f; IFS=:
for dir in $PATH; do
    if [ -n "$dir" ] && [ "$dir" != "${SSH_SHIM_VARIABLE}" ] && [ -f "$dir/$program" ] &&
            [ -x "$dir/$program" ]; then
        real=$dir/$program; break
    fi
done
unset IFS; set +f
if [ -z "$real" ]; then
    echo "$program: command not found on PATH" >&2; exit 127
fi
if [ "$program" != ssh ]; then
    for arg; do
        case $arg in
            -S*) exec "$real" "$@" ;;    # the caller's own ssh program
        esac
    done
    # scp and sftp run /usr/bin/ssh unless told otherwise: make it this shim.
    exec "$real" -S "${SSH_SHIM_VARIABLE}/ssh" "$@"
fi
config=
# (A config a /tmp cleaner took is written again for the next job: go without.)
[ -f "${SSH_JOBS_CONFIG_VARIABLE}" ] && config=${SSH_JOBS_CONFIG_VARIABLE}
share=${{{SSH_CONTROL_VARIABLE}:+yes}}
to_worker=
for arg; do
    case $arg in
        -S*|*[Cc][Oo][Nn][Tt][Rr][Oo][Ll][MmPp]*) share= ;;
    esac
    if [ -n "$SLAVE_IP" ] && {{ [ "$arg" = "$SLAVE_IP" ] || [ "$arg" = "${{SLAVE_IP#*@}}" ]; }}; then
        to_worker=yes
    fi
done
if [ -n "$config" ]; then
    set -- -F "$config" "$@"
fi
control_dir=${{{SSH_CONTROL_VARIABLE}%/*}}
if [ -z "$share" ] || [ ! -d "$control_dir" ]; then
    # No sharing (turned off, or the caller's own), or its directory is gone
    # (removed by hand, a /tmp cleaner): the call still works, unshared.
    exec "$real" "$@"
fi
has_master() {{
    for entry in "$control_dir"/*; do
        [ -S "$entry" ] && return 0
    done
    return 1
}}
if [ -n "$to_worker" ] && ! has_master && command -v flock >/dev/null 2>&1; then
    (
        flock -w {SSH_MASTER_LOCK_WAIT} 9 || exit 0
        has_master && exit 0
        if [ -n "$config" ]; then set -- -F "$config"; else set --; fi
        "$real" "$@" -o ControlMaster=yes -o "ControlPath=${SSH_CONTROL_VARIABLE}" \\
            -o ControlPersist={SSH_CONTROL_PERSIST} -o BatchMode=yes -f -N -- "$SLAVE_IP" \\
            </dev/null >/dev/null 2>&1 || exit 0
        # ssh -f returns before the master has made its socket.
        tries=0
        while ! has_master && [ $tries -lt 250 ]; do
            sleep 0.02; tries=$((tries + 1))
        done
    ) 9>>"$control_dir/.lock"
fi
exec "$real" -o ControlMaster=auto -o "ControlPath=${SSH_CONTROL_VARIABLE}" \\
    -o ControlPersist={SSH_CONTROL_PERSIST} "$@"
"""


def ssh_reuse_root(data_dir):
    """Where the shims, the jobs' ssh config and the control sockets of DATA_DIR live.

    In the data dir when its path is short and plain; else in an owner-only
    directory under /tmp named by a hash of the data dir, as for the socket.
    """
    root = os.path.join(data_dir, "ssh")
    if len(root) + 1 + SSH_WORKER_KEY_LENGTH <= SSH_CONTROL_DIR_LIMIT and \
            PLAIN_PATH.match(root):
        return root
    return private_tmp_path(data_dir, "ssh-{digest}", 12)


def ssh_control_dir(root, worker):
    import hashlib
    key = hashlib.sha256(worker.encode()).hexdigest()[:SSH_WORKER_KEY_LENGTH]
    return os.path.join(root, key)


def write_ssh_shims(shim_dir):
    """(Re)write the shims, each in one rename so a starting job never sees half."""
    for program in SHIMMED_PROGRAMS:
        path = os.path.join(shim_dir, program)
        _write_file(path + ".new", SSH_SHIM)
        os.chmod(path + ".new", 0o700)
        os.replace(path + ".new", path)


def jobs_ssh_config(worker_names, ssh_config):
    """The ssh config the jobs' ssh reads (through the shim): a Host entry for each
    worker whose destination is an alias, then the queue's ssh config.

    Written only where a job needs it (see Server.ssh_shim_for); None when the
    jobs' ssh can read the user's config as it is.
    """
    entries = {}
    for name in worker_names:
        address = worker_address(name)
        if address.needs_alias:
            entries.setdefault(address.alias, address.config_entry())
    if not entries and ssh_config is None:
        return None
    if ssh_config is None:    # what ssh reads without -F
        includes = ["~/.ssh/config", "/etc/ssh/ssh_config"]
    else:
        includes = [] if ssh_config == "none" else [ssh_config]
    return ("# Written by cli.py for the jobs of this queue (see README: Worker names).\n"
            + "".join(entries.values())
            + "Match all\n" + "".join(f'Include "{path}"\n' for path in includes))


def stop_ssh_masters(control_dir):
    """Ask each master under CONTROL_DIR to stop (sessions in use finish first), then
    remove the directory.  A master that does not answer is left to its
    ControlPersist timeout; its socket goes anyway."""
    import subprocess
    try:
        names = os.listdir(control_dir)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(control_dir, name)
        if name != ".lock":
            try:
                # -F /dev/null: no user config (and no Match exec) for a local request.
                subprocess.run(["ssh", "-F", "/dev/null", "-S", path, "-O", "stop", "cli.py"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=5, check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.unlink(path)
        except OSError:
            pass   # gone, or a read-only disk: nothing to stop the queue for
    try:
        os.rmdir(control_dir)
    except OSError:
        pass   # a job made a new master meanwhile: it times out by itself


class JobsSsh:
    """The job scripts' ssh of one data dir, as the server keeps it: the shims, the
    jobs' ssh config, and a directory of SSH masters per worker."""

    def __init__(self, data_dir, log):
        self.data_dir = data_dir
        self.log = log
        self.root = ssh_reuse_root(data_dir)
        self.shim_dir = os.path.join(self.root, "bin")
        self.config_path = os.path.join(self.root, JOBS_SSH_CONFIG_FILE)
        self.config = None          # its text, while jobs need one (see jobs_ssh_config)
        self.config_missing = False   # its last write failed

    def control_dir(self, worker_name):
        return ssh_control_dir(self.root, worker_name)

    def prepare(self, worker_names, ssh_config):
        """Write the shims and the jobs' ssh config; stop the masters of workers now
        gone (a worker with running jobs is never gone: it drains)."""
        if os.path.dirname(self.root) != self.data_dir:
            make_private_dir(os.path.dirname(self.root))
        make_private_dir(self.root)
        make_private_dir(self.shim_dir)
        write_ssh_shims(self.shim_dir)
        self.write_config(worker_names, ssh_config)
        wanted = {os.path.basename(self.control_dir(name)) for name in worker_names}
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name not in wanted and os.path.isdir(path) and path != self.shim_dir:
                stop_ssh_masters(path)

    def write_config(self, worker_names, ssh_config):
        """(Re)write the jobs' ssh config after the workers or the queue's config changed.
        An old one stays while jobs may read it: only its Host entries could go, and
        only for workers without jobs.  A write that fails (a full disk) is tried
        again before the next job that needs it starts (see shim_for)."""
        text = jobs_ssh_config(worker_names, ssh_config)
        changed = text != self.config
        self.config = text
        if text is not None and changed:
            try:
                _write_file(self.config_path, text)
            except OSError as error:
                self.log.error("cannot write the jobs' ssh config %s (%s); tried again when "
                               "a job needs it", self.config_path, error.strerror)
                self.config_missing = True
                return
        self.config_missing = False

    def shim_for(self, worker, row):
        """(shim dir, ControlPath or None, ssh config or None) for a job of ROW on
        WORKER, or None when its ssh needs nothing of ours."""
        control_path = None
        if worker.ssh_reuse and row["ssh_reuse"]:
            control_dir = self.control_dir(worker.name)
            if not os.path.isdir(control_dir):
                try:
                    os.mkdir(control_dir, 0o700)
                except OSError as error:
                    raise LaunchError(f"cannot create {control_dir}: {error.strerror}") \
                        from None
            control_path = os.path.join(control_dir, "%C")
        ssh_config = None
        if self.config is not None:
            ssh_config = self.config_path
            if self.config_missing or not os.path.exists(ssh_config):
                try:   # its write failed, or a /tmp cleaner took it
                    _write_file(ssh_config, self.config)
                    self.config_missing = False
                except OSError as error:
                    raise LaunchError(f"cannot write {ssh_config}: {error.strerror}") from None
        if control_path is None and ssh_config is None:
            return None
        return self.shim_dir, control_path, ssh_config

    def release(self, worker_names, control_dirs_in_use, jobs_running):
        """At stop: stop the masters that no running job uses; when no job runs, remove
        a root under /tmp whole (shims and config included), which would otherwise
        pile up, one per data dir ever used."""
        for name in worker_names:
            if self.control_dir(name) not in control_dirs_in_use:
                stop_ssh_masters(self.control_dir(name))
        if jobs_running or os.path.dirname(self.root) == self.data_dir:
            return
        import shutil
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and path != self.shim_dir:
                stop_ssh_masters(path)   # a master a job left after its end
        shutil.rmtree(self.root, ignore_errors=True)


###############################################################################
# SSH settings and checks ######################################################
###############################################################################

# The tool's own SSH connections (the add-time check and the health checks) go
# where the jobs' ssh goes: each worker's settings come from `ssh -G`, so that
# OpenSSH itself reads the queue's ssh config (Include, Match and all), and
# fabric connects with them: the same host, port, user and keys, through the
# same ProxyJump hosts or ProxyCommand, with host keys checked against the same
# known_hosts files under the same StrictHostKeyChecking.

SSH_SETTINGS_TIMEOUT = 30.0      # seconds `ssh -G` may take (a Match exec runs commands)
MAX_PROXY_JUMPS = 8              # ProxyJump hosts in a chain, at most
# Keywords that `ssh -G` may print more than once.
REPEATED_SSH_SETTINGS = ("identityfile", "certificatefile", "localforward", "remoteforward",
                         "dynamicforward", "sendenv", "setenv")


class SshConfigError(Exception):
    """ssh cannot make sense of a worker's settings (a bad config file, a loop of
    ProxyJump hosts): the reason, for that worker."""


def ssh_config_arguments(ssh_config):
    """The ssh options that select the queue's ssh config (see start --ssh-config)."""
    return [] if ssh_config is None else ["-F", ssh_config]


def ssh_settings(arguments, ssh_config):
    """What ssh would use to reach the destination in ARGUMENTS (`ssh -G`): {keyword:
    value}, with a list for the keywords that repeat."""
    import subprocess
    try:
        result = subprocess.run(["ssh", *ssh_config_arguments(ssh_config), "-G", *arguments],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                errors="replace", timeout=SSH_SETTINGS_TIMEOUT)
    except FileNotFoundError:
        raise SshConfigError("the ssh client is not installed (apt-get install "
                             "openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise SshConfigError(f"ssh -G took over {SSH_SETTINGS_TIMEOUT:g}s to read the ssh "
                             "config (a Match exec that hangs?)") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines()
                 if line.strip() and "terminating" not in line]
        raise SshConfigError("ssh cannot read its config: " +
                             (lines[0] if lines else f"ssh -G exited with {result.returncode}"))
    settings = {}
    for line in result.stdout.splitlines():
        keyword, _, value = line.partition(" ")
        if keyword in REPEATED_SSH_SETTINGS:
            settings.setdefault(keyword, []).append(value)
        else:
            settings[keyword] = value
    return settings


def expand_ssh_tokens(text, settings, name):
    """TEXT with the % tokens ssh expands in IdentityFile, CertificateFile and
    ProxyCommand (`ssh -G` prints them as written)."""
    import getpass
    tokens = {"%": "%", "h": settings["hostname"], "p": settings["port"],
              "r": settings["user"], "n": name, "u": getpass.getuser(),
              "d": os.path.expanduser("~"), "i": str(os.getuid()),
              "L": socket.gethostname().split(".")[0], "l": socket.gethostname()}
    return re.sub(r"%(.)", lambda match: tokens.get(match[1], match[0]), text)


def worker_settings(address, ssh_config):
    """ssh_settings of a worker, resolved as the jobs' ssh resolves it."""
    return ssh_settings(address.resolve_arguments(), ssh_config)


def resolved_endpoint(settings):
    """SLAVE_HOST, SLAVE_PORT and SLAVE_USER from a worker's settings."""
    return {"host": settings["hostname"], "port": int(settings["port"]),
            "user": settings["user"]}


def check_alias_port(address, ssh_config):
    """Refuse host:port where host is an alias of the user's ssh config: the jobs' Host
    entry could only send them to the alias's name (None if fine)."""
    if address.port is None:
        return None
    settings = ssh_settings(["--", address.host], ssh_config)
    if settings.get("hostname") not in (address.host, None):
        return (f"{address.host} is an alias of your ssh config (HostName "
                f"{settings['hostname']}): set Port {address.port} in its Host entry and add "
                f"it as {address.user + '@' if address.user else ''}{address.host}")
    return None


class HostKeyCheck:
    """A server's host key checked as OpenSSH checks it for the same settings: the keys
    of UserKnownHostsFile and GlobalKnownHostsFile (hashed entries and [host]:port
    entries included) under HostKeyAlias or the host, and StrictHostKeyChecking for
    a host none of them knows.  Paramiko does the comparison (and prefers the key
    types known): we hand it the keys found, and act as its missing-key policy."""

    def __init__(self, name, settings):
        import paramiko
        host, port = settings["hostname"], int(settings["port"])
        self.name = name
        self.strict = settings.get("stricthostkeychecking", "ask")
        self.lookup_name = settings.get("hostkeyalias") or \
            (host if port == 22 else f"[{host}]:{port}")
        self.paramiko_name = host if port == 22 else f"[{host}]:{port}"
        self.files = [os.path.expanduser(path) for keyword in ("userknownhostsfile",
                                                                "globalknownhostsfile")
                      for path in settings.get(keyword, "").split()]
        self.known = {}   # key type -> (key, the file it came from)
        self.revoked = set()          # keys marked @revoked
        self.unjudged = False         # entries only ssh can match: patterns, @cert-authority
        for path in self.files:
            keys = paramiko.HostKeys()
            try:
                with open(path, encoding="utf-8", errors="replace") as known_hosts:
                    for line in known_hosts:
                        self.read_line(line, keys)
            except OSError:
                continue   # missing or unreadable: ssh skips it too
            for key_type, key in (keys.lookup(self.lookup_name) or {}).items():
                self.known.setdefault(key_type, (key, path))

    def read_line(self, line, keys):
        """One line of a known_hosts file into KEYS; a line ssh could not read either is
        skipped, as ssh skips it."""
        import paramiko
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            return
        marker = fields.pop(0) if fields[0].startswith("@") else None
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(" ".join(fields))
        except Exception:   # noqa: BLE001 - bad base64, unknown key types, ...
            return
        if entry is None:
            return
        if marker == "@revoked":
            self.revoked.add(entry.key.asbytes())
        elif marker or any(re.search(r"[*?!]", name) for name in entry.hostnames):
            self.unjudged = True
        else:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)

    def install(self, client):
        client.set_missing_host_key_policy(self)
        if self.strict in ("false", "no", "off"):
            return   # ssh lets a changed key through, and adds new ones
        for key_type, (key, _) in self.known.items():
            client.get_host_keys().add(self.paramiko_name, key_type, key)

    def missing_host_key(self, client, hostname, key):
        """No known key of this host: accepted only as ssh would accept it (or when
        a pattern or certificate authority may vouch for it, which only ssh can
        judge)."""
        import paramiko
        if key.asbytes() in self.revoked:
            raise paramiko.SSHException(f"the host key of {self.lookup_name} is revoked "
                                        "(@revoked in known_hosts)")
        if self.strict in ("false", "no", "off", "accept-new") or self.unjudged:
            return
        files = self.files[:1] or ["~/.ssh/known_hosts"]
        raise paramiko.SSHException(
            f"the host key of {self.lookup_name} is not known (not in "
            f"{' or '.join(self.files) or 'any known_hosts file'}), and StrictHostKeyChecking "
            f"is {self.strict}: check the key and record it with ssh {self.name} once, or "
            f"ssh-keyscan {self.keyscan_arguments()} >> {files[0]}")

    def keyscan_arguments(self):
        host, _, port = self.paramiko_name.strip("[").partition("]:")
        return f"-p {port} {host}" if port else host

    def changed(self, offered):
        """The reason for a key that differs from the known one."""
        path = next(iter(self.known.values()))[1] if self.known else self.files[0]
        return (f"host key of {self.name} changed: {self.lookup_name} now offers "
                f"{offered.get_name()} {offered.fingerprint}, not the key in {path}; if that "
                f"is expected (a reinstalled host), remove the old key with ssh-keygen -R "
                f"'{self.lookup_name}' -f {path}, then accept the new one (ssh {self.name})")


class WorkerConnection:
    """A fabric connection to where ssh goes for a worker: the host, port, user and keys
    of its settings, through its ProxyJump hosts or ProxyCommand, with host keys
    checked (HostKeyCheck).  Never prompts: only keys and the agent are tried."""

    def __init__(self, name, settings, timeout, ssh_config, jumps=0):
        import paramiko
        from fabric import Config, Connection
        self.name = name
        self.settings = settings
        self.gateway = None       # the WorkerConnection of the last ProxyJump host
        self.proxy = None         # the ProxyCommand's process, while connected
        self.proxy_errors = None
        self.opened_at = 0.0
        jump = settings.get("proxyjump", "none")
        if jump != "none":
            if jumps >= MAX_PROXY_JUMPS:
                raise SshConfigError(f"more than {MAX_PROXY_JUMPS} ProxyJump hosts in a row "
                                     "(a loop in the ssh config?)")
            *earlier, last = jump.split(",")
            self.gateway = WorkerConnection.jump_host(last, earlier, timeout, ssh_config,
                                                      jumps + 1)
        identities_only = settings.get("identitiesonly") == "yes"
        keys = [path for path in (os.path.expanduser(expand_ssh_tokens(path, settings, name))
                                  for path in settings.get("identityfile", []))
                if os.path.isfile(path)]
        # An empty SSHConfig: fabric must not read the ssh config itself (its parser
        # knows no Include nor Match); ssh -G has done that.
        self.connection = Connection(
            settings["hostname"], user=settings["user"], port=int(settings["port"]),
            config=Config(ssh_config=paramiko.SSHConfig()),
            gateway=self.gateway.connection if self.gateway else False,
            connect_timeout=timeout,
            connect_kwargs={"banner_timeout": timeout, "auth_timeout": timeout,
                            "allow_agent": not identities_only, "look_for_keys": False,
                            "key_filename": keys})
        self.host_keys = HostKeyCheck(name, settings)
        self.host_keys.install(self.connection.client)

    @classmethod
    def of(cls, name, timeout, ssh_config):
        address = worker_address(name)
        return cls(name, worker_settings(address, ssh_config), timeout, ssh_config)

    @classmethod
    def jump_host(cls, hop, earlier, timeout, ssh_config, jumps):
        """A ProxyJump host, [user@]host[:port] or ssh://..., reached through the EARLIER
        ones (as ssh -J does: they replace the hop's own ProxyJump)."""
        hop = hop.removeprefix("ssh://")
        user, at, rest = hop.rpartition("@")
        host, port = rest, None
        match = re.fullmatch(r"\[([^\]]+)\](?::([0-9]+))?|([^:]+)(?::([0-9]+))?", rest)
        if match:
            host, port = match[1] or match[3], match[2] or match[4]
        arguments = (["-J", ",".join(earlier)] if earlier else []) + \
            (["-l", user] if at else []) + (["-p", port] if port else []) + ["--", host]
        return cls(hop, ssh_settings(arguments, ssh_config), timeout, ssh_config, jumps)

    def links(self):
        """This connection and the jump hosts it goes through, nearest first."""
        link = self
        while link is not None:
            yield link
            link = link.gateway

    @property
    def is_connected(self):
        return self.connection.is_connected

    def open(self):
        for link in self.links():
            if link.settings.get("proxycommand", "none") != "none":
                link.connection.connect_kwargs["sock"] = link.start_proxy()
        self.connection.open()
        self.opened_at = time.time()
        sock = self.connection.client.get_transport().sock
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Nagle's algorithm holds back paramiko's small packets: ~40 ms a run.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start_proxy(self):
        """Run the ProxyCommand as ssh does (the user's shell, `exec`, %h %p %r %n
        expanded) on one end of a socket pair; return the other end."""
        import subprocess
        import tempfile
        self.stop_proxy()
        command = expand_ssh_tokens(self.settings["proxycommand"], self.settings, self.name)
        ours, theirs = socket.socketpair()
        self.proxy_errors = tempfile.TemporaryFile()
        try:
            self.proxy = subprocess.Popen(
                [os.environ.get("SHELL") or "/bin/sh", "-c", f"exec {command}"],
                stdin=theirs, stdout=theirs, stderr=self.proxy_errors, start_new_session=True)
        except OSError:
            ours.close()
            self.proxy_errors.close()
            raise
        finally:
            theirs.close()
        return ours

    def proxy_failure(self):
        """What the ProxyCommand said, if it has ended."""
        for link in self.links():
            if link.proxy is not None and link.proxy.poll() is not None:
                link.proxy_errors.seek(0)
                said = link.proxy_errors.read().decode(errors="replace").strip().splitlines()
                return (f"its ProxyCommand exited with status {link.proxy.returncode}"
                        + (f": {said[-1]}" if said else ""))
        return None

    def stop_proxy(self):
        if self.proxy is not None:
            try:
                os.killpg(self.proxy.pid, signal.SIGKILL)   # whatever it started too
            except OSError:
                pass
            self.proxy.wait()
            self.proxy_errors.close()
            self.proxy = None

    def run_true(self, timeout):
        return self.connection.run("true", hide=True, warn=True, timeout=timeout,
                                   in_stream=False)

    def close(self):
        for link in self.links():
            link.connection.close()
            link.stop_proxy()

    def changed_key(self, error):
        """The reason for a BadHostKeyException from this connection or a jump host."""
        for link in self.links():
            if link.settings["hostname"] == error.hostname:
                return link.host_keys.changed(error.key)
        return self.host_keys.changed(error.key)


def check_hosts(hosts, timeout, ssh_config, progress=None):
    """Log in to each worker with fabric, 32 at a time, and run `true`; PROGRESS (a
    CheckProgress), if given, hears of each result.

    Returns {host: (None or the reason it failed, its endpoint or None)}."""
    import logging
    from concurrent.futures import ThreadPoolExecutor, as_completed
    require("fabric")   # here, not in the threads: one clear error for a missing package
    # Paramiko's transport thread logs its own copy of each failure; we report
    # the reason per host instead.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL + 1)
    results = {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = {pool.submit(check_new_host, host, timeout, ssh_config): host
                   for host in hosts}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress.checked(len(results), len(hosts), results[futures[future]][0])
    if progress is not None:
        progress.clear()
    return {host: results[host] for host in hosts}


class CheckProgress:
    """add_slave's line on a terminal while many hosts are checked."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.failed = 0
        self.width = 0

    def checked(self, done, total, reason):
        self.failed += reason is not None
        if self.enabled:
            text = f"checked {done}/{total} host(s), {self.failed} failed"
            sys.stderr.write("\r" + text.ljust(self.width))
            sys.stderr.flush()
            self.width = len(text)

    def clear(self):
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def check_new_host(name, timeout, ssh_config):
    """add_slave's check of one worker: (reason or None, endpoint or None)."""
    try:
        address = parse_worker_name(name)
        reason = check_alias_port(address, ssh_config)
        if reason:
            return reason, None
        connection = WorkerConnection(name, worker_settings(address, ssh_config), timeout,
                                      ssh_config)
    except (SshConfigError, UserError) as error:
        return str(error), None
    except Exception as error:   # noqa: BLE001 - any reason is reported for its host
        return f"{type(error).__name__}: {error}", None
    return check_host(connection, timeout), resolved_endpoint(connection.settings)


def resolve_new_hosts(hosts, ssh_config):
    """add_slave --skip_ssh_auth_check: no login, only what ssh's config says of each
    name: {host: (reason it cannot work or None, endpoint or None)}.

    An `ssh -G` costs ~6 ms of CPU.  Up to RESOLVED_AT_ONCE hosts are resolved
    here, in one parallel round; more are left to the server's health checker,
    which resolves workers without an endpoint in the background (jobs that
    start before it has take SLAVE_HOST/PORT/USER from the name), so that 500
    hosts are added in well under a second.  A name with a port is always
    looked at here: host:port is refused where host is an alias.
    """
    from concurrent.futures import ThreadPoolExecutor
    resolve_all = len(hosts) <= RESOLVED_AT_ONCE

    def resolve(name):
        address = parse_worker_name(name)
        try:
            reason = check_alias_port(address, ssh_config)
            if reason or not resolve_all:
                return reason, None
            return None, resolved_endpoint(worker_settings(address, ssh_config))
        except SshConfigError:
            return None, None   # the health checker resolves it later, or the job says why
    looked_at = [host for host in hosts if resolve_all or parse_worker_name(host).port]
    results = dict.fromkeys(hosts, (None, None))
    if looked_at:
        with ThreadPoolExecutor(max_workers=min(RESOLVED_AT_ONCE, len(looked_at))) as pool:
            results.update(zip(looked_at, pool.map(resolve, looked_at)))
    return results


def check_host(connection, timeout, keep=False):
    """Log in through CONNECTION (a WorkerConnection, opened first if it is not) and run
    `true`: None if that worked, else the reason.  Closed after, unless KEEP."""
    import paramiko
    host = connection.name
    started = time.monotonic()
    try:
        if not connection.is_connected:
            connection.open()
        result = connection.run_true(timeout)
        if result.exited != 0:
            return f"logged in, but `true` exited with status {result.exited}"
        return None
    except paramiko.PasswordRequiredException:
        return "the private key is encrypted: load it into ssh-agent (ssh-add) first"
    except paramiko.BadHostKeyException as error:
        return connection.changed_key(error)
    except paramiko.AuthenticationException:
        return (f"authentication refused: no key or agent identity was accepted "
                f"(set up a key with: ssh-copy-id {host})")
    except paramiko.ssh_exception.NoValidConnectionsError as error:
        reasons = {getattr(cause, "strerror", None) or str(cause)
                   for cause in error.errors.values()}
        if all(isinstance(cause, ConnectionRefusedError) for cause in error.errors.values()):
            return "connection refused: no SSH server listens on that port"
        return "cannot connect: " + "; ".join(sorted(reasons))
    except socket.gaierror as error:
        return f"unknown host: the name does not resolve ({error.strerror})"
    except (socket.timeout, TimeoutError):
        return f"timed out after {timeout:g}s: the host did not answer"
    except ConnectionRefusedError:
        return "connection refused: no SSH server listens on that port"
    except paramiko.SSHException as error:
        text = str(error)
        proxy = connection.proxy_failure()
        if proxy:
            return proxy
        if text.startswith("the host key of"):
            return text   # from HostKeyCheck
        # A host that accepts TCP but never speaks ends in "No existing session"
        # once the connect timeout has passed; one that closes at once, sooner.
        if "banner" in text.lower() or "no existing session" in text.lower():
            if time.monotonic() - started < timeout * 0.9:
                return ("the connection was closed before the SSH server greeted: not an SSH "
                        "server on that port, or sshd turned it away (MaxStartups, a firewall "
                        "or TCP wrapper)")
            return f"timed out after {timeout:g}s waiting for the SSH server to greet"
        return f"SSH error: {text}"
    except (EOFError, ConnectionResetError):
        return connection.proxy_failure() or \
            "the connection was closed before the SSH server greeted"
    except OSError as error:
        return f"cannot connect: {error.strerror or error}"
    except Exception as error:   # noqa: BLE001 - any reason is reported for its host
        return f"{type(error).__name__}: {error}"
    finally:
        if not keep:
            connection.close()


def health_checker_main():
    """The server's health checker (cli.py _health_checker), a process of its own so
    that no check ever holds up the server's event loop.

    It reads the workers to check, the interval, the timeout and the ssh config as
    JSON lines on stdin, checks each worker with fabric once per interval, at
    most HEALTH_CHECKS_AT_ONCE at a time, over one connection per worker kept
    open between checks (and replaced when it fails), and writes one JSON line
    per check: {"worker", "reason" (null if it passed), "at", "started", "endpoint"
    (its host, port and user, as ssh resolves them)}; "started" is when the
    connection it went over was opened, if that was earlier.  Workers in
    "resolve" only get their endpoint; those in "fresh" are checked over a new
    connection.  EOF on stdin (the server is gone) ends it.
    """
    import logging
    require("fabric")
    logging.getLogger("paramiko").setLevel(logging.CRITICAL + 1)
    request = {"workers": [], "interval": DEFAULT_CHECK_INTERVAL,
               "timeout": DEFAULT_SSH_TIMEOUT, "ssh_config": None, "resolve": []}
    connections = {}
    lines = LineReader()

    def check(host):
        timeout, ssh_config = request["timeout"], request["ssh_config"]
        started = time.time()
        connection = connections.pop(host, None)
        if connection is not None and host in request.get("fresh", ()):
            # A connection from before the worker was set aside would prove
            # nothing of its host key now: a new handshake does.
            connection.close()
            connection = None
        # A check over a connection from before then proves nothing newer.
        since = connection.opened_at if connection is not None else started
        endpoint = None
        try:
            connection = connection or WorkerConnection.of(host, timeout, ssh_config)
            endpoint = resolved_endpoint(connection.settings)
            reason = check_host(connection, timeout, keep=True)
        except SshConfigError as error:
            connection, reason = None, str(error)
        except Exception as error:   # noqa: BLE001 - a bad check must not end the checker
            connection, reason = None, f"{type(error).__name__}: {error}"
        if reason is None:
            connections[host] = connection
        elif connection is not None:
            connection.close()
        return {"worker": host, "reason": reason, "at": time.time(), "started": since,
                "endpoint": endpoint}

    def resolve(host):
        try:
            settings = worker_settings(worker_address(host), request["ssh_config"])
            return {"worker": host, "endpoint": resolved_endpoint(settings)}
        except Exception:   # noqa: BLE001 - SshConfigError and worse: resolved later
            return None

    # The server stops it with SIGTERM: close the connections (and end their
    # ProxyCommands, which have sessions of their own) on the way out.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(0))
    try:
        check_rounds(request, connections, lines, check, resolve)
    except BrokenPipeError:
        pass   # the server went away (stopped, or killed -9) while a result was written
    finally:
        for connection in list(connections.values()):
            connection.close()


def check_rounds(request, connections, lines, check, resolve):
    """health_checker_main's loop: requests in, a round of checks per interval out."""
    import select
    from concurrent.futures import ThreadPoolExecutor
    next_round = time.monotonic()
    with ThreadPoolExecutor(max_workers=HEALTH_CHECKS_AT_ONCE) as pool:
        while True:
            wait = max(0.0, next_round - time.monotonic()) if request["workers"] else None
            if select.select([0], [], [], wait)[0]:
                chunk = os.read(0, 1 << 16)
                if not chunk:
                    break
                for line in lines.feed(chunk):
                    new = json.loads(line)
                    if new.get("ssh_config") != request["ssh_config"]:
                        for connection in connections.values():
                            connection.close()
                        connections.clear()
                    request.update(new)
                    for host in set(connections) - set(request["workers"]):
                        connections.pop(host).close()
                    for result in pool.map(resolve, request.get("resolve") or []):
                        if result:
                            os.write(1, json.dumps(result).encode() + b"\n")
                    request["resolve"] = []
                    if new.get("now"):
                        next_round = time.monotonic()
                continue
            for result in pool.map(check, list(request["workers"])):
                os.write(1, json.dumps(result).encode() + b"\n")
            next_round = time.monotonic() + request["interval"]


###############################################################################
# Timers #######################################################################
###############################################################################

class RetryDelay:
    """The one pause policy for work the disk refused (full, read-only, failing):
    half a second, doubling up to STORAGE_RETRY_MAX while the fault lasts.  No
    event may come once the disk has room again: a timer must."""

    def __init__(self):
        self.seconds = 0.0

    def next(self):
        self.seconds = min(2 * self.seconds or STORAGE_RETRY_FIRST, STORAGE_RETRY_MAX)
        return self.seconds

    def reset(self):
        self.seconds = 0.0


class Timers:
    """The server's one clock: start times, timeouts, retries after storage
    faults, a new health checker.  The loop sleeps until the first of them."""

    def __init__(self, log, storage_errors, attempts_running=lambda: 0):
        self.log = log
        self.storage_errors = storage_errors   # what a refused write raises
        self.attempts_running = attempts_running
        self.heap = []             # (when, sequence, callback, attempt)
        self.sequence = 0

    def add(self, when, callback, attempt=None):
        """Call CALLBACK at WHEN; a timer of an ATTEMPT goes once the attempt has ended."""
        import heapq
        if len(self.heap) > 2 * self.attempts_running() + 1000:
            # Timeouts of attempts that ended early would pile up for as long as
            # their deadlines: drop them.
            self.heap = [timer for timer in self.heap
                         if timer[3] is None or not timer[3].ended]
            heapq.heapify(self.heap)
        self.sequence += 1
        heapq.heappush(self.heap, (when, self.sequence, callback, attempt))

    def timeout(self):
        """How long select() may sleep: until the next timer, or for ever."""
        if not self.heap:
            return None
        # epoll takes at most 2**31 ms (24.8 days): a start time or timeout further
        # off would end the loop with OverflowError.  Waking early is harmless.
        return min(max(0.0, self.heap[0][0] - time.time()), MAX_SELECT_TIMEOUT)

    def due(self):
        """The callbacks whose time has come, in order, taken off the heap."""
        import heapq
        now = time.time()
        while self.heap and self.heap[0][0] <= now:
            yield heapq.heappop(self.heap)[2]

    def until_saved(self, what, change, then=None, delay=None):
        """Make CHANGE, which writes to the database (or reads run files) and must not
        be dropped: it follows a change already committed, or an event that will
        not come again.  While the disk refuses it, try again after a pause
        (RetryDelay); once it is made, call THEN (never retried)."""
        try:
            change()
        except self.storage_errors as error:
            if delay is None:
                delay = RetryDelay()
                self.log.error("%s: cannot be saved yet (%s); tried again until it can",
                               what, error)
            self.add(time.time() + delay.next(),
                     lambda: self.until_saved(what, change, then, delay))
            return
        if delay is not None:
            self.log.info("%s: saved now", what)
        if then is not None:
            then()


###############################################################################
# Queue: the lifecycle of jobs and workers #####################################
###############################################################################

# Queue (jobs) and Workers are the only code that writes to the Store (but for
# Hooks, which writes its own hook_runs rows, never a job's).  Each
# change is one transaction (Changes); the in-memory copies (Worker, what wait
# clients know) follow once it is committed, never before.  What the rest of
# the server must hear of goes through Events, which the Server implements.


class Changes:
    """One transaction of the lifecycle, and what follows once it is committed:
    in-memory copies updated, the jobs that moved announced.  Nothing of it
    happens if the transaction rolls back."""

    def __init__(self, store, events):
        self.transaction = store.transaction()
        self.events = events
        self.hooks = []

    def __enter__(self):
        self.transaction.__enter__()
        return self

    def __exit__(self, kind, error, trace):
        self.transaction.__exit__(kind, error, trace)   # raises if COMMIT fails
        if kind is None:
            for hook in self.hooks:
                hook()
        return False

    def then(self, hook):
        self.hooks.append(hook)

    def moved(self, job_ids, state, wake=True):
        """JOB_IDS are now in STATE: clients hear of it, and (WAKE) the scheduler
        looks at the queue again if they may start or freed slots."""
        if job_ids:
            self.then(lambda: self.events.jobs_moved(job_ids, state))
            if wake and state != JobState.RUNNING:
                self.then(self.events.room_changed)


class Events:
    """What the lifecycle tells the rest of the server (see Server, which wires it)."""

    def jobs_moved(self, job_ids, state):
        """JOB_IDS are now in STATE: wait clients follow."""

    def jobs_removed(self, job_ids):
        """JOB_IDS left the queue before they ran (remove_job, load_status)."""

    def worker_unusable(self, name, why):
        """Worker NAME takes no new job any more (WHY: down, set aside, being removed):
        the service replicas it runs move elsewhere."""

    def workers_changed(self, names=()):
        """Workers were added, edited, drained or removed: the jobs' ssh config and the
        health checks follow, --on jobs may be stranded, and the SSH masters of NAMES
        (gone, or no longer sharing connections) may go."""

    def room_changed(self):
        """Slots may be free where they were not: time to look at the queue."""

    def kills_recorded(self, job_ids, grace):
        """Kills of the running JOB_IDS were just committed: their supervisors are
        told (TERM, then KILL after GRACE)."""

    def health_watch_changed(self):
        """A worker was set aside or taken back: the health checker's list changes."""


class Worker:
    """A registered worker as the server keeps it in memory (the database has the same)."""

    def __init__(self, row):
        self.name = row["name"]
        self.slots = row["slots"]
        self.variables = json.loads(row["variables"])
        self.state = WorkerState(row["state"])
        self.ssh_checked = bool(row["ssh_checked"])
        self.ssh_reuse = bool(row["ssh_reuse"])
        self.health = WorkerHealth(row["health"])
        self.checked_at = row["checked_at"]
        self.check_reason = row["check_reason"]
        self.endpoint = {"host": row["ssh_host"], "port": row["ssh_port"],
                         "user": row["ssh_user"]} if row["ssh_host"] is not None else None
        self.down_after = row["down_after"]
        self.failures_in_row = []   # how its last attempts failed to reach it (weigh_attempt)
        self.works = False          # its last attempt that said anything went well
        self.set_aside_at = 0.0     # when weigh_attempt last set it aside
        self.busy_slots = set()
        self.resources_column = row["resources"]   # its GPUs, memory, named resources
        self.resources = json.loads(row["resources"] or "{}")
        # (job id, attempt) -> (expected end or None, its slots here, its grant or None): what
        # runs on it, for the resources held and the backfill of plan_starts.
        self.running = {}
        self.grants_held = 0   # how many of those hold a grant (none: nothing to reckon)

    def job_endpoint(self):
        """SLAVE_HOST, SLAVE_PORT and SLAVE_USER: as ssh resolved them, or (until the
        health checker has done so) as the name gives them."""
        if self.endpoint is not None:
            return self.endpoint
        import getpass
        address = worker_address(self.name)
        return {"host": address.host, "port": address.port or 22,
                "user": address.user or getpass.getuser()}

    def capacity(self):
        return WorkerCapacity(self.name, self.slots, self.busy_slots,
                              self.state == WorkerState.ACTIVE and
                              self.health == WorkerHealth.UP, self.free_resources(),
                              self.running.values())

    def free_resources(self):
        """Its Resources, less the grants of the jobs running on it (NO_RESOURCES if it
        declares none and none are held: the common case costs nothing)."""
        if not self.resources and not self.grants_held:
            return NO_RESOURCES
        return Resources(self.resources.get("gpus", ()), self.resources.get("mem", 0),
                         self.resources.get("named"),
                         [grant for _, _, grant in self.running.values() if grant])

    def resources_json(self):
        """Each resource it declares (or that running jobs still hold after an edit)
        as {"total", "used"}; GPUs with their device ids and which are in use."""
        if not self.resources and not self.grants_held:
            return {}
        free = self.free_resources()
        declared = set(free.devices)   # (a device edited away is used by its holders alone)
        used = {device: GPU_UNITS * (device in declared) - share
                for device, share in free.gpu_free.items()}
        shown = {}
        if free.gpu_free:
            shown["gpus"] = {"total": len(free.devices),
                             "used": sum(used.values()) / GPU_UNITS,
                             "ids": free.devices,
                             "in_use": {device: amount / GPU_UNITS
                                        for device, amount in used.items() if amount}}
        if free.mem_total or free.mem_free:
            shown["mem"] = {"total": free.mem_total, "used": free.mem_total - free.mem_free}
        for name in dict.fromkeys([*free.named_total, *free.named_free]):
            total = free.named_total.get(name, 0)
            shown[name] = {"total": total, "used": total - free.named_free.get(name, 0)}
        return shown

    def to_json(self, running_jobs):
        """The worker as status shows it, with the jobs (JSON) running on it."""
        if self.health != WorkerHealth.UP:
            status = "down"
        elif self.state == WorkerState.ACTIVE:
            status = "busy" if self.busy_slots else "idle"
        else:
            status = self.state.value
        return {
            "ip": self.name, "envs": self.variables, "status": status,
            "state": self.state.value, "slots": self.slots,
            "slots_in_use": len(self.busy_slots),
            "running_job": running_jobs[0] if running_jobs else None,
            "running_jobs": running_jobs, "ssh_checked": self.ssh_checked,
            "ssh_reuse": self.ssh_reuse, "health": self.health.value,
            "checked_at": iso_time(self.checked_at), "check_reason": self.check_reason,
            "endpoint": self.job_endpoint(), "down_after": self.down_after,
            "resources": self.resources_json()}


class Workers:
    """The workers' lifecycle: added, edited, paused, drained and removed, up, down
    or set aside; and the slots their running attempts hold."""

    def __init__(self, store, timers, events, log):
        self.store = store
        self.timers = timers
        self.events = events
        self.log = log
        self.by_name = {}          # name -> Worker, in the order they were added
        self.down_after = DEFAULT_DOWN_AFTER   # the server's --down-after

    def __iter__(self):
        return iter(self.by_name)

    def __contains__(self, name):
        return name in self.by_name

    def get(self, name):
        return self.by_name.get(name)

    def all(self):
        return list(self.by_name.values())

    def load(self, down_after):
        if down_after is not None:
            with self.store.transaction():
                self.store.set_setting("down_after", down_after)
        self.down_after = self.store.setting("down_after", DEFAULT_DOWN_AFTER)
        self.by_name = {row["name"]: Worker(row) for row in self.store.worker_rows.all()}

    def named(self, host):
        """The worker HOST, or an error that says how to see the registered ones."""
        if host not in self.by_name:
            raise UserError(f"unknown worker {host!r}; see ./cli.py status for the "
                            "registered workers")
        return self.by_name[host]

    def capacities(self):
        return [worker.capacity() for worker in self.by_name.values()]

    def down_after_of(self, worker_name):
        """The failures in a row that set this worker aside (0: never)."""
        worker = self.by_name.get(worker_name)
        if worker is not None and worker.down_after is not None:
            return worker.down_after
        return self.down_after

    def change_state(self, changes, worker, new):
        """The one way a worker's state changes: checked and saved (Store), then kept
        in memory once CHANGES commits."""
        self.store.worker_rows.change_state(worker.name, worker.state, new)
        changes.then(lambda: setattr(worker, "state", new))

    # --- commands ---------------------------------------------------------

    def add(self, hosts, slots, variables, ssh_checked, ssh_reuse, down_after, endpoints,
            slots_of, resources=None):
        """Register HOSTS, all or none, with SLOTS each (or those of SLOTS_OF) and
        RESOURCES (see migration 13)."""
        entries = {address.alias: address.config_entry()
                   for address in map(worker_address, self.by_name) if address.needs_alias}
        for host in hosts:
            if host in self.by_name:
                raise UserError(already_registered(host))
            address = parse_worker_name(host)
            if address.needs_alias and \
                    entries.setdefault(address.alias, address.config_entry()) != \
                    address.config_entry():
                raise UserError(f"worker {host} would reach its jobs as {address.alias}, which "
                                "another worker already names another way: give it a Host "
                                "alias in your ssh config and add that instead")
        with self.store.transaction():
            for host in hosts:
                self.store.worker_rows.insert(host, slots_of.get(host, slots), variables,
                                         ssh_checked, ssh_reuse=ssh_reuse,
                                         endpoint=endpoints.get(host), down_after=down_after,
                                         resources=resources)
        for row in self.store.worker_rows.all():
            if row["name"] in hosts:
                self.by_name[row["name"]] = Worker(row)
                self.log.info("worker %s: added with %d slot(s)%s", row["name"], row["slots"],
                              f" and {resources_text(row['resources'])}"
                              if row["resources"] else "")
        self.events.workers_changed()

    def drain(self, host):
        """HOST takes no new job and goes when its last one ends."""
        worker = self.by_name[host]
        if worker.state == WorkerState.DRAINING:
            return
        with Changes(self.store, self.events) as changes:
            self.change_state(changes, worker, WorkerState.DRAINING)
        self.log.info("worker %s: draining; removed when its jobs end", host)
        self.events.workers_changed()
        self.events.worker_unusable(host, "being removed")

    def forget(self, name):
        """Remove a worker without running jobs."""
        with self.store.transaction():
            self.store.worker_rows.delete(name)
        del self.by_name[name]
        self.log.info("worker %s: removed", name)
        self.events.workers_changed([name])

    def forget_if_drained(self, worker):
        """A draining worker goes once its last job has ended (and the database takes it)."""
        def forget():
            if worker.state == WorkerState.DRAINING and not worker.busy_slots and \
                    self.by_name.get(worker.name) is worker:
                self.forget(worker.name)
        self.timers.until_saved(f"worker {worker.name}: removing it, drained", forget)

    def set_paused(self, hosts, paused):
        """Pause or resume the workers HOSTS; resume also takes back a set-aside one."""
        old, new = (WorkerState.ACTIVE, WorkerState.PAUSED) if paused else \
            (WorkerState.PAUSED, WorkerState.ACTIVE)
        for host in hosts:
            if self.named(host).state == WorkerState.DRAINING:
                raise UserError(f"worker {host} is being removed (remove_slave --wait)")
        changing = [self.by_name[host] for host in hosts if self.by_name[host].state == old]
        with Changes(self.store, self.events) as changes:
            for worker in changing:
                self.change_state(changes, worker, new)
        for worker in changing:
            self.log.info("worker %s: %s", worker.name, new.value)
        self.events.room_changed()
        if not paused:
            # resume HOST also takes back a worker set aside for failing jobs.
            for host in hosts:
                worker = self.by_name[host]
                if worker.health == WorkerHealth.SET_ASIDE or worker.set_aside_at:
                    self.set_health(worker, WorkerHealth.UP, None, time.time())

    def edit(self, hosts, slots, updates, unset, ssh_reuse, down_after, resources=None):
        """Change the slots, variables, connection sharing, --down-after (ABSENT:
        unchanged) or RESOURCES (a change: see _worker_resources) of the workers
        HOSTS, all or none.  Running jobs are not touched: they keep what they
        hold, and what a worker no longer has frees only as they end."""
        edits = []
        for host in hosts:
            worker = self.named(host)
            for name in unset:
                validate_variable_name(name)
                if name in updates:
                    raise UserError(f"{name} is both set (-e) and unset (--unset): choose one")
                if name not in worker.variables:
                    raise UserError(f"worker {host} has no variable {name} to unset")
            edits.append((worker, {
                "slots": worker.slots if slots is None else slots,
                "variables": {name: value for name, value in
                              {**worker.variables, **updates}.items() if name not in unset},
                "ssh_reuse": worker.ssh_reuse if ssh_reuse is ABSENT else ssh_reuse,
                "down_after": worker.down_after if down_after is ABSENT else down_after,
                "resources": worker.resources_column if resources is None else
                merged_resources(worker.resources_column, resources)}))
        with self.store.transaction():
            for worker, edit in edits:
                self.store.worker_rows.update(worker.name, **edit)
        for worker, edit in edits:
            for name, value in edit.items():
                if name == "resources":
                    worker.resources_column = value
                    worker.resources = json.loads(value or "{}")
                else:
                    setattr(worker, name, value)
            self.log.info("worker %s: edited (%d slot(s), variables %s, ssh reuse %s%s)",
                          worker.name, worker.slots,
                          " ".join(sorted(worker.variables)) or "none",
                          "on" if worker.ssh_reuse else "off",
                          f", {resources_text(worker.resources_column)}"
                          if worker.resources else "")
        self.events.room_changed()   # (more resources may let a waiting job start)
        self.events.workers_changed(hosts)
        return [worker for worker, _ in edits]

    def replace(self, changes, workers):
        """load_status's part: the document's WORKERS are registered (afresh, even a
        draining one); the others drain if busy and go at once if not.  Returns
        the names gone."""
        wanted = {worker["ip"] for worker in workers}
        gone = []
        for name, worker in self.by_name.items():
            if name in wanted:
                continue
            if worker.busy_slots:
                if worker.state != WorkerState.DRAINING:
                    self.change_state(changes, worker, WorkerState.DRAINING)
            else:
                self.store.worker_rows.delete(name)
                gone.append(name)
        for entry in workers:
            worker = self.by_name.get(entry["ip"])
            if worker is None:
                self.store.worker_rows.insert(entry["ip"], entry["slots"], entry["envs"],
                                         entry["ssh_checked"], entry["state"],
                                         entry["ssh_reuse"], down_after=entry["down_after"],
                                         resources=entry["resources"])
                continue
            self.store.worker_rows.update(entry["ip"], entry["slots"], entry["envs"],
                                     entry["ssh_reuse"], entry["down_after"],
                                     entry["resources"], ssh_checked=entry["ssh_checked"])
            if worker.state != entry["state"]:
                self.change_state(changes, worker, entry["state"])
        changes.then(lambda: self.reload())
        return gone

    def reload(self):
        """Read the workers again after load_status, keeping the slots and resources
        in use."""
        old = self.by_name
        self.by_name = {row["name"]: Worker(row) for row in self.store.worker_rows.all()}
        for name, worker in self.by_name.items():
            if name in old:
                worker.busy_slots, worker.running = old[name].busy_slots, old[name].running
                worker.grants_held = old[name].grants_held

    def as_replaced(self, entries):
        """The workers as replace(ENTRIES) would leave them, for check_placement only:
        load_status checks the document's services against them before anything
        changes.  A copy; these workers stay as they are."""
        import copy
        preview = copy.copy(self)
        preview.by_name = {}
        wanted = {entry["ip"] for entry in entries}
        for name, worker in self.by_name.items():
            if name not in wanted and worker.busy_slots:
                preview.by_name[name] = copy.copy(worker)
                preview.by_name[name].state = WorkerState.DRAINING
        for entry in entries:
            worker = self.by_name.get(entry["ip"])
            worker = copy.copy(worker) if worker is not None else Worker({
                "name": entry["ip"], "slots": entry["slots"], "variables": "{}",
                "state": entry["state"].value, "ssh_checked": entry["ssh_checked"],
                "ssh_reuse": entry["ssh_reuse"], "health": WorkerHealth.UP.value,
                "checked_at": None, "check_reason": None, "ssh_host": None, "ssh_port": None,
                "ssh_user": None, "down_after": entry["down_after"],
                "resources": entry["resources"]})
            worker.slots, worker.state = entry["slots"], entry["state"]
            worker.resources = json.loads(entry["resources"] or "{}")
            preview.by_name[entry["ip"]] = worker
        return preview

    def check_placement(self, options):
        """Refuse --on/--prefer/--exclude naming unknown workers, and --slots that no
        allowed worker has; return the allowed workers."""
        lists = {}
        for flag, column in (("--on", "run_on"), ("--prefer", "prefer"),
                             ("--exclude", "exclude")):
            lists[column] = json.loads(options[column] or "[]")
            for host in lists[column]:
                if host not in self.by_name:
                    raise UserError(f"unknown worker {host!r} in {flag}; see ./cli.py status "
                                    "for the registered workers")
        allowed = [worker for worker in self.by_name.values()
                   if (not lists["run_on"] or worker.name in lists["run_on"]) and
                   worker.name not in lists["exclude"] and
                   worker.state != WorkerState.DRAINING]
        if lists["run_on"] and not allowed:
            raise UserError("every worker in --on is excluded or being removed")
        if lists["exclude"] and not allowed:
            raise UserError("--exclude leaves no worker to run on; add one first "
                            "(./cli.py add_slave HOST)")
        wanted = options["slots_wanted"]
        together = sum(worker.slots for worker in allowed)
        if options.get("split") and together < wanted:
            which = "in --on have" if lists["run_on"] else "have"
            raise UserError(f"the workers {which} {together} slots together, fewer than "
                            f"--slots {wanted}: add workers (./cli.py add_slave), or ask "
                            "for fewer")
        most = max((worker.slots for worker in allowed), default=0)
        if wanted > 1 and most < wanted and not options.get("split"):
            which = "in --on " if lists["run_on"] else ""
            raise UserError(f"no worker {which}has {wanted} slots (the most is {most}): add one "
                            f"with ./cli.py add_slave --slots {wanted} HOST, or ask for fewer")
        need = ResourceNeed.of(options.get("resources"))
        if need:
            why = resources_beyond(
                need, wanted if options.get("split") else None,
                {worker.name: (worker.slots, Resources(worker.resources.get("gpus", ()),
                                                       worker.resources.get("mem", 0),
                                                       worker.resources.get("named")))
                 for worker in allowed},
                {name for worker in self.by_name.values()
                 for name in worker.resources.get("named", {})}, bool(lists["run_on"]))
            if why:
                raise UserError(why)
        return allowed

    def usable_slots(self):
        """{name: slots} of the workers that may still take jobs (not draining)."""
        return {name: worker.slots for name, worker in self.by_name.items()
                if worker.state != WorkerState.DRAINING}

    # --- slots ----------------------------------------------------------

    def hold(self, worker_name, attempt, slots, grant, expected_end):
        """ATTEMPT, (job id, its number), runs on WORKER_NAME: it holds SLOTS there and
        GRANT (its GPUs, memory, named resources; see Resources.take), until
        EXPECTED_END if it has an --estimate.  (By attempt: an attempt whose end
        is saved late must not free what the job's next attempt holds.)"""
        worker = self.by_name.get(worker_name)
        if worker is not None:
            worker.busy_slots.update(slots)
            if attempt not in worker.running:
                worker.grants_held += bool(grant)
            worker.running[attempt] = (expected_end, len(slots), grant or None)

    def release(self, worker_name, attempt, slots):
        """ATTEMPT (see hold) has ended on WORKER_NAME: what it held there is free."""
        worker = self.by_name.get(worker_name)
        if worker is not None:
            worker.busy_slots.difference_update(slots)
            _, _, grant = worker.running.pop(attempt, (None, None, None))
            worker.grants_held -= bool(grant)
            self.forget_if_drained(worker)

    # --- health -----------------------------------------------------------

    def set_health(self, worker, health, reason, at):
        """The one way a worker's health changes: saved, logged, and kept in memory."""
        name = worker.name
        worker.checked_at = at
        if health == worker.health and reason == worker.check_reason:
            return
        with self.store.transaction():
            self.store.worker_rows.change_health(name, worker.health, health, reason, at)
        if health != worker.health:
            if health != WorkerHealth.UP:
                self.log.warning("worker %s: %s (%s); no new job starts there", name,
                                 "set aside" if health == WorkerHealth.SET_ASIDE else "down",
                                 reason)
                if worker.health == WorkerHealth.UP:
                    self.events.worker_unusable(name, "down" if health == WorkerHealth.DOWN
                                                else "set aside")
            else:
                self.log.info("worker %s: up again", name)
                worker.failures_in_row, worker.set_aside_at = [], 0.0
                self.events.room_changed()
        entered_or_left = (health == WorkerHealth.UP) != (worker.health == WorkerHealth.UP) \
            and worker.set_aside_at
        worker.health, worker.check_reason = health, reason
        if entered_or_left:
            self.events.health_watch_changed()   # set-aside workers are checked anew

    def endpoint_resolved(self, name, endpoint):
        """Where ssh goes for a worker (SLAVE_HOST, SLAVE_PORT, SLAVE_USER), newly
        resolved by the health checker: kept if it changed."""
        worker = self.by_name.get(name)
        if worker is None or worker.endpoint == endpoint:
            return
        with self.store.transaction():
            self.store.worker_rows.set_endpoint(name, endpoint)
        worker.endpoint = endpoint

    def weigh_attempt(self, row, outcome, result):
        """Count an ended attempt for or against its worker (see worker_verdict); set the
        worker aside after DOWN_AFTER in a row, until a health check passes."""
        # (A --split job: the worker of the part that failed, if one did.)
        worker = self.by_name.get(outcome.get("part_worker") or row["worker"])
        if worker is None:
            return
        ended = outcome.get("ended_at") or time.time()
        verdict = worker_verdict(outcome.get("exit_code"), outcome.get("signal"),
                                 ended - (row["started_at"] or ended),
                                 result in (JobResult.KILLED, JobResult.TIMED_OUT),
                                 not outcome.get("not_started") and
                                 (outcome.get("exit_code"), outcome.get("signal")) != (None, None))
        if verdict is None:
            return
        worker.works = not verdict
        if not verdict:
            worker.failures_in_row = []
            return
        how = f"exit status {outcome['exit_code']}" if outcome.get("exit_code") is not None \
            else f"signal {outcome.get('signal')}" if outcome.get("signal") is not None \
            else outcome.get("error") or "no exit status"
        # Kept only once any set-aside is saved: until_saved may call this again.
        failures = worker.failures_in_row + [f"job {row['id']} {how}"]
        others_working = any(other.works and other.capacity().accepting
                             for other in self.by_name.values() if other is not worker)
        if worker.health != WorkerHealth.UP or not set_aside(
                len(failures), self.down_after_of(worker.name), others_working):
            worker.failures_in_row = failures
            return
        reason = (f"{len(failures)} jobs in a row failed to reach it "
                  f"({', '.join(failures[-3:])}; ssh exits with "
                  f"{SSH_EXIT_STATUS} when it cannot get through); set aside until a health "
                  f"check passes, or ./cli.py resume {worker.name}")
        worker.set_aside_at = time.time()   # (before set_health: it starts its checks)
        self.set_health(worker, WorkerHealth.SET_ASIDE, reason, worker.set_aside_at)
        worker.failures_in_row = failures


def already_registered(host):
    return (f"worker {host} is already registered; remove it first "
            f"(./cli.py remove_slave {host}) to add it again")


class Queue:
    """The jobs' lifecycle: queued, started, ended, retried, skipped, killed before
    they ran, removed.  "A job ends" reads: the Runner records the end of an
    attempt, and save_end and settled here settle it (retries, dependencies,
    what its worker makes of it); the Runner frees its slots, and the clients
    that wait hear of it through Events."""

    def __init__(self, store, workers, timers, events, log, log_dir):
        self.store = store
        self.workers = workers
        self.timers = timers
        self.events = events
        self.log = log
        self.log_dir = log_dir
        self.paused = False        # the whole queue: no job starts while set
        self.placement = PLACEMENTS[0]   # start --placement (see plan_starts)
        self.schedule_needed = True
        self.release_at = None     # when the timer that unblocks delayed jobs fires
        self.holders = {}          # worker -> the job the latest pass kept it for
        self.schedule_delay = RetryDelay()   # while jobs cannot start (schedule_later)
        self.schedule_retry_pending = False
        self.families = Families(store, self, events, log)

    def changes(self):
        return Changes(self.store, self.events)

    def load(self):
        """At start, after recovery: settle what recovery (or an older cli.py) left
        undone, and wake up for the start times to come."""
        self.paused = self.store.setting("paused", False)
        self.placement = self.store.setting("placement", PLACEMENTS[0])
        with self.changes() as changes:   # a database from before Dependencies.resolve, or edited
            self.resolve(changes, self.store.dependencies.stale())
        self.skip_stranded()   # a crash may have come between a worker's removal and this
        self.families.load()
        self.release_delayed()

    def resolve(self, changes, ended):
        """Settle the dependents of ENDED (see Dependencies.resolve) in CHANGES."""
        skipped, freed = self.store.dependencies.resolve(ended)
        self.skipped(changes, skipped)
        changes.moved(freed, JobState.WAITING)
        return skipped

    def skipped(self, changes, job_ids, why="its dependencies can no longer be met"):
        """JOB_IDS were just skipped in CHANGES: announced and logged once committed."""
        changes.moved(job_ids, JobState.DONE)
        for job_id in job_ids:
            changes.then(lambda job_id=job_id: self.log.info("job %s: skipped: %s",
                                                             job_id, why))
        self.families.ended(changes, job_ids)

    def existing(self, job_ids, columns="id, state, result"):
        """The rows of JOB_IDS, or an error naming the first unknown id."""
        rows = self.store.jobs_by_id(job_ids, columns)
        if len(rows) != len(job_ids):
            known = {row["id"] for row in rows}
            unknown = [job_id for job_id in job_ids if job_id not in known]
            more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
            raise UserError(f"unknown job id {unknown[0]}{more} (never queued, or purged); "
                            "nothing was changed: see ./cli.py jobs")
        return rows

    def named(self, names):
        """The job ids NAMES stand for (see _job_name), each once, in order: an int is
        that job; 'N' the tasks of array N if N is an array (as in Slurm, whose
        array id is its first task's job id), else job N; 'A.T' task T of array A."""
        if all(isinstance(name, int) for name in names):
            return names
        arrays = self.store.arrays.among([int(name) for name in names
                                          if isinstance(name, str) and "." not in name])
        job_ids = []
        for name in names:
            if isinstance(name, int):
                job_ids.append(name)
            elif "." in name:
                job_ids.append(self.task_job_id(*map(int, name.split("."))))
            elif int(name) in arrays:
                job_ids += self.store.arrays.job_ids(arrays[int(name)])
            else:
                job_ids.append(int(name))
            if len(job_ids) > MAX_BULK_JOBS:
                raise UserError(f"those arrays hold more than {MAX_BULK_JOBS} jobs: name "
                                "fewer at once")
        return list(dict.fromkeys(job_ids))

    def task_job_id(self, array_id, task_id):
        """The job id of task TASK_ID of array ARRAY_ID, or an error that says why none."""
        array = self.store.arrays.among([array_id]).get(array_id)
        if array is None:
            raise UserError(f"{array_id}.{task_id}: there is no array {array_id} (ARRAY.TASK "
                            "names a task of an array; see ./cli.py status)")
        position = task_position(array["spec"], array["tasks"], task_id)
        if position is None:
            raise UserError(f"array {array_id} has no task {task_id} (its tasks: "
                            f"{array['spec'] or '1-' + str(array['tasks'])})")
        row = self.store.job(array_id + position)
        if row is None or row["array_id"] != array_id:
            raise UserError(f"task {array_id}.{task_id} (job {array_id + position}) was removed "
                            "or purged")
        return row["id"]

    # --- starting -----------------------------------------------------------

    def take_starts(self):
        """Move waiting jobs to RUNNING on the free slots, as many as fit, and return
        their rows for the Runner to start.  Committed before any fork: a crash
        from here on leaves attempts with no pid file and a free lock, which
        recovery queues again."""
        self.schedule_needed = False
        if self.paused:
            return []
        starts, jobs = self.plan(self.workers.capacities())
        if not starts:
            return []
        now = time.time()
        started = []
        try:
            with self.changes() as changes:
                for job_id, worker, slots in starts:
                    columns = {"worker": worker, "slot": slots[0],
                               "slots": json.dumps(slots) if len(slots) > 1 else None,
                               "started_at": now, "attempt": jobs[job_id]["attempt"] + 1,
                               "log": job_log_path(self.log_dir, job_id)}
                    if job_id in starts.parts:
                        columns["split_parts"] = json.dumps(starts.parts[job_id])
                    if job_id in starts.grants:
                        columns["resource_grant"] = json.dumps(starts.grants[job_id])
                    self.store.change_jobs([job_id], JobState.WAITING, JobState.RUNNING,
                                           **columns)
                    started.append({**dict(jobs[job_id]), **columns, "reason": None,
                                    "exit_code": None, "signal": None,
                                    "state": JobState.RUNNING.value})
                changes.moved([job_id for job_id, _, _ in starts], JobState.RUNNING)
        except self.store.sqlite3.Error as error:
            self.schedule_later(f"the database cannot take the change: {error}")
            return []
        return started

    def plan(self, capacities):
        """plan_starts over as much of the queue as it takes to fill the free slots.

        Usually the first rows fill them.  Jobs that cannot go where there is
        room (placement, slots) make it look further, up to SCHEDULE_SCAN_LIMIT
        ready jobs.  Returns (starts, {job id: row}).
        """
        free = sum(capacity.free_slots for capacity in capacities)
        self.holders = {}
        if not free:
            return [], {}
        # Two passes at most: the head of the queue, which usually fills every
        # free slot; then, if room is left that those jobs cannot use, a deeper
        # look (a job that is pinned or too big must not idle the others).
        head = max(free, 64)
        now = time.time()   # (for backfill: when the running jobs are expected to end)
        rows, more = self.ready_rows(head)
        starts = plan_starts(self.job_needs(rows), capacities, self.placement, now)
        if starts.left and more:
            rows, _ = self.ready_rows(SCHEDULE_SCAN_LIMIT)
            starts = plan_starts(self.job_needs(rows), capacities, self.placement, now)
        self.holders = starts.holders   # (why the others wait: see waiting_reason)
        return starts, {row["id"]: row for row in rows}

    def ready_rows(self, limit):
        """Jobs free to start, in the order they would: LIMIT of the ready queue, and of
        each array with a limit (%K) as many tasks as it leaves room for, so that
        it is never exceeded and its other tasks hold up no one.  Also: whether
        the queue has more."""
        rows = self.store.ready_jobs(limit=limit)
        more = len(rows) == limit
        limited = False
        for array_id, most, running in self.store.arrays.limited():
            if running < most:
                rows += self.store.arrays.ready_tasks(array_id, min(most - running, limit))
                limited = True
        if limited:
            rows.sort(key=lambda row: (-row["priority"], row["id"]))
        return rows, more

    def job_needs(self, rows):
        failed_on = self.store.failed_on([row["id"] for row in rows if row["attempt"]])
        # Most jobs have no placement wishes: skip the JSON for them.
        return [JobNeeds(row["id"], row["slots_wanted"],
                         row["run_on"] and json.loads(row["run_on"]),
                         row["prefer"] and json.loads(row["prefer"]) or (),
                         row["exclude"] and json.loads(row["exclude"]) or (),
                         failed_on.get(row["id"], ()), row["split"],
                         ResourceNeed.of(row["resources"]), row["estimate"],
                         previous_grants(row)) for row in rows]

    def schedule_later(self, why):
        """Jobs could not start (the database refused, or their supervisors found no
        room for their files).  Try again after a pause, longer while the fault
        lasts (RetryDelay): no event may come once the disk has room again."""
        if not self.schedule_delay.seconds:
            self.log.error("cannot start waiting jobs (%s); tried again until they start",
                           why)
        delay = self.schedule_delay.next()
        if not self.schedule_retry_pending:
            self.schedule_retry_pending = True
            self.timers.add(time.time() + delay, self.schedule_again)

    def script_started(self):
        """A script ran: whatever held jobs back (schedule_later) is gone."""
        self.schedule_delay.reset()

    def schedule_again(self):
        self.schedule_retry_pending = False
        self.events.room_changed()

    def release_delayed(self):
        """Let the jobs whose start time has come be scheduled; wake for the next."""
        def release():
            self.release_at = None
            with self.changes() as changes:
                changes.moved(self.store.release_due(time.time()), JobState.WAITING)
            self.arm_release()
        self.timers.until_saved("releasing the jobs whose start time has come", release)

    def arm_release(self):
        """Make sure a timer fires at the earliest start time still to come."""
        when = self.store.next_release(time.time())
        if when is not None and (self.release_at is None or when < self.release_at):
            self.release_at = when
            self.timers.add(when, self.release_delayed)

    # --- ending -------------------------------------------------------------

    def requeue(self, row):
        """An attempt whose script never started: its job waits again, unnumbered."""
        with self.changes() as changes:
            self.store.requeue(row["id"], row["attempt"])
            # Not at once: the cause (a full disk) may last; the Runner calls
            # schedule_later.
            changes.moved([row["id"]], JobState.WAITING, wake=False)

    def save_end(self, row, outcome):
        """Save how an attempt ended, in one transaction: its history, then a retry,
        or the job's end and its dependents'.  Returns what settled needs."""
        job_id = row["id"]
        now = time.time()
        ended_at = outcome.get("ended_at") or now   # not when it could be saved
        kill_requested, timed_out = row["kill_requested_at"] is not None, bool(row["timed_out"])
        reason = outcome.get("error") or row["reason"]
        if kill_requested and ended_at < row["kill_requested_at"]:
            # It had ended by itself before the kill or timeout came; only saving its
            # end was held up (a full disk, a stopped server).
            kill_requested, timed_out, reason = False, False, outcome.get("error")
        result = result_of(outcome.get("exit_code"), kill_requested, timed_out)
        down_after = self.workers.down_after_of(row["worker"])
        # Attempts before its latest `retry` count neither way.
        base = row["attempts_before_retry"]
        unreached = self.store.unreached_attempts(job_id, after=base)
        # (A replica is not retried: its service starts it again, as a new job.)
        free = result == JobResult.FAILED and row["service"] is None and free_retry(
            outcome.get("exit_code"), kill_requested, down_after, unreached)
        # The attempts that were free (the first DOWN_AFTER that ssh could not get
        # through) do not count against --retries.
        counted = row["attempt"] - base - min(unreached, down_after)
        retries_left = row["retries"] - counted + 1
        retry = result in (JobResult.FAILED, JobResult.TIMED_OUT) and retries_left > 0
        with self.changes() as changes:
            self.store.record_attempt(row, result, outcome, reason, ended_at)
            if free:
                # The attempt number it used must not cost it a retry: one more.
                state = self.store.retry(
                    job_id, None, f"attempt {row['attempt']} could not reach "
                    f"{row['worker']} (ssh exit status {SSH_EXIT_STATUS}); tried "
                    "on another worker, not counted against --retries")
                retry = True
            elif retry:
                not_before = now + row["retry_delay"] if row["retry_delay"] else None
                state = self.store.retry(job_id, not_before,
                                         f"attempt {row['attempt']} {result.value}"
                                         f"{f' ({reason})' if reason else ''}; "
                                         f"{retries_left} retry(s) left")
            else:
                state = JobState.DONE
                self.store.change_jobs([job_id], JobState.RUNNING, JobState.DONE,
                                       result=result.value, exit_code=outcome.get("exit_code"),
                                       signal=outcome.get("signal"), reason=reason,
                                       ended_at=ended_at)
            changes.moved([job_id], state)
            if not retry:
                self.resolve(changes, [(job_id, result == JobResult.SUCCEEDED,
                                        f"ended {result.value}")])
                self.families.ended(changes, [job_id])
                if row["service"] is not None:
                    self.replica_ended(changes, row, result, outcome, ended_at, reason)
        return result, reason, retry

    def replica_ended(self, changes, row, result, outcome, ended_at, reason):
        """A replica's job has ended (in CHANGES): if its service still wants that
        replica, its next job is queued in the same transaction, to start after
        the restart delay; so a replica is never lost, nor ever doubled."""
        service = self.store.service_rows.get(row["service"])
        if service is None or not service["enabled"] or row["replica"] >= service["replicas"]:
            return
        record = self.store.service_rows.replica_records(service["name"]).get(row["replica"])
        delay = restart_delay(record["delay"] if record else 0.0,
                              ended_at - (row["started_at"] or ended_at))
        how = end_text(result.value, outcome.get("exit_code"), outcome.get("signal"))
        if result == JobResult.KILLED and reason:
            how = reason.split(" (")[0]   # restarted: health checks failed; moved: ...
        self.store.service_rows.replica_ended(service["name"], row["replica"], how, delay)
        job_id = self.store.service_rows.insert_replica(service, row["replica"],
                                                        time.time() + delay)
        changes.moved([job_id], JobState.BLOCKED)
        changes.then(self.release_delayed)
        changes.then(lambda: self.log.info(
            "service %s: replica %s ended (%s); job %s starts it again in %gs",
            service["name"], row["replica"], how, job_id, delay))

    def settled(self, row, outcome, result, reason, retry):
        """What follows a saved end, once its attempt is gone: its worker weighs it,
        and a retry may have a start time to wait for."""
        job_id = row["id"]
        self.timers.until_saved(f"worker {row['worker']}: weighing how job {job_id} ended",
                                lambda: self.workers.weigh_attempt(row, outcome, result))
        self.log.info("job %s: %s (exit code %s, signal %s)%s%s", job_id, result.value,
                      outcome.get("exit_code"), outcome.get("signal"),
                      f": {reason}" if reason else "", "; to be retried" if retry else "")
        if retry:
            self.release_delayed()

    def request_kill(self, job_id, grace, reason, timeout=False):
        """Record a kill of a running job before it is sent, so that a restart can
        finish it; TIMEOUT: the job's --timeout's, which ends it as timed_out."""
        with self.store.transaction():
            self.store.request_kill(job_id, grace, reason)
            if timeout:
                self.store.mark_timed_out(job_id)

    # --- commands -----------------------------------------------------------

    def add(self, script, arg_lists, cwd, environment, variables, umask, options, after,
            after_any, array=None, parent=None, nohup=False):
        """Queue one job per argument list, or the tasks of ARRAY (an ArrayRequest), all
        or none; returns (first id, last id, why they were all skipped at once or
        None).  PARENT: the running job they are children of (the caller has
        checked it: see process_of_job)."""
        check_script(script)
        self.workers.check_placement(options)
        conditions, settled, skip_reason = self.conditions_requested(after, after_any)
        count = len(arg_lists) if array is None else len(array.task_ids)
        if count * len(conditions) > MAX_BULK_JOBS:
            raise UserError(f"{count} jobs each waiting on {len(conditions)} jobs is "
                            f"more than {MAX_BULK_JOBS} conditions: let them wait on one job "
                            "that waits on the others (--after that job)")
        if conditions:
            options["blocked"] = 1
        with self.changes() as changes:
            environment_id = self.store.intern_environment(environment)
            first, last = self.store.insert_jobs(script, arg_lists, cwd, environment_id,
                                                 variables, umask, options, array, parent,
                                                 nohup)
            self.store.dependencies.add(first, last, conditions)
            self.store.dependencies.add_settled(first, last, settled)
            if skip_reason:
                skipped = list(range(first, last + 1))
                self.store.change_jobs(skipped, (JobState.WAITING, JobState.BLOCKED),
                                       JobState.DONE, result=JobResult.SKIPPED.value,
                                       reason=skip_reason, ended_at=time.time())
                self.skipped(changes, skipped)
        if array is not None:
            self.log.info("array %d: jobs %d-%d queued (%s)", first, first, last,
                          os.path.basename(script))
        elif len(arg_lists) > 1:
            self.log.info("jobs %d-%d queued (%s)", first, last, os.path.basename(script))
        self.events.room_changed()   # new jobs to start
        self.release_delayed()   # a start time may have passed while they were inserted
        return first, last, skip_reason

    def conditions_requested(self, after, after_any):
        """The (prerequisite, any_of) conditions of a new job from its --after and
        --after-any ids, those settled at once (see settled_at_once), and why it is
        skipped at once if they can never be met."""
        both = set(after) & set(after_any)
        if both:
            raise UserError(f"job {min(both)} is in both --after and --after-any: choose one")
        rows = self.existing(after + after_any)
        ended = {row["id"]: row["result"] for row in rows if row["state"] == JobState.DONE.value}
        conditions, skip_reason = dependency_conditions(after, after_any, ended)
        return (conditions, settled_at_once(after, after_any, ended, bool(skip_reason)),
                skip_reason)

    def kill_waiting(self, job_ids, reason="killed before it started"):
        """Waiting jobs end as killed before they start; their dependents follow."""
        with self.changes() as changes:
            self.end_waiting(changes, job_ids, reason)
        self.log.info("%d waiting job(s) killed before they started", len(job_ids))

    def end_waiting(self, changes, job_ids, reason):
        """kill_waiting's change, in the caller's transaction (CHANGES)."""
        self.store.change_jobs(job_ids, (JobState.WAITING, JobState.BLOCKED),
                               JobState.DONE, result=JobResult.KILLED.value,
                               ended_at=time.time(), reason=reason)
        changes.moved(job_ids, JobState.DONE)
        self.store.dependencies.drop(job_ids)
        self.resolve(changes, [(job_id, False, "was killed") for job_id in job_ids])
        self.families.ended(changes, job_ids)

    def skip_stranded(self):
        """Skip waiting --on jobs none of whose workers is left (or has enough slots)."""
        usable = self.workers.usable_slots()
        def fits(row):
            sizes = [usable.get(name, 0) for name in json.loads(row["run_on"])]
            return (sum(sizes) if row["split"] else max(sizes)) >= row["slots_wanted"]
        stranded = [row["id"] for row in self.store.pinned_waiting_jobs() if not fits(row)]
        if not stranded:
            return
        with self.changes() as changes:
            for job_id in stranded:
                self.store.skip(job_id, "no allowed worker left (--on)")
            self.skipped(changes, stranded, "no allowed worker left (--on)")
            self.resolve(changes, [(job_id, False, "was skipped") for job_id in stranded])


class Families:
    """Parents and children.  A job added from a process of a running job (checked:
    see process_of_job) is its child.  When a parent ends (done, however: a retry
    is not an end), its children not added with --nohup end too: waiting ones at
    once, as killed, in the transaction that ends it; running ones are killed
    with the default grace, the kill recorded in that same transaction so that a
    restart finishes it.  Either way their reason is "parent N ended", and their
    own children follow them.  A child that runs --after its parent is left to its
    condition.  (`kill` of a parent kills its whole family, --nohup
    children too: see Handlers.kill.)"""

    def __init__(self, store, queue, events, log):
        self.store = store
        self.queue = queue
        self.events = events
        self.log = log

    def load(self):
        """At start, after recovery: children whose parent ended while no server ran
        (or whose end was cut off by a crash) are settled now."""
        orphans = self.store.families.orphans()
        if orphans:
            with self.queue.changes() as changes:
                self.settle(changes, orphans)

    def ended(self, changes, job_ids):
        """JOB_IDS have just ended (or gone), in CHANGES: so do their children."""
        if job_ids:
            self.settle(changes, self.store.families.orphans(job_ids))

    def settle(self, changes, orphans):
        """End ORPHANS (rows of FamilyRows.orphans) in CHANGES."""
        waiting, running = {}, []
        for row in orphans:
            if row["state"] == JobState.RUNNING.value:
                running.append(row)
            else:
                waiting.setdefault(row["parent"], []).append(row["id"])
        for parent, job_ids in waiting.items():
            self.queue.end_waiting(changes, job_ids, f"parent {parent} ended")
            changes.then(lambda parent=parent, job_ids=job_ids: self.log.info(
                "job %s: ended; its waiting children %s end with it", parent,
                ", ".join(map(str, job_ids))))
        for row in running:
            self.store.request_kill(row["id"], DEFAULT_KILL_GRACE,
                                    f"parent {row['parent']} ended")
            changes.then(lambda row=row: self.log.info(
                "job %s: killing (parent %s ended)", row["id"], row["parent"]))
        if running:
            job_ids = [row["id"] for row in running]
            changes.then(lambda: self.events.kills_recorded(job_ids, DEFAULT_KILL_GRACE))


class JobEdits:
    """What users change in jobs already queued or ended, beside the lifecycle:
    retry, priority, removal, purge, pause, and load_status's replacement of the
    waiting queue.  Each is one transaction of the Queue's (Queue.changes), and
    settles dependents as the lifecycle does (Queue.resolve)."""

    def __init__(self, queue, store, workers, events, log):
        self.queue = queue
        self.store = store
        self.workers = workers
        self.events = events
        self.log = log

    def retry(self, job_ids, named):
        """Ended jobs wait again under their ids, each for a new attempt with its
        --retries afresh; so do the dependents their failures skipped
        (transitively), unless another failure would skip them again.  NAMED: the
        user named the jobs one by one, and one held back is refused rather than
        left out.  Returns (ids retried, ids of dependents back with them, ids held
        back)."""
        for row in self.queue.existing(job_ids, "id, state, result, service, replica"):
            if row["state"] != JobState.DONE.value:
                raise UserError(f"job {row['id']} is {row['state']}: only ended jobs can be "
                                "retried (kill it first to run it again); nothing was changed")
            if row["service"] is not None:
                raise UserError(f"job {row['id']} ran replica {row['replica']} of service "
                                f"{row['service']}, which starts its replicas again itself "
                                "(./cli.py services); nothing was changed")
        dependencies = self.store.dependencies
        candidates, frontier = set(job_ids), set(job_ids)
        while frontier:
            frontier = dependencies.skipped_by(frontier) - candidates
            candidates |= frontier
        back, held = retried_together({job_id: dependencies.settled_unmet(job_id)
                                       for job_id in candidates})
        refused = sorted(set(job_ids) & set(held)) if named else []
        if refused:
            prerequisite, any_of, how = held[refused[0]]
            root, root_how = prerequisite, how
            for _ in range(MAX_BULK_JOBS):   # up the chain of skips to the job that failed
                if root_how != JobResult.SKIPPED.value:
                    break
                root, _, root_how = next(
                    (condition for condition in dependencies.settled_unmet(root)
                     if condition[2] not in (None, JobResult.SUCCEEDED.value)),
                    (root, None, "removed"))
            raise UserError(
                f"job {refused[0]} would be skipped again: it runs "
                f"{'--after-any' if any_of else '--after'} job {prerequisite}, which "
                f"{'was removed' if how == 'removed' else f'ended {how}'}"
                + (f" (after job {root} ended {root_how})"
                   if root != prerequisite and root_how != "removed" else "")
                + (f"; retry job {root} and it comes back with that job"
                   if root_how not in ("removed", JobResult.SKIPPED.value) else "")
                + "; nothing was changed")
        rows = {row["id"]: row for row in self.store.jobs_by_id(
            sorted(back), "id, result, attempt")}
        with self.queue.changes() as changes:
            for job_id in sorted(back):
                row = rows[job_id]
                state = JobState.BLOCKED if dependencies.reopen(job_id) else JobState.WAITING
                self.store.change_jobs(
                    [job_id], JobState.DONE, state, not_before=None,
                    attempts_before_retry=row["attempt"],
                    reason=f"retried after it ended {row['result']}" if job_id in job_ids
                    else "back with the retry of the jobs it runs --after")
                changes.moved([job_id], state)
            dependencies.reopen_failed_on(back)
            # A child retried after its parent ended would end again at once (or at
            # the next start): the user who asked for it to run means it to outlive it.
            self.store.families.let_outlive_parents(sorted(back))
            # Conditions on jobs that have ended since: met, or failed, now.
            self.queue.resolve(changes, dependencies.stale())
        retried = [job_id for job_id in job_ids if job_id in back]
        self.log.info("%d job(s) retried, %d skipped dependent(s) back with them",
                      len(retried), len(back) - len(retried))
        return retried, sorted(back - set(job_ids)), sorted(held)

    def set_priority(self, job_ids, priority):
        """Give waiting jobs a new priority: higher starts first, FIFO among equals."""
        for row in self.queue.existing(job_ids, "id, state, result, service, replica"):
            refuse_replica(row, "has the priority of replicas (before any batch job)")
            if row["state"] != JobState.WAITING.value:
                raise UserError(f"job {row['id']} is {row['state']}"
                                + (f" ({row['result']})" if row["result"] else "")
                                + ": priority only orders jobs that are still waiting; "
                                  "nothing was changed")
        with self.store.transaction():
            self.store.set_priority(job_ids, priority)
        self.log.info("%d job(s) now have priority %d", len(job_ids), priority)
        self.events.room_changed()   # a job moved up may fit where the others did not

    def purge(self, older_than):
        """Delete finished jobs that ended more than OLDER_THAN seconds ago, with their
        logs; returns how many."""
        with self.store.transaction():
            purged = self.store.purge_jobs(time.time() - older_than)
        for job_id, log in purged:
            # Only a log this server named for that job: never another file.
            if log and os.path.basename(log) == job_log_name(job_id):
                try:
                    os.unlink(log)
                except OSError:
                    pass
        self.log.info("purged %d finished job(s)", len(purged))
        return len(purged)

    def set_paused(self, paused):
        """Pause or resume the whole queue."""
        with self.store.transaction():
            self.store.set_setting("paused", paused)
        self.queue.paused = paused
        self.log.info("queue %s", "paused" if paused else "resumed")
        self.events.room_changed()

    def remove(self, job_ids):
        """Delete waiting jobs; their dependents follow.  Returns the ids skipped."""
        with self.queue.changes() as changes:
            self.store.delete_waiting_jobs(job_ids)
            self.store.drop_unused_environments()
            changes.then(lambda: self.events.jobs_removed(job_ids))
            self.queue.families.ended(changes, job_ids)   # (a parent waiting for a retry)
            return self.queue.resolve(changes, [(job_id, False, "was removed")
                                                for job_id in job_ids])

    def load_status(self, workers, jobs, paused, also=None):
        """Replace the workers and the waiting queue; running jobs are left alone.

        A worker missing from the document drains if it is busy (removed when
        its jobs end) and goes at once otherwise; workers in the document are
        (re)registered with its slots and variables.  ALSO(changes), if given,
        does its part in the same transaction (Services.load_status).
        """
        taken_ids = self.store.ids_not_waiting()
        keep_ids = not any(job["id"] in taken_ids for job in jobs if job["id"] is not None)
        ended = self.dependencies_outside(jobs)
        replaced = self.store.waiting_ids()
        with self.queue.changes() as changes:
            self.store.delete_all_waiting()
            changes.then(lambda: self.events.jobs_removed(replaced))
            gone = self.workers.replace(changes, workers)
            if paused is not None:
                self.store.set_setting("paused", paused)
            new_ids = {}
            for job in jobs:
                environment_id = self.store.intern_environment(job["environment"])
                options = dict(job["options"], blocked=int(bool(job["after"] or
                                                                 job["after_any"])))
                new_id = self.store.insert_job(job["script"], job["args"], job["cwd"],
                                               environment_id, job["envs"], job["umask"],
                                               options, job["id"] if keep_ids else None,
                                               job["submitted_at"])
                if job["id"] is not None:
                    new_ids[job["id"]] = new_id
                job["new_id"] = new_id
                if job["task"] is not None and keep_ids:
                    self.store.arrays.restore(new_id, job["task"])
            skipped = []
            for job in jobs:
                after = [new_ids.get(job_id, job_id) for job_id in job["after"]]
                after_any = [new_ids.get(job_id, job_id) for job_id in job["after_any"]]
                conditions, skip_reason = dependency_conditions(after, after_any, ended)
                self.store.dependencies.add(job["new_id"], job["new_id"], conditions)
                self.store.dependencies.add_settled(
                    job["new_id"], job["new_id"],
                    settled_at_once(after, after_any, ended, bool(skip_reason)))
                if skip_reason:
                    self.store.skip(job["new_id"], skip_reason)
                    skipped.append(job["new_id"])
                elif not conditions:
                    self.store.unblock([job["new_id"]])
            self.queue.skipped(changes, skipped)
            self.queue.resolve(changes, [(job_id, False, "was skipped") for job_id in skipped])
            if also is not None:
                also(changes)
            self.store.drop_unused_environments()
        self.queue.paused = self.store.setting("paused", False)
        self.events.workers_changed(gone)   # (new jobs to start too)
        self.queue.release_delayed()
        self.log.info("state replaced by load_status: %d worker(s), %d waiting job(s)",
                      len(workers), len(jobs))
        return keep_ids

    def dependencies_outside(self, jobs):
        """For load_status: check the dependencies of the document's JOBS; return the
        results of the prerequisites that already ended here.

        A job may wait on another job of the document, or on one here that is
        running or has ended (waiting ones are being replaced); never in a circle.
        """
        in_document = {job["id"] for job in jobs if job["id"] is not None}
        cycle = find_cycle({job["id"]: job["after"] + job["after_any"] for job in jobs
                            if job["id"] is not None})
        if cycle:
            raise UserError(f"job_waitlist: jobs {' -> '.join(map(str, cycle))} wait on each "
                            "other in a circle; nothing was changed")
        outside = sorted({job_id for job in jobs for job_id in job["after"] + job["after_any"]
                          if job_id not in in_document})
        rows = {row["id"]: row for row in self.store.jobs_by_id(outside)}
        for job_id in outside:
            if job_id not in rows or rows[job_id]["state"] == JobState.WAITING.value:
                raise UserError(f"job_waitlist: job {job_id}, which a job waits on, is neither "
                                "in the document nor running or ended here; nothing was changed")
        return {job_id: row["result"] for job_id, row in rows.items()
                if row["state"] == JobState.DONE.value}


###############################################################################
# Runner: the server's side of running attempts ################################
###############################################################################

class Attempt:
    """One running attempt of a job, as the server watches it."""

    def __init__(self, row, pid, pidfd):
        self.job_id = row["id"]
        self.number = row["attempt"]
        self.worker = row["worker"]
        self.slots = attempt_slots(row)
        # (worker, slots) of each part: one, but for a --split job across workers.
        self.parts = [(worker, slots) for worker, slots in split_parts(row) or
                      [(self.worker, self.slots)]]
        # {worker: the GPUs, memory and named resources it holds there}; when it
        # is expected to end (--estimate), for backfill.
        self.grants = previous_grants(row)
        self.expected_end = None if row["estimate"] is None or row["started_at"] is None \
            else row["started_at"] + row["estimate"]
        self.pid = pid
        self.control_dirs = []   # its workers' SSH masters' directories, if its ssh shares them
        self.pidfd = pidfd       # None: a live supervisor we could not watch (see adopt),
                                 # or one that has ended (see record_end)
        self.outcome = None      # how it ended, once known: kept until it is saved
        self.row = None          # its job as it was when its end was saved ...
        self.saved = None        # ... and what Queue.save_end said of it
        self.ended = False       # its end is saved and its slots free (see forget)


class Runner:
    """Starts attempts through the spawner, watches their supervisors (a pidfd
    each), adopts them again after a restart, kills them, and records how they
    ended for the Queue to settle."""

    def __init__(self, store, queue, workers, timers, selector, spawner, jobs_ssh, log,
                 run_dir, job_fd_limit):
        self.store = store         # read only: the Queue writes
        self.queue = queue
        self.workers = workers
        self.timers = timers
        self.selector = selector
        self.spawner = spawner
        self.jobs_ssh = jobs_ssh
        self.log = log
        self.run_dir = run_dir
        self.job_fd_limit = job_fd_limit
        self.running = {}          # job id -> Attempt
        self.environment_cache = {}
        # Told of each replica that runs (started or adopted): Services.replica_running.
        self.replica_running = lambda attempt, row: None

    def jobs_on(self, host):
        return sorted(job_id for job_id, attempt in self.running.items()
                      if any(worker == host for worker, _ in attempt.parts))

    # --- recovery -----------------------------------------------------------

    def recover(self):
        """Settle every attempt that was running while the server was away.

        Live supervisors are adopted first, so that every worker's busy slots
        are known before anything is settled or a drained worker is removed.
        """
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        gone = [row for row in self.store.jobs_in_state(JobState.RUNNING)
                if not self.adopt(row)]
        for row in gone:
            job_id, attempt = row["id"], row["attempt"]
            try:
                outcome = read_outcome(self.run_dir, job_id, attempt)
            except (OSError, ValueError):
                outcome = None
            pid = read_pid(run_file(self.run_dir, job_id, attempt, "pid"))
            if outcome is not None:
                self.log.info("job %s: ended while the server was away", job_id)
                self.settle(Attempt(row, pid, None), row, outcome)
                continue   # (its run files went with it)
            elif pid is None:
                # No pid file and nobody holds the lock: the script never ran.
                self.queue.requeue(row)
                self.log.info("job %s: had not started when the server stopped; queued again",
                              job_id)
            else:
                self.settle(Attempt(row, pid, None), row,
                            self.vanished(pid, pid_file_time(self.run_dir, job_id, attempt)))
                continue
            remove_run_files(self.run_dir, job_id, attempt)
        self.remove_stray_run_files()
        for worker in self.workers.all():
            self.workers.forget_if_drained(worker)

    def adopt(self, row):
        """Watch the supervisor of a running attempt again.  False if it is gone.

        The lock proves the supervisor alive whatever became of pids; once its
        pid file is there, a pidfd taken while the lock is still held cannot
        belong to another process.
        """
        job_id, attempt = row["id"], row["attempt"]
        deadline = time.monotonic() + RECOVERY_WAIT
        while supervisor_alive(self.run_dir, job_id, attempt):
            pid = read_pid(run_file(self.run_dir, job_id, attempt, "pid"))
            pidfd = None
            if pid is not None:
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    pass
            if pidfd is not None and supervisor_alive(self.run_dir, job_id, attempt):
                attempt_watched = self.watch(row, pid, pidfd)
                self.log.info("job %s: still running on %s; adopted", job_id, row["worker"])
                if row["kill_requested_at"] is not None:
                    # The server may have died before its SIGTERM went out.
                    self.signal_kill(attempt_watched, row["kill_grace"])
                return True
            if pidfd is not None:
                os.close(pidfd)
            if time.monotonic() > deadline:
                # Alive but not watchable: keep its slot, never start it twice.
                self.hold(self.new_attempt(row, pid, None))
                self.log.warning("job %s: its supervisor holds its lock but cannot be watched; "
                                 "left running, checked again at the next start", job_id)
                return True
            time.sleep(0.01)
        return False

    def vanished(self, supervisor, started):
        """The outcome of an attempt whose supervisor died without recording one."""
        killed = end_orphaned_job(supervisor, started)
        self.log.warning("supervisor %s vanished; %d leftover process(es) of its job killed",
                         supervisor, killed)
        return {"exit_code": None, "signal": None,
                "error": "its supervisor vanished (killed, or the machine restarted): exit "
                         "status unknown"}

    def remove_stray_run_files(self):
        running = {(job_id, attempt.number) for job_id, attempt in self.running.items()}
        for name in os.listdir(self.run_dir):
            stem = name.split(".", 1)[0]
            job_id, _, attempt = stem.partition("-")
            if not (job_id.isdigit() and attempt.isdigit()) or \
                    (int(job_id), int(attempt)) not in running:
                try:
                    os.unlink(os.path.join(self.run_dir, name))
                except OSError:
                    pass

    # --- starting -----------------------------------------------------------

    def start(self, rows):
        """Start the attempts the Queue has just moved to RUNNING."""
        for row in rows:
            try:
                self.start_attempt(row)
            except (LaunchError, OSError, self.store.sqlite3.Error) as error:
                self.launch_failed(row, error)

    def launch_failed(self, row, error):
        """The running attempt ROW could not be started (ERROR).  Mostly nothing
        ran, and the job goes back to the queue; but a spawner killed between
        its fork and its answer leaves a supervisor after all (which the next
        spawner refused to double): adopted, or settled if it has ended."""
        if self.adopt(row):
            self.log.warning("job %s: %s; its supervisor adopted", row["id"], error)
            return
        pid_path = run_file(self.run_dir, row["id"], row["attempt"], "pid")
        pid = read_pid(pid_path)
        if pid is None and os.path.lexists(pid_path):
            # It ran, but cannot be told from its pid file now: keep its slot,
            # never start it twice (as adopt does with a supervisor it cannot watch).
            self.hold(self.new_attempt(row, None, None))
            self.log.error("job %s: %s, and its pid file cannot be read; left as running, "
                           "checked again at the next start", row["id"], error)
            return
        if pid is None:
            self.log.error("job %s: cannot start it: %s", row["id"], error)
        else:   # it ran, and has ended already: settled by what it recorded
            self.log.warning("job %s: %s; settled", row["id"], error)
        self.record_end(self.hold(Attempt(row, pid, None)))   # (queues it again if nothing ran)

    def environment_of(self, row, part=None):
        """The environment the running job ROW's script runs (or ran) with; for a --split
        job, that of PART (worker, slots), with SPLIT_HOSTS and SPLIT_PART."""
        worker_name, slots = part or (row["worker"], attempt_slots(row))
        worker = self.workers.get(worker_name)
        environment = job_environment(self.submitter_environment(row["environment_id"]),
                                      worker.variables, json.loads(row["variables"]),
                                      row["id"], worker.name, row["attempt"], slots,
                                      worker.job_endpoint(), self.jobs_ssh.shim_for(worker, row),
                                      None if row["array_id"] is None else
                                      (row["array_id"], row["task_id"], row["task_arg"]))
        if part is not None:
            parts = split_parts(row)
            environment.update(split_variables(parts, parts.index(list(part))))
        environment.update(resource_variables(previous_grants(row).get(worker_name) or {}))
        return environment

    def start_attempt(self, row):
        parts = split_parts(row)
        environment = None if parts else self.environment_of(row)
        spec = AttemptSpec(row["id"], row["attempt"], row["script"], json.loads(row["args"]),
                           row["cwd"], environment, row["umask"], self.job_fd_limit, row["log"],
                           row["worker"])
        if parts:
            spec.parts = [{"worker": worker, "slots": slots,
                           "environment": self.environment_of(row, (worker, slots))}
                          for worker, slots in parts]
        pid, pidfd = self.spawner.spawn(self.run_dir, spec)
        self.watch(row, pid, pidfd)
        where = " + ".join(f"{worker} ({len(slots)})" for worker, slots in parts) if parts \
            else f"{row['worker']} slot {row['slot']}"
        self.log.info("job %s: started on %s (attempt %s, supervisor %s)",
                      row["id"], where, row["attempt"], pid)

    def submitter_environment(self, environment_id):
        if environment_id not in self.environment_cache:
            if len(self.environment_cache) > 64:
                self.environment_cache.clear()
            self.environment_cache[environment_id] = self.store.environment(environment_id)
        return self.environment_cache[environment_id]

    def new_attempt(self, row, pid, pidfd):
        attempt = Attempt(row, pid, pidfd)
        if row["ssh_reuse"]:
            # Its worker's masters stay while it runs (whatever the worker's own
            # setting, which may have changed since it started).
            attempt.control_dirs = [self.jobs_ssh.control_dir(worker)
                                    for worker, _ in attempt.parts]
        return attempt

    def hold(self, attempt):
        """ATTEMPT runs (or is being settled): it holds its slots until forget."""
        self.running[attempt.job_id] = attempt
        for worker, slots in attempt.parts:
            self.workers.hold(worker, (attempt.job_id, attempt.number), slots,
                              attempt.grants.get(worker), attempt.expected_end)
        return attempt

    def watch(self, row, pid, pidfd):
        attempt = self.hold(self.new_attempt(row, pid, pidfd))
        self.selector.register(pidfd, EVENT_READ,
                               lambda events, attempt=attempt: self.attempt_ended(attempt))
        if row["timeout"] is not None and not row["timed_out"]:
            # From the recorded start, so that a restart does not extend it.
            self.timers.add(row["started_at"] + row["timeout"],
                            lambda attempt=attempt: self.time_out(attempt), attempt)
        if row["service"] is not None:
            self.replica_running(attempt, row)
        return attempt

    # --- killing ------------------------------------------------------------

    def kill(self, job_id, grace, reason):
        """End a running job: recorded first, so that a restart finishes the kill."""
        self.queue.request_kill(job_id, grace, reason)
        self.log.info("job %s: killing (%s)", job_id, reason)
        self.signal_kill(self.running[job_id], grace)

    def time_out(self, attempt):
        """The attempt's --timeout has passed: kill it as kill does; it ends timed_out.
        Killed only once that is recorded, or it would end as failed, not timed_out."""
        self.timers.until_saved(f"job {attempt.job_id}: killing it for its --timeout",
                                lambda: self.kill_timed_out(attempt))

    def kill_timed_out(self, attempt):
        if attempt.ended or attempt.outcome is not None:
            return   # it has ended (only saving how may be held up: see record_end)
        row = self.store.job(attempt.job_id)
        if row["kill_requested_at"] is not None:
            return   # already being killed, by kill or remove_slave --kill: left as that
        reason = f"timed out after {_duration_text(row['timeout'])}"
        self.queue.request_kill(attempt.job_id, DEFAULT_KILL_GRACE, reason, timeout=True)
        self.log.info("job %s: %s; killing", attempt.job_id, reason)
        self.signal_kill(attempt, DEFAULT_KILL_GRACE)

    def signal_kill(self, attempt, grace):
        """Ask a supervisor to end its job's process group (TERM, then KILL after GRACE)."""
        if attempt.pidfd is None:
            return
        try:
            _write_file(run_file(self.run_dir, attempt.job_id, attempt.number, "kill"),
                        f"{DEFAULT_KILL_GRACE if grace is None else grace}")
        except OSError as error:
            self.log.error("job %s: cannot write its kill file (%s); killed with the "
                           "default grace of %gs", attempt.job_id, error.strerror,
                           DEFAULT_KILL_GRACE)
        try:
            signal.pidfd_send_signal(attempt.pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass   # already ending; its pidfd event settles it

    # --- ends ---------------------------------------------------------------

    def attempt_ended(self, attempt):
        self.selector.unregister(attempt.pidfd)
        os.close(attempt.pidfd)
        attempt.pidfd = None
        self.record_end(attempt)

    def record_end(self, attempt):
        """Settle an attempt whose supervisor has exited, or queue its job again if the
        script never started (no pid file: no room for it, or no supervisor at all).

        While the disk refuses the change (full, read-only), the attempt keeps
        its slot and its run files, and this runs again after a pause: an
        outcome is neither dropped nor recorded twice, and a restart meanwhile
        finds it in the .exit file.
        """
        self.timers.until_saved(f"job {attempt.job_id}: recording how it ended",
                                lambda: self.save_end(attempt),
                                then=lambda: self.after_end(attempt))

    def save_end(self, attempt):
        """record_end's part that the disk may refuse (and that is tried again)."""
        if attempt.outcome is None:
            attempt.outcome = self.outcome_of(attempt)
        row = self.store.job(attempt.job_id)
        if row["state"] != JobState.RUNNING.value or row["attempt"] != attempt.number:
            # An earlier try committed, and failed after (a read in a hook): never
            # save an end twice.
            if attempt.outcome is not None and attempt.saved is None:
                saved, = [entry for entry in self.store.attempts(attempt.job_id)
                          if entry["attempt"] == attempt.number]
                attempt.saved = (JobResult(saved["result"]), saved["reason"],
                                 row["state"] != JobState.DONE.value)
            return
        if attempt.outcome is None and row["kill_requested_at"] is not None:
            # Killed (or timed out) before its script could start: that is its end.
            attempt.outcome = {"exit_code": None, "signal": None,
                               "error": "ended before its script started"}
        attempt.row = row
        if attempt.outcome is None:
            self.queue.requeue(row)
        else:
            attempt.saved = self.queue.save_end(row, attempt.outcome)

    def after_end(self, attempt):
        """record_end's part once the end is saved: never run twice."""
        remove_run_files(self.run_dir, attempt.job_id, attempt.number)
        self.forget(attempt)
        if attempt.outcome is None:
            self.log.error("job %s: its script never started; queued again", attempt.job_id)
            # Not at once (the cause may last, a full disk): after a pause.
            self.queue.schedule_later(f"job {attempt.job_id} could not start")
        else:
            self.queue.script_started()
            self.queue.settled(attempt.row, attempt.outcome, *attempt.saved)

    def settle(self, attempt, row, outcome):
        """Recovery's record_end, for an attempt that ended while the server was away."""
        attempt.outcome, attempt.row = outcome, row
        attempt.saved = self.queue.save_end(row, outcome)
        self.after_end(attempt)

    def outcome_of(self, attempt):
        """What the supervisor of an ended attempt recorded; the 'vanished' outcome if it
        started the script but recorded nothing; None if it never started the script
        (no pid file).  OSError: the run files cannot be read now (out of fds, I/O)."""
        job_id, number = attempt.job_id, attempt.number
        try:
            outcome = read_outcome(self.run_dir, job_id, number)
        except ValueError:
            return self.vanished(attempt.pid, pid_file_time(self.run_dir, job_id, number))
        if outcome is not None:
            return outcome
        pid_path = run_file(self.run_dir, job_id, number, "pid")
        if attempt.pid is None or not os.path.lexists(pid_path):
            return None
        return self.vanished(attempt.pid, pid_file_time(self.run_dir, job_id, number))

    def forget(self, attempt):
        """An attempt has ended (or never started): its slots are free, and its
        worker's SSH masters may go if nothing else uses them."""
        attempt.ended = True
        if self.running.get(attempt.job_id) is attempt:
            del self.running[attempt.job_id]
        for worker, slots in attempt.parts:
            self.workers.release(worker, (attempt.job_id, attempt.number), slots)
            if attempt.control_dirs:
                self.release_control_dir(worker)

    # --- SSH masters --------------------------------------------------------

    def release_control_dir(self, worker_name):
        """Stop the SSH masters of a worker once nothing uses them any more: it is gone,
        or its jobs no longer share connections, and none of its running jobs did."""
        worker = self.workers.get(worker_name)
        if worker is not None and worker.ssh_reuse:
            return
        control_dir = self.jobs_ssh.control_dir(worker_name)
        if any(control_dir in attempt.control_dirs for attempt in self.running.values()):
            return
        stop_ssh_masters(control_dir)

    def release_ssh_root(self):
        """At stop: stop the masters that no running job uses; see JobsSsh.release."""
        in_use = {control_dir for attempt in self.running.values()
                  for control_dir in attempt.control_dirs}
        self.jobs_ssh.release(list(self.workers), in_use, bool(self.running))


###############################################################################
# Hooks: programs run when jobs end ############################################
###############################################################################

class HookRun:
    """One hook running, as the server watches it: its process (the leader of a
    session and process group of its own), the pidfd that tells its end, and
    the pipe of its output."""

    def __init__(self, row, process, pidfd):
        self.id = row["id"]
        self.job_id = row["job_id"]
        self.process = process
        self.pidfd = pidfd
        self.began = time.monotonic()   # for its duration, whatever the clock does
        self.lines = LineReader()
        self.logged = 0                 # bytes of its output that server.log took
        self.timed_out = False
        self.ended = False              # reaped: its pid and group id are ours no more


class Hooks:
    """Completion hooks (add_job --on-end, start --on-end).  As a job moves to done,
    a trigger makes a pending row of hook_runs for each of its hooks (see
    migration 12); this unit runs the pending ones, HOOKS_AT_ONCE at a time, each
    a process of its own: no shell, stdin /dev/null, its output logged in
    server.log as it comes, its end told by a pidfd, cut at the hook timeout
    (SIGTERM to its process group, SIGKILL HOOK_KILL_GRACE later).  Once it has
    ended, one transaction records how and marks the row done; a server that
    goes first (stop, kill -9) runs it again at its next start: at least once.
    It writes only its own rows, never a job's."""

    def __init__(self, store, timers, selector, log, log_dir):
        self.store = store
        self.rows = store.hook_rows
        self.timers = timers
        self.selector = selector
        self.log = log
        self.log_dir = log_dir
        self.on_end = None              # start --on-end (see Server.load)
        self.timeout = DEFAULT_HOOK_TIMEOUT
        self.running = {}               # hook run id -> HookRun
        self.saving = set()             # ids of runs ended whose end is not saved yet
        self.woken = False              # a look at the pending runs is due
        self.delay = RetryDelay()       # while the disk refuses to record a start

    def load(self):
        self.on_end = self.store.setting("on_end")
        self.timeout = self.store.setting("hook_timeout", DEFAULT_HOOK_TIMEOUT)
        self.wake()   # what ended while no server ran, or a kill -9 cut short

    def wake(self):
        """Jobs have ended: hooks may be pending.  The look is a timer due now, so
        that a batch of ends costs one."""
        if not self.woken:
            self.woken = True
            self.timers.add(time.time(), self.start_pending)

    def start_pending(self):
        self.woken = False
        room = HOOKS_AT_ONCE - len(self.running)
        if room > 0:
            for row in self.rows.pending(room, set(self.running) | self.saving):
                if not self.start(row):
                    return

    def start(self, row):
        """Start the hook of ROW (recorded first: a run started twice says so);
        False if the disk refused that, which is tried again after a pause."""
        try:
            with self.store.transaction():
                self.rows.started(row["id"], time.time())
        except self.timers.storage_errors as error:
            if not self.delay.seconds:
                self.log.error("hooks cannot start (%s); tried again until they can", error)
            self.woken = True
            self.timers.add(time.time() + self.delay.next(), self.start_pending)
            return False
        self.delay.reset()
        job = self.store.job(row["job_id"])
        began = time.monotonic()
        try:
            process = self.spawn(row, job)
        except OSError as error:
            self.log.warning("job %s: its hook %s cannot run: %s", row["job_id"],
                             json.loads(row["argv"])[0], error.strerror or error)
            self.finish(row["id"], row["job_id"], {
                "exit_code": None, "signal": None, "timed_out": False,
                "duration": time.monotonic() - began,
                "error": f"cannot run it: {error.strerror or error}"
                         + (f" ({error.filename})" if error.filename else "")})
            return True
        self.watch(row, process)
        return True

    def spawn(self, row, job):
        """The hook's process: in the job's directory, with the job's umask and its
        environment (see hook_environment).  Raises OSError."""
        import subprocess
        task = None if job["array_id"] is None else \
            (job["array_id"], job["task_id"], job["task_arg"])
        environment = hook_environment(
            self.store.environment(job["environment_id"]), json.loads(job["variables"]), row,
            job["id"], row["job_log"] or job_log_path(self.log_dir, job["id"]),
            json.loads(job["args"]), task)
        # A session of its own: its process group is what a timeout ends, and a
        # terminal's signals to the server's group do not reach it.
        process = subprocess.Popen(json.loads(row["argv"]), cwd=job["cwd"], env=environment,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   umask=job["umask"])
        os.set_blocking(process.stdout.fileno(), False)
        return process

    def watch(self, row, process):
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError as error:   # out of descriptors: it could never be waited for
            process.kill()
            process.wait()
            process.stdout.close()
            raise OSError(error.errno, f"cannot watch it: {error.strerror}") from None
        run = self.running[row["id"]] = HookRun(row, process, pidfd)
        self.selector.register(pidfd, EVENT_READ, lambda events: self.ended(run))
        self.selector.register(process.stdout, EVENT_READ, lambda events: self.read(run))
        self.timers.add(time.time() + self.timeout, lambda: self.cut(run), run)
        import shlex
        self.log.info("job %s: hook started: %s (pid %s)", run.job_id,
                      shlex.join(process.args), process.pid)

    # --- its output -----------------------------------------------------------

    def read(self, run, reads=1):
        """Log what the hook wrote, READS chunks at most (one per event: other events
        get their turn; more at its end, the rest of what is in the pipe)."""
        for _ in range(reads):
            try:
                chunk = os.read(run.process.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.close_output(run)
                return
            self.log_lines(run, run.lines.feed(chunk))
            if len(run.lines.pending) > HOOK_OUTPUT_LIMIT:   # a line that never ends
                self.log_lines(run, [bytes(run.lines.pending)])
                run.lines.pending.clear()

    def log_lines(self, run, lines):
        for line in lines:
            if run.logged < HOOK_OUTPUT_LIMIT:
                self.log.info("job %s: hook: %s", run.job_id,
                              line.decode(errors="replace")[:HOOK_LINE_LIMIT])
                run.logged += len(line) + 1
                if run.logged >= HOOK_OUTPUT_LIMIT:
                    self.log.info("job %s: hook: (the rest of its output is not logged)",
                                  run.job_id)

    def close_output(self, run):
        stdout = run.process.stdout
        if not stdout.closed:
            self.selector.unregister(stdout)
            stdout.close()

    # --- its end --------------------------------------------------------------

    def ended(self, run):
        """The hook's process has exited: log the rest of its output, end what it left
        in its group (while its zombie keeps that group id ours), reap it, and
        record how it went."""
        self.selector.unregister(run.pidfd)
        os.close(run.pidfd)
        if not run.process.stdout.closed:
            self.read(run, reads=16)
            self.log_lines(run, [bytes(run.lines.pending)] if run.lines.pending else [])
            self.close_output(run)   # (what it left behind may hold the pipe: not waited for)
        self.signal_group(run, signal.SIGTERM)
        status = run.process.wait()
        run.ended = True
        del self.running[run.id]
        outcome = {"exit_code": status if status >= 0 else None,
                   "signal": -status if status < 0 else None, "timed_out": run.timed_out,
                   "error": None, "duration": time.monotonic() - run.began}
        how = (f"timed out after {self.timeout:g}s" if run.timed_out else
               f"exit {status}" if status >= 0 else f"signal {-status}")
        log = self.log.info if status == 0 else self.log.warning
        log("job %s: hook ended (%s) in %.1fs", run.job_id, how, outcome["duration"])
        self.finish(run.id, run.job_id, outcome)

    def finish(self, run_id, job_id, outcome):
        """Record how hook run RUN_ID went (while the disk refuses, again after a
        pause: meanwhile it is not started again), then start the next ones."""
        ended_at = time.time()
        self.saving.add(run_id)

        def save():
            with self.store.transaction():
                self.rows.ended(run_id, outcome, ended_at)

        def saved():
            self.saving.discard(run_id)
            self.wake()
        self.timers.until_saved(f"job {job_id}: recording how its hook ended", save, saved)

    def cut(self, run):
        """The hook timeout has passed: end its process group, as kill ends a job's."""
        if run.ended:
            return
        run.timed_out = True
        self.log.warning("job %s: its hook still runs after %gs (start --hook-timeout); "
                         "ending it (SIGTERM, SIGKILL %gs later)", run.job_id, self.timeout,
                         HOOK_KILL_GRACE)
        self.signal_group(run, signal.SIGTERM)
        self.timers.add(time.time() + HOOK_KILL_GRACE,
                        lambda: self.signal_group(run, signal.SIGKILL), run)

    def signal_group(self, run, number):
        if run.ended:
            return   # reaped: its group id may be another's now
        try:
            os.killpg(run.process.pid, number)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self):
        """At stop: the hooks running end (SIGTERM); their runs stay pending, so the
        next start runs them again (at least once)."""
        for run in self.running.values():
            self.signal_group(run, signal.SIGTERM)
            self.log.info("job %s: its hook was ended by the server's stop; it runs again "
                          "at the next start", run.job_id)

    def describe(self):
        """start --on-end and the runs, as status --json shows them."""
        return {"on_end": self.on_end, "timeout": self.timeout, "at_once": HOOKS_AT_ONCE,
                "running": sorted(run.job_id for run in self.running.values()),
                "pending": self.rows.pending_count() - len(self.running) - len(self.saving)}


###############################################################################
# Services #####################################################################
###############################################################################

class HealthProbes:
    """The health checks of service replicas.  The prober process runs them (a TCP
    connect, or a command here), so that none holds up the loop: each replica of
    a service with a check is probed every interval from one interval after it
    starts, and FAILURES failed probes in a row restart it (killed as kill does;
    its service starts it again)."""

    def __init__(self, timers, selector, runner, log, log_dir):
        self.timers = timers
        self.selector = selector
        self.runner = runner
        self.log = log
        self.log_dir = log_dir
        self.pipe = HelperPipe(PROBER, "the health prober", selector, log, log_dir,
                               self.answered, self.gone)
        self.pending = {}          # probe id -> (attempt, probe, health)
        self.last_id = 0
        self.state = {}            # job id -> [failed probes in a row, healthy or None, why not]

    def watch(self, attempt, probe, health):
        self.state[attempt.job_id] = [0, None, None]
        self.later(attempt, probe, health)

    def later(self, attempt, probe, health):
        self.timers.add(time.time() + health["interval"],
                        lambda: self.probe(attempt, probe, health), attempt)

    def health_of(self, job_id):
        """(healthy, unhealthy or starting; why not) of a running replica."""
        failures, healthy, reason = self.state.get(job_id, (0, None, None))
        return ("starting" if healthy is None else "healthy" if healthy else "unhealthy",
                reason)

    def probe(self, attempt, probe, health):
        if attempt.ended or attempt.job_id not in self.state:
            self.state.pop(attempt.job_id, None)
            return
        if not self.pipe.running() and not self.pipe.start():
            self.later(attempt, probe, health)
            return
        self.last_id += 1
        self.pending[self.last_id] = (attempt, probe, health)
        self.pipe.write(dict(probe, id=self.last_id))

    def answered(self, result):
        attempt, probe, health = self.pending.pop(result["id"], (None, None, None))
        reason = result["reason"]
        if attempt is None or attempt.ended or attempt.job_id not in self.state:
            return
        state = self.state[attempt.job_id]
        if reason is None:
            state[:] = [0, True, None]
        else:
            state[:] = [state[0] + 1, False, reason]
            if state[0] >= health["failures"]:
                self.log.warning("job %s: %d health checks in a row failed (%s); restarting it",
                                 attempt.job_id, state[0], reason)
                self.runner.kill(attempt.job_id, DEFAULT_KILL_GRACE,
                                 f"restarted: {state[0]} health checks in a row failed "
                                 f"({reason})")
                return
        self.later(attempt, probe, health)

    def gone(self):
        """The prober died: its probes are asked again, of a new one, an interval later."""
        pending, self.pending = self.pending, {}
        for attempt, probe, health in pending.values():
            self.later(attempt, probe, health)

    def stop(self):
        self.pipe.stop()


def prober_main():
    """The replicas' health prober (cli.py _prober), a process of its own so that no
    probe holds up the server's loop.  It reads probes as JSON lines on stdin, runs
    each in a thread (PROBES_AT_ONCE at a time) and writes one JSON line per probe:
    {"id", "reason" (null if healthy)}.  A probe is {"id", "tcp": [host, port],
    "timeout"} or {"id", "cmd": argv, "env", "cwd", "timeout"}.  EOF on stdin (the
    server is gone) ends it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    output = threading.Lock()

    def run(probe):
        line = json.dumps({"id": probe["id"], "reason": run_probe(probe)}).encode() + b"\n"
        with output:
            try:
                while line:
                    line = line[os.write(1, line):]
            except OSError:
                os._exit(0)   # the server is gone
    lines = LineReader()
    with ThreadPoolExecutor(max_workers=PROBES_AT_ONCE) as pool:
        while True:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            for line in lines.feed(chunk):
                pool.submit(run, json.loads(line))


def run_probe(probe):
    """One health probe: None if the replica is healthy, else why not."""
    import subprocess
    timeout = probe["timeout"]
    if "tcp" in probe:
        host, port = probe["tcp"]
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return None
        except socket.timeout:
            return f"no TCP connection to {host}:{port} within {timeout:g}s"
        except OSError as error:
            return f"TCP connect to {host}:{port}: {error.strerror or error}"
    command = probe["cmd"][0] if probe["cmd"] else "(empty command)"
    try:
        result = subprocess.run(probe["cmd"], env=probe["env"], cwd=probe["cwd"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{command} took over {timeout:g}s"
    except (OSError, IndexError) as error:
        return f"cannot run {command}: {getattr(error, 'strerror', None) or error}"
    if result.returncode == 0:
        return None
    said = last_line(result.stdout.decode(errors="replace"))[:200]
    return f"{command} exited with status {result.returncode}" + (f": {said}" if said else "")


class Services:
    """Services: a job template and a number of replicas, each replica a job of its
    own (SERVICE, REPLICA and PORT in its environment), so that logs, kill,
    placement, history and recovery are the jobs'.  The Queue starts a replica
    again when its job ends while wanted (Queue.replica_ended, in the same
    transaction); this unit declares, scales, stops, starts and removes
    services, and makes the live replicas what is wanted (converge)."""

    def __init__(self, store, queue, edits, runner, workers, probes, log):
        self.store = store
        self.rows = store.service_rows
        self.queue = queue
        self.edits = edits
        self.runner = runner
        self.workers = workers
        self.probes = probes
        self.log = log

    def replica_running(self, attempt, row):
        """A replica runs (started, or adopted at start): its health check, if its
        service has one, begins an interval later."""
        service = self.rows.get(row["service"])
        if service is None or service["health"] is None:
            return
        health = json.loads(service["health"])
        if health.get("tcp"):
            host = self.workers.get(row["worker"]).job_endpoint()["host"]
            probe = {"tcp": [host, int(json.loads(row["variables"])["PORT"])],
                     "timeout": min(health["interval"], DEFAULT_SSH_TIMEOUT)}
        else:
            import shlex
            probe = {"cmd": shlex.split(health["cmd"]), "env": self.runner.environment_of(row),
                     "cwd": row["cwd"], "timeout": health["interval"]}
        self.probes.watch(attempt, probe, health)

    def existing(self, name):
        service = self.rows.get(name)
        if service is None:
            raise UserError(f"unknown service {name!r}; see ./cli.py services")
        return service

    def add(self, name, script, args, cwd, environment, variables, umask, options, replicas,
            port, health):
        """Declare a service and queue its replicas, all in one transaction."""
        if self.rows.get(name) is not None:
            raise UserError(f"a service named {name!r} exists already: choose another name, "
                            f"or change it with ./cli.py scale {name} N")
        check_script(script)
        self.check_room(options, replicas)
        with self.queue.changes():
            environment_id = self.store.intern_environment(environment)
            self.rows.insert(name, script, args, cwd, environment_id, variables,
                                      umask, options, replicas, port, health)
        self.log.info("service %s: added, %d replica(s) of %s", name, replicas,
                      os.path.basename(script))
        self.converge(name)

    def check_room(self, options, replicas, workers=None):
        """Refuse more replicas than the workers a service may use can hold at once
        (WORKERS: those, if not the registered ones; see Workers.as_replaced)."""
        allowed = (self.workers if workers is None else workers).check_placement(options)
        wanted = options["slots_wanted"]
        room = sum(worker.slots // wanted for worker in allowed)
        if replicas > room:
            slots = f"{wanted} slots" if wanted > 1 else "1 slot"
            raise UserError(f"{replicas} replicas of {slots} each do not fit: the workers it "
                            f"may use hold {room} at once; add workers (./cli.py add_slave), "
                            "or ask for fewer")

    def scale(self, name, replicas, grace):
        service = self.existing(name)
        if replicas > service["replicas"]:
            self.check_room(json.loads(service["options"]), replicas)
        with self.queue.changes():
            self.rows.set(name, replicas=replicas)
        self.log.info("service %s: scaled from %d to %d", name, service["replicas"], replicas)
        return self.converge(name, grace, f"service {name} scaled to {replicas}")

    def set_enabled(self, name, enabled, grace):
        """stop_service (ENABLED false: every replica stops, the spec stays) and
        start_service."""
        service = self.existing(name)
        if bool(service["enabled"]) == enabled:
            raise UserError(f"service {name} is already {'started' if enabled else 'stopped'}")
        with self.queue.changes():
            self.rows.set(name, enabled=int(enabled))
        self.log.info("service %s: %s", name, "started" if enabled else "stopped")
        return self.converge(name, grace, f"service {name} stopped")

    def remove(self, name, grace):
        """Forget a service; its replicas stop.  Returns the running jobs being stopped."""
        self.existing(name)
        with self.queue.changes():
            self.rows.delete(name)
            self.store.drop_unused_environments()
        self.log.info("service %s: removed", name)
        return self.converge(name, grace, f"service {name} removed")

    def converge(self, name, grace=DEFAULT_KILL_GRACE, why=None):
        """Queue the missing replicas of service NAME and stop those not wanted (the
        highest numbers first).  Returns the ids of running jobs being stopped."""
        service = self.rows.get(name)
        desired = service["replicas"] if service is not None and service["enabled"] else 0
        live = self.rows.live_replicas(name)
        start, stop = replicas_to_change(desired, live)
        if start:
            with self.queue.changes() as changes:
                for replica in start:
                    changes.moved([self.rows.insert_replica(service, replica)],
                                  JobState.WAITING)
        waiting = [live[replica]["id"] for replica in stop
                   if live[replica]["state"] == JobState.WAITING.value]
        running = [live[replica]["id"] for replica in stop
                   if live[replica]["state"] == JobState.RUNNING.value]
        if waiting:
            self.queue.kill_waiting(waiting, reason=f"not started: {why}")
        for job_id in running:
            self.runner.kill(job_id, grace, f"stopped: {why}")
        return running

    def move_off(self, name, why):
        """Worker NAME takes no new job (WHY): its replicas stop, to start again on a
        worker their placement allows; those that may run nowhere else stay."""
        for row in self.rows.running_on(name):
            run_on, exclude = json.loads(row["run_on"] or "null"), \
                json.loads(row["exclude"] or "[]")
            elsewhere = [worker for worker in self.workers.all() if worker.name != name and
                         (run_on is None or worker.name in run_on) and
                         worker.name not in exclude and worker.state != WorkerState.DRAINING]
            if elsewhere:
                self.runner.kill(row["id"], DEFAULT_KILL_GRACE,
                                 f"moved: worker {name} is {why}")

    def move_off_unusable(self):
        """Workers came or changed: replicas that stayed on workers being removed, down
        or set aside (nowhere else to go, then) may move now."""
        for worker in self.workers.all():
            if worker.state == WorkerState.DRAINING or worker.health != WorkerHealth.UP:
                self.move_off(worker.name, "being removed" if worker.state ==
                              WorkerState.DRAINING else worker.health.value.replace("_", " "))

    def converge_all(self):
        """At start: services whose replicas a crash (or an older cli.py) left short."""
        names = {row["name"] for row in self.rows.all()} | \
            self.rows.with_live_jobs()
        for name in sorted(names):
            self.converge(name)

    def describe(self, name=None):
        """Each service (or NAME) as services --json shows it."""
        now = time.time()
        rows = [self.existing(name)] if name is not None else self.rows.all()
        described = []
        for service in rows:
            live = self.rows.live_replicas(service["name"])
            records = self.rows.replica_records(service["name"])
            last = self.rows.last_end(service["name"])
            options = json.loads(service["options"])
            replicas = []
            for number in sorted(set(live) | set(range(service["replicas"]))):
                job = live.get(number)
                health = None
                if job is not None and job["state"] == "running":
                    health = self.probes.health_of(job["id"]) if service["health"] \
                        else ("healthy", None)
                replicas.append(describe_replica(number, job, records.get(number), health,
                                                 now))
            described.append({
                "name": service["name"], "script": service["script"],
                "args": json.loads(service["args"]), "cwd": service["cwd"],
                "envs": json.loads(service["variables"]),
                "replicas": service["replicas"], "port": service["port"],
                "enabled": bool(service["enabled"]),
                "health": json.loads(service["health"]) if service["health"] else None,
                "running": sum(replica["state"] == "running" for replica in replicas),
                "healthy": sum(replica["health"] == "healthy" for replica in replicas),
                "restarts": sum(record["restarts"] for record in records.values()),
                "last_end": None if last is None else
                end_text(last["result"], last["exit_code"], last["signal"]),
                "slots": options["slots_wanted"], "ssh_reuse": options["ssh_reuse"],
                "on": json.loads(options["run_on"]) if options["run_on"] else None,
                "prefer": json.loads(options["prefer"]) if options["prefer"] else None,
                "exclude": json.loads(options["exclude"]) if options["exclude"] else None,
                "resources": need_json(options.get("resources")),
                "instances": replicas})
        return described

    # --- load_services: the services of a document, all at once ----------

    def spec_of(self, row):
        """A stored service as a spec (see service_differences)."""
        return {"name": row["name"], "script": row["script"], "args": json.loads(row["args"]),
                "cwd": row["cwd"], "envs": json.loads(row["variables"]), "port": row["port"],
                "health": json.loads(row["health"]) if row["health"] else None,
                "options": json.loads(row["options"]), "replicas": row["replicas"],
                "enabled": bool(row["enabled"])}

    def plan(self, specs, workers=None):
        """The differences (see service_differences) between the services and SPECS,
        a checked document (validate_services), each with its "spec"; refused
        (naming the entry) where add_service or scale would refuse it.  WORKERS:
        the ones to place them on (load_status: the document's), else ours."""
        current = {row["name"]: self.spec_of(row) for row in self.rows.all()}
        by_name = {spec["name"]: spec for spec in specs}
        differences = service_differences(current, specs)
        for difference in differences:
            spec = difference["spec"] = by_name.get(difference["name"])
            before, after = difference["replicas"]
            if difference["change"] in ("added", "changed") or \
                    difference["change"] == "scaled" and after > before:
                try:
                    self.check_room(spec["options"], after, workers)
                except UserError as error:
                    raise UserError(f"{spec['where']}: {error}") from None
        return differences

    def write(self, changes, differences, grace):
        """The services become what DIFFERENCES say, in the caller's transaction
        (CHANGES).  A changed service is removed and added again, and its live
        replicas stop in the same transaction (the waiting ones end, the kills of
        the running ones are recorded), so that no crash leaves the old spec
        running.  Returns (job id, why) of those running, for follow to kill."""
        restarting = []
        for difference in differences:
            name, spec, change = difference["name"], difference["spec"], difference["change"]
            if change in ("changed", "removed"):
                self.rows.delete(name)
            if change in ("added", "changed"):
                environment_id = self.store.intern_environment(spec["environment"])
                self.rows.insert(name, spec["script"], spec["args"], spec["cwd"],
                                          environment_id, spec["envs"], spec["umask"],
                                          spec["options"], spec["replicas"], spec["port"],
                                          spec["health"])
                if not spec["enabled"]:
                    self.rows.set(name, enabled=0)
            elif change == "scaled":
                self.rows.set(name, replicas=spec["replicas"])
            elif change in ("started", "stopped"):
                self.rows.set(name, enabled=int(spec["enabled"]))
            if change == "changed":
                why = f"restarted: service {name} changed"
                live = self.rows.live_replicas(name).values()
                waiting = [row["id"] for row in live if row["state"] == JobState.WAITING.value]
                if waiting:
                    self.queue.end_waiting(changes, waiting,
                                           f"not started: service {name} changed")
                for row in live:
                    if row["state"] == JobState.RUNNING.value:
                        self.store.request_kill(row["id"], grace, why)
                        restarting.append((row["id"], why))
        self.store.drop_unused_environments()
        return restarting

    def follow(self, differences, restarting, grace, every=False):
        """Once the services are written: the missing replicas are queued, those no
        longer wanted stop (as scale, stop_service and remove_service stop them),
        and those of changed services are killed, to start again with the new
        spec (Queue.replica_ended).  EVERY: look at every service (load_status
        replaced the waiting replicas with the waiting queue).  Returns the ids
        of the running jobs being stopped."""
        whys = {}
        for difference in differences:
            name, change = difference["name"], difference["change"]
            self.log.info("service %s: %s, as the document loaded says%s", name, change,
                          f" ({', '.join(difference['fields'])})" if difference["fields"]
                          else "")
            whys[name] = f"service {name} scaled to {difference['replicas'][1]}" \
                if change == "scaled" else f"service {name} {change}"
        names = set(whys)
        if every:
            names |= {row["name"] for row in self.rows.all()} | \
                self.rows.with_live_jobs()
        stopping = []
        for name in sorted(names):
            stopping += self.converge(name, grace, whys.get(name, "load_status"))
        for job_id, why in restarting:
            if job_id not in stopping and job_id in self.runner.running:
                self.runner.kill(job_id, grace, why)
                stopping.append(job_id)
        return stopping

    def load(self, specs, grace):
        """load_services: the services become those of SPECS, all or none, in one
        transaction; returns (the differences, the running jobs being stopped)."""
        differences = self.plan(specs)
        with self.queue.changes() as changes:
            restarting = self.write(changes, differences, grace)
        return differences, self.follow(differences, restarting, grace)

    def load_status(self, workers, jobs, paused, specs, also=None):
        """load_status: the Queue replaces the workers and the waiting queue, and, if
        the document has services (SPECS), they become those, in the same
        transaction (and ALSO(changes) does its part there); checked against the
        document's workers before anything changes.  Returns (whether the jobs
        kept their ids, the differences, the running jobs being stopped)."""
        differences = [] if specs is None else \
            self.plan(specs, self.workers.as_replaced(workers))
        restarting = []

        def write(changes):
            restarting.extend(self.write(changes, differences, DEFAULT_KILL_GRACE))
            if also is not None:
                also(changes)
        keep_ids = self.edits.load_status(workers, jobs, paused, write)
        return keep_ids, differences, self.follow(differences, restarting,
                                                  DEFAULT_KILL_GRACE, every=True)


def describe_replica(number, job, record, health, now):
    """One replica as services NAME shows it: its live job (if any), its record, and
    HEALTH: (healthy, unhealthy or starting; the last failed probe's reason) while
    it runs."""
    state = "stopped" if job is None else "running" if job["state"] == "running" else \
        "waiting"
    since = None if job is None else job["started_at"] if job["state"] == "running" else \
        job["submitted_at"]
    why = None
    if job is not None and job["state"] == "waiting" and job["not_before"] and \
            job["not_before"] > now and record is not None and record["last_end"]:
        why = (f"{'crash loop' if record['delay'] > RESTART_FIRST else 'restarting'}: "
               f"{record['last_end']}, next try in {_duration_text(job['not_before'] - now)}")
    return {"replica": number, "state": state, "job": None if job is None else job["id"],
            "worker": job["worker"] if job is not None else None,
            "since": iso_time(since) if since else None,
            "health": health[0] if health else None,
            "health_reason": health[1] if health else None,
            "restarts": record["restarts"] if record is not None else 0,
            "last_end": record["last_end"] if record is not None else None, "why": why}


###############################################################################
# Schedules ####################################################################
###############################################################################

class Schedules:
    """Schedules: a job template and a rule (--every, --daily, --cron, or the
    successes of another schedule); each firing queues a normal job with
    SCHEDULE and SCHEDULED_FOR in its environment.  The server's one timer
    wakes fire_due at the earliest due time (nothing polls); a firing's job
    and the schedule's next due time are one transaction, so that no due time
    fires twice, across kill -9 too."""

    def __init__(self, store, queue, workers, timers, log):
        self.store = store
        self.rows = store.schedules
        self.queue = queue
        self.workers = workers
        self.timers = timers
        self.log = log
        self.zone = local_zone()
        self.started = time.time()   # due times before this passed while no server ran
        self.armed_for = None        # the due time the timer is set for, if any
        self.followed = set()        # names of the schedules others follow

    def load(self):
        """At start: the successes that other schedules follow and that no server saw,
        then the schedules due (missed ones fire once, or not with --skip-missed)."""
        self.started = time.time()
        self.changed()
        self.follow()

    def existing(self, name):
        row = self.rows.get(name)
        if row is None:
            raise UserError(f"unknown schedule {name!r}; see ./cli.py schedules")
        return row

    def add(self, name, rule, script, args, cwd, environment, variables, umask, options,
            overlap, skip_missed):
        if self.rows.get(name) is not None:
            raise UserError(f"a schedule named {name!r} exists already: choose another name, "
                            f"or remove it first (./cli.py remove_schedule {name})")
        if "after" in rule:
            self.existing_followed(rule["after"])
        check_script(script)
        self.workers.check_placement(options)
        with self.queue.changes():
            self.rows.insert(name, rule, script, args, cwd,
                             self.store.intern_environment(environment), variables, umask,
                             options, overlap, skip_missed, self.first_due(rule),
                             followed=self.latest_run(rule))
        self.log.info("schedule %s: added, %s, runs %s", name, rule_text(rule),
                      os.path.basename(script))
        self.changed()
        return self.describe([self.rows.get(name)])[0]

    def existing_followed(self, name):
        if self.rows.get(name) is None:
            raise UserError(f"--after-schedule {name}: no such schedule; see ./cli.py "
                            "schedules")

    def first_due(self, rule):
        return next_due_time(rule, time.time(), self.zone)

    def latest_run(self, rule):
        """For a rule that follows schedule NAME: its newest success so far, which the
        new follower does not follow (only the ones after it)."""
        if "after" not in rule:
            return None
        row = self.rows.latest_success(rule["after"], 0)
        return row["id"] if row is not None else 0

    def remove(self, name):
        self.existing(name)
        followers = [row["name"] for row in self.rows.followers({name})]
        if followers:
            raise UserError(f"schedule {followers[0]} follows {name} (--after-schedule): "
                            f"remove it first; nothing was changed")
        with self.queue.changes():
            self.rows.delete(name)
            self.store.drop_unused_environments()
        self.log.info("schedule %s: removed (its jobs stay)", name)
        self.changed()

    def set_enabled(self, name, enabled):
        """pause_schedule (no firing until resumed) and resume_schedule: the next due
        time counts from now; times that passed while paused do not fire."""
        row = self.existing(name)
        if bool(row["enabled"]) == enabled:
            raise UserError(f"schedule {name} is already {'running' if enabled else 'paused'}")
        rule = json.loads(row["rule"])
        with self.queue.changes():
            self.rows.set_enabled(name, enabled, self.first_due(rule) if enabled
                                  else row["next_due"], self.latest_run(rule))
        self.log.info("schedule %s: %s", name, "resumed" if enabled else "paused")
        self.changed()

    def run_now(self, name):
        """run_schedule: fire once now (a paused schedule too); a --every schedule
        counts its next run from this one.  Returns the job's id."""
        row = self.existing(name)
        if not row["overlap"] and self.previous_live(row):
            raise UserError(f"schedule {name}'s previous run, job {row['last_job']}, has not "
                            f"ended: wait for it (./cli.py wait {row['last_job']}) or kill it; "
                            "or add the schedule with --overlap")
        now = time.time()
        rule = json.loads(row["rule"])
        next_due = now + rule["every"] if "every" in rule and row["enabled"] else \
            row["next_due"]
        job_id = self.move_on(row, "fire", now, next_due, check_due=False)
        self.arm()
        return job_id

    def replace(self, changes, specs):
        """load_status: the schedules become SPECS (see validate_schedules), in the
        caller's transaction (CHANGES).  A loaded follower follows only the
        successes that come after."""
        self.rows.delete_all()
        now = time.time()
        for spec in specs:
            rule = spec["rule"]
            next_due = None if "after" in rule else \
                spec["next_due"] or next_due_time(rule, now, self.zone)
            self.rows.insert(spec["name"], rule, spec["script"], spec["args"], spec["cwd"],
                             self.store.intern_environment(spec["environment"]),
                             spec["envs"], spec["umask"], spec["options"], spec["overlap"],
                             spec["skip_missed"], next_due, spec["enabled"], spec["runs"],
                             spec["skipped"], followed=self.latest_run(rule))
        changes.then(self.changed)

    # --- firing -------------------------------------------------------------

    def changed(self):
        self.followed = {json.loads(row["rule"])["after"] for row in self.rows.followers()}
        self.arm()

    def arm(self):
        """Have the server's timer call fire_due at the earliest due time."""
        due = self.rows.next_due()
        if due is not None and (self.armed_for is None or due < self.armed_for):
            self.armed_for = due
            self.timers.add(due, lambda: self.timers.until_saved("firing schedules",
                                                                 self.fire_due))

    def fire_due(self):
        """The timer's call: each schedule whose time has come fires, skips (its
        previous run has not ended) or, with --skip-missed, lets a missed time go."""
        self.armed_for = None
        now = time.time()
        for row in self.rows.due(now):
            outcome = schedule_firing(row["next_due"], now, self.started, row["skip_missed"],
                                      row["overlap"], self.previous_live(row))
            self.move_on(row, outcome, row["next_due"],
                         next_due_time(json.loads(row["rule"]), now, self.zone))
        self.arm()

    def previous_live(self, row):
        state = self.rows.job_states([row["last_job"]]).get(row["last_job"])
        return state is not None and state[0] != JobState.DONE.value

    def move_on(self, row, outcome, due, next_due, check_due=True, followed=None):
        """One transaction: the run's job (if OUTCOME is fire) and the schedule's next
        due time and counters.  Returns the job's id, or None."""
        name = row["name"]
        with self.queue.changes() as changes:
            job_id = self.insert_run(row, due) if outcome == "fire" else None
            self.rows.moved_on(name, row["next_due"] if check_due else None, next_due,
                               outcome, job_id, followed)
            if job_id is not None:
                changes.moved([job_id], JobState.WAITING)
        if job_id is not None and json.loads(row["options"]).get("run_on"):
            # Its --on workers may have gone since the schedule was added.
            self.timers.until_saved("skipping the --on jobs that no worker left can run",
                                    self.queue.skip_stranded)
        shown = iso_time(due)
        if outcome == "fire":
            self.log.info("schedule %s: job %d queued (due %s)", name, job_id, shown)
        elif outcome == "skip":
            self.log.info("schedule %s: due %s, skipped: its previous run, job %s, has not "
                          "ended (--overlap allows it)", name, shown, row["last_job"])
        else:
            self.log.info("schedule %s: due %s while no server ran or the machine slept; "
                          "let go (--skip-missed)", name, shown)
        return job_id

    def insert_run(self, row, due):
        # JOB_OPTIONS first: a schedule saved before a new option carries its default.
        options = {**JOB_OPTIONS, **json.loads(row["options"]), "not_before": None}
        variables = dict(json.loads(row["variables"]), SCHEDULE=row["name"],
                         SCHEDULED_FOR=local_iso_time(due, self.zone))
        return self.store.insert_job(row["script"], json.loads(row["args"]), row["cwd"],
                                     row["environment_id"], variables, row["umask"], options,
                                     schedule=row["name"], scheduled_for=due)

    def runs_ended(self, job_ids):
        """Jobs ended: the schedules that follow theirs may fire."""
        if self.followed and self.rows.succeeded_among(job_ids, self.followed):
            self.timers.until_saved("following schedules", self.follow)

    def follow(self):
        """Each enabled follower of a schedule whose newest success it has not followed
        fires once for it (skips, if its own previous run has not ended)."""
        for row in self.rows.followers():
            if not row["enabled"]:
                continue
            success = self.rows.latest_success(json.loads(row["rule"])["after"],
                                               row["followed_job"])
            if success is not None:
                outcome = "skip" if not row["overlap"] and self.previous_live(row) else "fire"
                self.move_on(row, outcome, success["ended_at"], None, check_due=False,
                             followed=success["id"])

    # --- what schedules and status show ---------------------------------------

    def describe(self, rows=None):
        """The schedules (ROWS, or all) as schedules --json and status --json show them;
        load_status reads them back."""
        rows = self.rows.all() if rows is None else rows
        last = self.rows.job_states([row["last_job"] for row in rows])
        return [schedule_to_json(row, last.get(row["last_job"])) for row in rows]


def schedule_to_json(row, last_state):
    """A schedule's public form; LAST_STATE: (state, result) of its latest run."""
    options = json.loads(row["options"])
    return {
        "name": row["name"],
        "rule": json.loads(row["rule"]),
        "rule_text": rule_text(json.loads(row["rule"])),
        "script": row["script"],
        "args": json.loads(row["args"]),
        "cwd": row["cwd"],
        "envs": json.loads(row["variables"]),
        "environment": row["environment_id"],
        "umask": row["umask"],
        "overlap": bool(row["overlap"]),
        "skip_missed": bool(row["skip_missed"]),
        "paused": not row["enabled"],
        "next_due": iso_time(row["next_due"]) if row["enabled"] else None,
        "last_job": row["last_job"],
        "last_state": None if last_state is None else last_state[0],
        "last_result": None if last_state is None else last_state[1],
        "runs": row["runs"],
        "skipped": row["skipped"],
        "slots_wanted": options.get("slots_wanted", 1),
        "split": options.get("split", False),
        "on": json.loads(options.get("run_on") or "null"),
        "prefer": json.loads(options.get("prefer") or "null"),
        "exclude": json.loads(options.get("exclude") or "null"),
        "on_end": json.loads(options.get("on_end") or "null"),
        "resources": need_json(options.get("resources")),
        **{name: options.get(name, JOB_OPTIONS[name])
           for name in ("ssh_reuse", "priority", "retries", "retry_delay", "timeout",
                        "estimate")},
    }


def local_iso_time(moment, zone):
    """MOMENT in ZONE's local time, ISO 8601 with its offset (SCHEDULED_FOR)."""
    from datetime import datetime
    return datetime.fromtimestamp(moment, zone).isoformat(timespec="seconds")


###############################################################################
# Health monitor ###############################################################
###############################################################################

def start_helper_process(command, log_dir, pass_fds=()):
    """Start cli.py's hidden COMMAND (the health checker, the prober, the dashboard),
    its pipes set never to block the loop, its stderr going to server.log, and
    PASS_FDS open in it.  Raises OSError."""
    import subprocess
    with open(os.path.join(log_dir, SERVER_LOG_FILE), "ab") as errors:
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), command],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=errors, cwd="/", pass_fds=pass_fds)
    for stream in (process.stdin, process.stdout):
        os.set_blocking(stream.fileno(), False)
    return process


class HelperPipe:
    """A helper process of the server's (the health checker, the prober, the
    dashboard) and its pipes: JSON lines written to its stdin without ever
    blocking the loop (what the pipe does not take waits for EVENT_WRITE), JSON
    lines read from its stdout handed to ON_LINE, and ON_GONE called if it dies."""

    def __init__(self, command, name, selector, log, log_dir, on_line, on_gone):
        self.command = command
        self.name = name
        self.selector = selector
        self.log = log
        self.log_dir = log_dir
        self.on_line = on_line
        self.on_gone = on_gone
        self.process = None
        self.unsent = bytearray()    # what the pipe has not taken yet
        self.latest = None           # write(latest=True): sent once unsent is
        self.lines = LineReader()

    def running(self):
        return self.process is not None

    def start(self, pass_fds=()):
        """Start the process (with PASS_FDS open in it); False (logged) if it cannot be."""
        try:
            self.process = start_helper_process(self.command, self.log_dir, pass_fds)
        except OSError as error:
            self.log.error("cannot start %s: %s", self.name, error)
            return False
        self.selector.register(self.process.stdout, EVENT_READ, self.readable)
        self.unsent, self.latest, self.lines = bytearray(), None, LineReader()
        return True

    def write(self, message, latest=False):
        """Send MESSAGE; LATEST: it replaces the previous such message not sent yet
        (only the newest matters)."""
        line = json.dumps(message).encode() + b"\n"
        if latest:
            self.latest = line
        else:
            self.unsent += line
        self.writable()

    def writable(self, events=0):
        process = self.process
        if process is None:
            return
        while True:
            if not self.unsent:
                if self.latest is None:
                    break
                self.unsent, self.latest = bytearray(self.latest), None
            try:
                del self.unsent[:os.write(process.stdin.fileno(), self.unsent)]
            except BlockingIOError:
                break
            except OSError:
                self.gone()
                return
        registered = self.selector.get_map().get(process.stdin.fileno()) is not None
        if self.unsent and not registered:
            self.selector.register(process.stdin, EVENT_WRITE, self.writable)
        elif not self.unsent and registered:
            self.selector.unregister(process.stdin)

    def readable(self, events):
        try:
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.gone()
            return
        for line in self.lines.feed(chunk):
            self.on_line(json.loads(line))
            if self.process is None:
                return   # ON_LINE stopped it

    def gone(self):
        self.log.warning("%s stopped; starting a new one", self.name)
        self.stop()
        self.on_gone()

    def stop(self):
        if self.process is None:
            return
        process, self.process = self.process, None
        for stream in (process.stdin, process.stdout):
            if self.selector.get_map().get(stream.fileno()) is not None:
                self.selector.unregister(stream)
            try:
                stream.close()
            except OSError:
                pass
        process.terminate()   # it may be busy for a while (a round of hung hosts)
        import subprocess   # imported when the process was started: free here
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class HealthMonitor:
    """The server's side of the health checker (health_checker_main): which workers
    it checks, over a pipe written without blocking, and what its results do."""

    def __init__(self, workers, timers, selector, log, log_dir, check_interval):
        self.workers = workers
        self.timers = timers
        self.selector = selector
        self.log = log
        self.log_dir = log_dir
        self.check_interval = check_interval
        self.ssh_config = None     # the queue's (see Server.load)
        self.pipe = HelperPipe(HEALTH_CHECKER, "the health checker", selector, log, log_dir,
                               self.result, self.gone)
        self.endpoints_fresh = False  # the workers' endpoints resolved since this start

    def update(self, now=False):
        """Tell the health checker which workers to check (those added with the SSH
        check, and those set aside, unless being removed); start it if it is not
        running."""
        checked = self.check_interval > 0
        names = [worker.name for worker in self.workers.all()
                 if checked and (worker.ssh_checked or worker.set_aside_at)
                 and worker.state != WorkerState.DRAINING]
        for worker in self.workers.all():
            # A set-aside worker without checks waits for resume HOST; a draining
            # one is down until it goes.
            if worker.health == WorkerHealth.DOWN and worker.name not in names and \
                    worker.state != WorkerState.DRAINING:
                # Nothing will check it again: down would be for ever.
                self.checked(worker.name, None, worker.checked_at)
        # Every worker once per start (its ssh config may have changed meanwhile), then
        # those added without an endpoint.
        resolve = [worker.name for worker in self.workers.all()
                   if worker.endpoint is None or not self.endpoints_fresh]
        self.endpoints_fresh = True
        if not self.pipe.running() and not names and not resolve:
            return
        if not self.pipe.running():
            if not self.pipe.start():
                return
            now = True
        # Only the newest list matters: it replaces one not yet sent, and the
        # pipe is written without blocking (a checker busy with a round of hung
        # hosts reads nothing for a while).
        request = {"workers": names, "interval": self.check_interval,
                   "timeout": min(DEFAULT_SSH_TIMEOUT, self.check_interval) or
                   DEFAULT_SSH_TIMEOUT, "now": now, "ssh_config": self.ssh_config,
                   "resolve": resolve,
                   "fresh": [worker.name for worker in self.workers.all()
                             if worker.health == WorkerHealth.SET_ASIDE]}
        self.pipe.write(request, latest=True)

    def result(self, result):
        if result.get("endpoint"):
            self.workers.endpoint_resolved(result["worker"], result["endpoint"])
        if "reason" in result:
            self.checked(result["worker"], result["reason"], result["at"],
                         result.get("started", result["at"]))

    def checked(self, name, reason, at, started=None):
        """One check's result: a worker goes down, comes back up, or stays as it was."""
        worker = self.workers.get(name)
        if worker is None:
            return   # removed since
        if not worker.ssh_checked and not worker.set_aside_at:
            return   # no longer checked (resume took it back): a result on its way is stale
        if worker.health == WorkerHealth.SET_ASIDE and started is not None and \
                started < worker.set_aside_at:
            return   # a check (or connection) from before its jobs failed proves nothing
        # A set-aside worker whose check fails is down, for that reason; it is checked
        # until a check passes (see update), even if added without the check.
        self.workers.set_health(worker, WorkerHealth.UP if reason is None
                                else WorkerHealth.DOWN, reason, at)

    def gone(self):
        """The health checker died: a new one starts an interval later."""
        self.timers.add(time.time() + self.check_interval, self.update)

    def stop(self):
        self.pipe.stop()


###############################################################################
# Activity: what the live views show ###########################################
###############################################################################

# Prometheus-style bucket bounds (seconds): how long jobs waited in the queue,
# and how long the scheduler took from "a slot is free or a job is ready" to
# the start.
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 14400, 86400)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Histogram:
    """Counts of observations at most each bound, Prometheus's way (cumulative on
    output), with their sum."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last: above every bound
        self.sum = 0.0

    def observe(self, value):
        import bisect
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def to_json(self):
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class Activity:
    """What happened lately, for the live views (top, the dashboard) and /metrics:
    starts and ends per minute over the last hour, the ends of the last minute,
    queue waits and scheduling latency.  Runtime state, fed by the Server's
    events: it begins empty with each server (the jobs table keeps the history)."""

    def __init__(self):
        import collections
        self.since = time.time()
        self.minutes = collections.OrderedDict()   # epoch minute -> [starts, ends]
        self.last_minute_ends = collections.deque()
        self.starts = 0
        self.ends = 0
        self.waits = Histogram(WAIT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.room_since = None                      # monotonic: when room was first made

    def minute(self, now):
        key = int(now // 60)
        if key not in self.minutes:
            self.minutes[key] = [0, 0]
            while len(self.minutes) > 60:
                self.minutes.popitem(last=False)
        return self.minutes[key]

    def room_made(self):
        if self.room_since is None:
            self.room_since = time.monotonic()

    def started(self, rows):
        """ROWS (jobs) just started: their waits, and the scheduler's latency."""
        now = time.time()
        if self.room_since is not None and rows:
            latency = time.monotonic() - self.room_since
            for _ in rows:
                self.latency.observe(latency)
        self.room_since = None
        self.starts += len(rows)
        self.minute(now)[0] += len(rows)
        for row in rows:
            self.waits.observe(max(0.0, now - max(row["submitted_at"],
                                                  row["not_before"] or 0)))

    def ended(self, count):
        now = time.time()
        self.ends += count
        self.minute(now)[1] += count
        self.last_minute_ends.extend([now] * min(count, LIVE_RATE_SAMPLES))
        self.forget(now)

    def forget(self, now):
        while self.last_minute_ends and self.last_minute_ends[0] < now - 60 or \
                len(self.last_minute_ends) > LIVE_RATE_SAMPLES:
            self.last_minute_ends.popleft()

    def rate(self):
        """Jobs ended per minute, over the last minute (or since the server started)."""
        now = time.time()
        self.forget(now)
        span = min(60.0, max(now - self.since, 1.0))
        return len(self.last_minute_ends) * 60.0 / span

    def to_json(self):
        now = time.time()
        first = int(now // 60) - 59
        return {"since": iso_time(self.since), "starts": self.starts, "ends": self.ends,
                "per_minute": [[iso_time(minute * 60), *self.minutes.get(minute, (0, 0))]
                               for minute in range(first, first + 60)],
                "ends_per_minute": round(self.rate(), 1),
                "waits": self.waits.to_json(), "latency": self.latency.to_json()}


class Watcher:
    """A live-view client (top, the dashboard): it gets a snapshot of the queue when
    something changed, at most once per its INTERVAL and as often as the
    snapshots' cost allows."""

    def __init__(self, client, interval):
        self.client = client
        self.interval = interval
        self.dirty = True
        self.due = 0.0              # monotonic: its next snapshot, at the soonest

    def ready(self, now):
        """Something new, the last snapshot read, and its interval over."""
        return self.dirty and not self.client.outgoing and self.due <= now


###############################################################################
# Dashboard: the server's side #################################################
###############################################################################

class Dashboard:
    """The web dashboard as the server runs it: off until the `dashboard` request
    turns it on, then a setting (the next start brings it back, on the address it
    had) until `dashboard --stop`.  The TCP socket is bound here, so that a port
    already taken is that request's error, and a helper that dies is replaced on
    the same socket.  The helper process (dashboard_main) serves HTTP and is a
    client of this server like any command: no page costs the loop more than a
    request does.  Kept: the setting and the token file; rebuilt on start: the
    socket and the process."""

    def __init__(self, store, timers, selector, log, paths, data_dir, log_dir):
        self.store = store
        self.timers = timers
        self.log = log
        self.token_path = paths["dashboard_token"]
        self.data_dir = data_dir
        self.pipe = HelperPipe(DASHBOARD, "the dashboard's web server", selector, log,
                               log_dir, self.said, self.gone)
        self.listener = None        # the bound socket, while it could be bound
        self.settings = None        # {"listen": HOST:PORT as bound, "metrics_open"} while on
        self.error = None           # why the kept setting is not served (its port taken)
        self.started_at = 0.0       # monotonic: when the helper last started
        self.restart_delay = RESTART_FIRST
        self.generation = 0         # bumped by each change: older restart timers are stale

    def load(self):
        """Serve the kept setting again, at start.  A port taken meanwhile is logged
        and shown by status: the queue runs on without its dashboard."""
        self.settings = self.store.setting("dashboard")
        if self.settings is None:
            return
        try:
            self.listener = bind_dashboard(self.settings["listen"])
            self.start_helper()
        except UserError as error:
            self.error = str(error)
            self.log.error("dashboard: %s", error)

    def turn_on(self, listen, metrics_open):
        """Serve on LISTEN (HOST:PORT; None: the default), /metrics without the token
        if METRICS_OPEN.  What a call leaves out is the safe default, so a plain
        `dashboard` always means loopback and a closed /metrics."""
        listen = listen or DEFAULT_DASHBOARD_LISTEN
        moved = self.listener is None or self.settings is None or \
            listen != self.settings["listen"]
        listener = bind_dashboard(listen) if moved else self.listener
        settings = {"listen": listen_text(*listener.getsockname()[:2]),
                    "metrics_open": metrics_open}
        try:
            token = self.token()
            with self.store.transaction():
                self.store.set_setting("dashboard", settings)
        except BaseException:
            if moved:
                listener.close()   # nothing was changed
            raise
        if moved or settings != self.settings or not self.pipe.running():
            self.pipe.stop()
            if moved and self.listener is not None:
                self.listener.close()
            self.listener, self.settings, self.error = listener, settings, None
            self.generation += 1
            self.restart_delay = RESTART_FIRST
            self.start_helper()
        return dict(self.describe(), token=token, loopback=is_loopback(
            parse_listen_address(settings["listen"])[0]))

    def turn_off(self):
        """Stop serving, forget the setting, and delete the token: the next
        `dashboard` makes a new one, so that old links and cookies stop working."""
        was_on = self.settings is not None
        with self.store.transaction():
            self.store.drop_setting("dashboard")
        self.stop()
        self.settings, self.error = None, None
        self.generation += 1
        try:
            os.unlink(self.token_path)
        except FileNotFoundError:
            pass
        return {"was_on": was_on}

    def token(self):
        """The token every request to the dashboard needs, made (owner-only) the first
        time it is turned on and kept across restarts, so that an open page
        reconnects to the server started again."""
        try:
            with open(self.token_path) as stream:
                token = stream.read().strip()
            if token:
                return token
        except FileNotFoundError:
            pass
        import secrets
        token = secrets.token_urlsafe(32)
        temporary = self.token_path + ".tmp"
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as stream:
                stream.write(token + "\n")
            os.chmod(temporary, 0o600)   # (one left by an earlier try keeps its mode)
            os.replace(temporary, self.token_path)
        except OSError as error:
            raise UserError(f"cannot write the dashboard's token to {self.token_path}: "
                            f"{error.strerror or error}; nothing was changed") from None
        return token

    def start_helper(self):
        if not self.pipe.start(pass_fds=(self.listener.fileno(),)):
            self.gone()   # (logged): tried again later
            return
        self.started_at = time.monotonic()
        # Through the pipe, not argv: other users can read a process's argv.
        self.pipe.write({"listen_fd": self.listener.fileno(), "data_dir": self.data_dir,
                         "token": self.token(), **self.settings})

    def said(self, message):
        self.log.info("dashboard: %s", message.get("log"))

    def gone(self):
        """The helper died: a new one on the same socket, RESTART_FIRST later, doubling
        up to RESTART_MAX while each dies young."""
        if self.settings is None or self.listener is None:
            return
        if time.monotonic() - self.started_at >= RESTART_STEADY:
            self.restart_delay = RESTART_FIRST
        delay, self.restart_delay = self.restart_delay, min(2 * self.restart_delay, RESTART_MAX)
        self.log.warning("dashboard: a new web server starts in %gs", delay)
        generation = self.generation
        self.timers.add(time.time() + delay, lambda: self.restart(generation))

    def restart(self, generation):
        if generation == self.generation and self.settings is not None and \
                not self.pipe.running():
            self.start_helper()

    def describe(self):
        """The dashboard as status shows it (never its token)."""
        if self.settings is None:
            return {"on": False}
        return {"on": True, "running": self.pipe.running(), "listen": self.settings["listen"],
                "url": f"http://{self.settings['listen']}/",
                "metrics_open": self.settings["metrics_open"],
                "pid": self.pipe.process.pid if self.pipe.running() else None,
                "error": self.error, "token_file": self.token_path}

    def stop(self):
        """The helper and the socket go (the server stops); the setting stays."""
        self.pipe.stop()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def bind_dashboard(listen):
    """A TCP socket listening on LISTEN (HOST:PORT); UserError if it cannot be."""
    host, port = parse_listen_address(listen)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
    try:
        # A server started again takes its port back at once despite the last one's
        # connections in TIME_WAIT; Linux still refuses a port another socket listens on.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(64)
    except OSError as error:
        listener.close()
        raise UserError(f"cannot listen on {listen}: {error.strerror or error}; nothing was "
                        f"changed: choose another port with --listen {listen_text(host, 0)[:-1]}"
                        "PORT (0: any free one)") from None
    return listener


###############################################################################
# Clients ######################################################################
###############################################################################

class Client:
    """One client connection: a request line in, a reply line out."""

    def __init__(self, connection):
        self.connection = connection
        self.lines = LineReader()
        self.received = 0          # bytes of its request so far (see Clients.receiving)
        self.outgoing = bytearray()
        self.request_done = False
        self.closing = False
        self.on_event = None       # the selector callback, set when accepted
        try:
            # Which process asks: what a job's child or `wait --children` is checked by.
            self.pid = struct.unpack("3i", connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        except OSError:
            self.pid = 0


class Subscription:
    """A `wait` client: which of its jobs are not done yet, and where the others are."""

    def __init__(self, client, states):
        self.client = client
        self.pending = {job_id: state for job_id, state in states.items()
                        if state != JobState.DONE.value}
        self.running = sum(1 for state in self.pending.values()
                           if state == JobState.RUNNING.value)
        self.total = len(states)
        self.watched = set(states)
        self.not_succeeded = {}      # job id -> {"result", "exit_code", "signal"}
        self.unread = []             # jobs that ended since how they ended was read
        self.dirty = True

    def move(self, job_id, state):
        """Note that a watched job is now in STATE (counts kept as we go: no scans)."""
        was_running = self.pending[job_id] == JobState.RUNNING.value
        self.running += (state == JobState.RUNNING) - was_running
        if state == JobState.DONE:
            del self.pending[job_id]
        else:
            self.pending[job_id] = state.value
        self.dirty = True

    def note_outcomes(self, rows):
        """Remember how the jobs of ROWS that we watch ended without success."""
        for row in rows:
            if row["id"] in self.watched:
                self.not_succeeded[row["id"]] = dict(row)

    def progress(self):
        return {"event": "progress", "total": self.total,
                "done": self.total - len(self.pending), "running": self.running,
                "waiting": len(self.pending) - self.running, "failed": len(self.not_succeeded)}


DEFERRED = object()   # a handler's way of saying "the reply comes later"


class Clients:
    """The Unix socket and its clients: requests in (checked by check_request and
    served by Handlers), replies and wait's progress out, without blocking."""

    def __init__(self, selector, log, store, paths, data_dir, log_dir, paused):
        self.selector = selector
        self.data_dir = data_dir
        self.log = log
        self.store = store         # read only: how watched jobs ended
        self.paths = paths
        self.log_dir = log_dir
        self.handlers = None       # set by the Server
        self.paused = paused       # whether the queue is paused (progress lines say so)
        self.listener = None
        self.accepting = True
        self.closed = False
        self.connected = set()
        self.receiving = 0         # bytes in the buffers of unfinished requests
        self.stop_replies = []     # clients waiting for the stop to finish
        self.waiters = []          # (predicate, client, make_reply)
        self.waiters_due = False   # something happened that a waiter may wait for
        self.subscriptions = []    # wait clients
        self.watchers = []         # live-view clients (watch)

    def listen(self):
        path = self.paths["socket"]
        directory = os.path.dirname(path)
        if directory != self.data_dir:
            make_private_dir(directory)
        # We hold the data dir lock, so any socket file here is a dead server's.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(256)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, EVENT_READ, self.accept)

    def accept(self, events):
        try:
            connection, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            # Out of file descriptors: stop accepting until a client goes,
            # instead of spinning on a listener that stays readable.
            self.log.error("cannot accept a client (%s); pausing until one disconnects",
                           error.strerror)
            self.selector.unregister(self.listener)
            self.accepting = False
            return
        connection.setblocking(False)
        client = Client(connection)
        self.connected.add(client)
        client.on_event = lambda events: self.client_event(client, events)
        self.selector.register(connection, EVENT_READ, client.on_event)

    def client_event(self, client, events):
        if events & EVENT_READ:
            try:
                chunk = client.connection.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.drop(client)   # gone, even if its reply was still pending
                return
            if not client.request_done:
                self.receive(client, chunk)
        if events & EVENT_WRITE:
            self.flush(client)

    def receive(self, client, chunk):
        client.received += len(chunk)
        self.receiving += len(chunk)
        lines = client.lines.feed(chunk)
        if lines:
            client.request_done = True
            self.release_buffer(client)
            self.handle(client, lines[0])
        elif len(client.lines.pending) > MAX_REQUEST_BYTES:
            client.request_done = True
            self.release_buffer(client)
            self.reply(client, error=f"request larger than {MAX_REQUEST_BYTES} bytes; "
                                     "split it into smaller ones")
        elif self.receiving > MAX_RECEIVING_BYTES:
            # Memory stays bounded however many clients send huge requests at once.
            client.request_done = True
            self.release_buffer(client)
            self.reply(client, error="the server is receiving other large requests "
                                     f"(over {MAX_RECEIVING_BYTES >> 20} MB at once); "
                                     "try again in a moment")

    def release_buffer(self, client):
        self.receiving -= client.received
        client.received = 0
        client.lines = LineReader()

    def handle(self, client, line):
        """Check a request (REQUESTS), serve it (Handlers), and reply."""
        command = "?"
        try:
            command, spec, params = check_request(line)
            result = getattr(self.handlers, spec.handler)(client, params)
        except UserError as error:
            self.reply(client, error=str(error))
        except self.store.sqlite3.Error as error:
            self.log.error("storage error in %s: %s", command, error)
            self.reply(client, error=self.storage_error_message(error))
        except Exception as error:   # noqa: BLE001 - a bug must not take the server down
            self.log.exception("internal error in %s", command)
            self.reply(client, error=f"internal error: {type(error).__name__}: {error} "
                                     f"(see {os.path.join(self.log_dir, SERVER_LOG_FILE)})")
        else:
            if result is not DEFERRED:
                self.reply(client, result=result)

    def storage_error_message(self, error):
        """What a client is told when the database refused its change."""
        fault = storage_fault(self.data_dir, error)
        if fault:
            return f"{fault[0]}: nothing was changed; {fault[1]}, then retry"
        if "malformed" in str(error) or "not a database" in str(error):
            return (f"the database {self.paths['database']} is corrupt ({error}): nothing "
                    "was changed; stop the server, and restore it from a backup (start "
                    "refuses it as it is)")
        return (f"could not save the change ({error}): nothing was changed; check free "
                f"space and permissions of {self.data_dir}, then retry")

    def reply(self, client, result=None, error=None, stopping=False):
        """The last line to a client: the connection closes once it is sent."""
        client.closing = True
        self.send_line(client, encode_reply(result, error, stopping))

    def send_line(self, client, line):
        client.outgoing.extend(line)
        try:
            self.selector.modify(client.connection, EVENT_READ | EVENT_WRITE,
                                 client.on_event)
        except (KeyError, ValueError):
            return   # already dropped
        self.flush(client)

    def flush(self, client):
        try:
            sent = client.connection.send(client.outgoing)
            del client.outgoing[:sent]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            client.outgoing.clear()
        if client.outgoing:
            return
        if client.closing:
            self.drop(client)
        else:
            # A socket is nearly always writable: asking for EVENT_WRITE with nothing
            # to send would wake select() at once, forever.
            self.selector.modify(client.connection, EVENT_READ, client.on_event)

    def drop(self, client):
        self.release_buffer(client)
        try:
            self.selector.unregister(client.connection)
        except (KeyError, ValueError):
            pass
        client.connection.close()
        self.connected.discard(client)
        self.waiters = [waiter for waiter in self.waiters if waiter[1] is not client]
        self.subscriptions = [subscription for subscription in self.subscriptions
                              if subscription.client is not client]
        self.watchers = [watcher for watcher in self.watchers if watcher.client is not client]
        if client in self.stop_replies:
            self.stop_replies.remove(client)
        if not self.accepting and not self.closed:
            self.accepting = True
            self.selector.register(self.listener, EVENT_READ, self.accept)

    # --- replies that wait ----------------------------------------------------

    def reply_when(self, client, predicate, make_reply):
        """Defer CLIENT's reply until PREDICATE holds (checked after each turn of the
        loop in which something happened)."""
        self.waiters.append((predicate, client, make_reply))
        self.waiters_due = True
        return DEFERRED

    def answer_waiters(self):
        self.waiters_due = False
        still_waiting = []
        for predicate, client, make_reply in self.waiters:
            if predicate():
                self.reply(client, result=make_reply())
            else:
                still_waiting.append((predicate, client, make_reply))
        self.waiters = still_waiting

    def subscribe(self, client, rows):
        """A wait client follows the jobs of ROWS until they are all done."""
        subscription = Subscription(client, {row["id"]: row["state"] for row in rows})
        subscription.note_outcomes(self.store.not_succeeded(
            [row["id"] for row in rows if row["state"] == JobState.DONE.value]))
        self.subscriptions.append(subscription)
        self.log.info("a client waits for %d job(s), %d not done", subscription.total,
                      len(subscription.pending))
        return DEFERRED

    def watch(self, client, interval):
        """A live-view client gets a snapshot now and after each change, at most once
        per INTERVAL seconds (see Server.send_snapshots), until it disconnects."""
        self.watchers.append(Watcher(client, interval))
        return DEFERRED

    def live_changed(self):
        """Something a live view shows changed: each watcher's next snapshot is due."""
        for watcher in self.watchers:
            watcher.dirty = True

    def send_snapshot(self, snapshot, now):
        """SNAPSHOT (an event line) to each watcher that is ready for it (a slow reader
        skips snapshots instead of piling them up)."""
        for watcher in self.watchers:
            if watcher.ready(now):
                watcher.dirty = False
                watcher.due = now + watcher.interval
                self.send_line(watcher.client, snapshot)

    def snapshot_due(self):
        """When the next snapshot is wanted (monotonic), by the watchers that have
        something new and have read the last one; None if none has."""
        return min((watcher.due for watcher in self.watchers
                    if watcher.dirty and not watcher.client.outgoing), default=None)

    def jobs_moved(self, job_ids, state):
        """Tell the wait clients watching any of JOB_IDS where those jobs are now."""
        self.waiters_due = True
        self.live_changed()
        if state == JobState.BLOCKED:
            state = JobState.WAITING   # the same to a client
        for subscription in self.subscriptions:
            watched = [job_id for job_id in job_ids if job_id in subscription.pending]
            for job_id in watched:
                subscription.move(job_id, state)
            if state == JobState.DONE:
                # Read in send_progress, not here: this runs as a transaction's
                # commit hook, which must not fail on a read.
                subscription.unread += watched

    def jobs_removed(self, job_ids):
        """Jobs deleted from the queue (remove_job, load_status): wait clients stop
        waiting for them and hear that they will never run."""
        self.waiters_due = True
        self.live_changed()
        for subscription in self.subscriptions:
            for job_id in job_ids:
                if job_id in subscription.pending:
                    subscription.move(job_id, JobState.DONE)
                    subscription.not_succeeded[job_id] = {
                        "id": job_id, "result": "removed", "exit_code": None, "signal": None,
                        "reason": "removed from the queue before it ran"}

    def progress_changed(self):
        """Every wait client's next progress line is due (the queue was paused or resumed)."""
        self.live_changed()
        for subscription in self.subscriptions:
            subscription.dirty = True

    def send_progress(self):
        """One progress line per wait client per turn of the loop, and its last word."""
        unread = [job_id for subscription in self.subscriptions
                  for job_id in subscription.unread]
        if unread:
            outcomes = self.store.not_succeeded(unread)   # one query for every client
            for subscription in self.subscriptions:
                subscription.note_outcomes(outcomes)
                subscription.unread = []
        for subscription in list(self.subscriptions):
            client = subscription.client
            if not subscription.dirty or client.outgoing:
                continue   # nothing new, or the client has not read the last line yet
            subscription.dirty = False
            if subscription.pending:
                self.send_line(client, encode_event(dict(subscription.progress(),
                                                         paused=self.paused())))
                continue
            self.subscriptions.remove(subscription)
            self.reply(client, result={"total": subscription.total,
                                       "not_succeeded": list(
                                           subscription.not_succeeded.values())})

    # --- stopping -------------------------------------------------------------

    def close(self):
        """Stop listening; answer every client already connected, or queued on the
        listener: a second stop is told the server stopped (once the lock is
        released: see run_server), anything else that it is stopping."""
        self.closed = True
        try:
            os.unlink(self.paths["socket"])   # no new clients from here on
        except OSError:
            pass   # (a read-only disk: once closed, it refuses connections anyway)
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                break
            self.connected.add(Client(connection))
        self.listener.close()
        for client in [waiter[1] for waiter in self.waiters] + \
                [subscription.client for subscription in self.subscriptions] + \
                [watcher.client for watcher in self.watchers]:
            self.reply(client, error="the server stopped before this finished; start it "
                                     "again and check ./cli.py status", stopping=True)
        for client in list(self.connected - set(self.stop_replies)):
            self.answer_while_stopping(client)

    def answer_while_stopping(self, client):
        connection = client.connection
        try:
            connection.setblocking(True)
            connection.settimeout(1.0)
            lines = client.lines.feed(b"")
            while not lines and len(client.lines.pending) < MAX_REQUEST_BYTES:
                chunk = connection.recv(1 << 16)
                if not chunk:
                    break
                lines = client.lines.feed(chunk)
            request = json.loads(lines[0] if lines else bytes(client.lines.pending) or b"{}")
        except (OSError, ValueError, RecursionError):
            request = {}
        if isinstance(request, dict) and request.get("command") == "stop":
            self.stop_replies.append(client)   # answered once the lock is released
            return
        try:
            connection.sendall(encode_reply(error="the server is stopping; start it again "
                                                  "with ./cli.py start", stopping=True))
        except OSError:
            pass
        connection.close()


###############################################################################
# Request handlers #############################################################
###############################################################################

class ServiceHandlers:
    """The requests about services (a part of Handlers: it sets what they use)."""

    def add_service(self, client, params):
        """Declare a service and queue its replicas."""
        self.services.add(params["name"], params["script"], params["args"], params["cwd"],
                          params["environment"], params["variables"], params["umask"],
                          params["options"], params["replicas"], params["port"],
                          params["health"])
        return self.services.describe(params["name"])[0]

    def scale(self, client, params):
        stopping = self.services.scale(params["name"], params["replicas"], params["grace"])
        return self.reply_when_ended(client, stopping,
                                     lambda: self.services.describe(params["name"])[0])

    def stop_service(self, client, params):
        stopping = self.services.set_enabled(params["name"], False, params["grace"])
        return self.reply_when_ended(client, stopping,
                                     lambda: self.services.describe(params["name"])[0])

    def start_service(self, client, params):
        self.services.set_enabled(params["name"], True, DEFAULT_KILL_GRACE)
        return self.services.describe(params["name"])[0]

    def remove_service(self, client, params):
        stopping = self.services.remove(params["name"], params["grace"])
        return self.reply_when_ended(client, stopping, lambda: {"stopped": stopping})

    def list_services(self, client, params):
        return self.services.describe(params["name"])

    def load_services(self, client, params):
        """Make the services those of a document; reply once the replicas stopped have ended."""
        differences, stopping = self.services.load(params["services"], params["grace"])
        shown = [public_difference(difference) for difference in differences]
        return self.reply_when_ended(client, stopping,
                                     lambda: {"changes": shown, "stopped": stopping})


class ScheduleHandlers:
    """The requests about schedules (a part of Handlers: it sets what they use)."""

    def add_schedule(self, client, params):
        return self.schedules.add(
            params["name"], params["rule"], params["script"], params["args"], params["cwd"],
            params["environment"], params["variables"], params["umask"], params["options"],
            params["overlap"], params["skip_missed"])

    def list_schedules(self, client, params):
        name = params["name"]
        return self.schedules.describe(None if name is None else
                                       [self.schedules.existing(name)])

    def pause_schedule(self, client, params):
        self.schedules.set_enabled(params["name"], False)
        return {}

    def resume_schedule(self, client, params):
        self.schedules.set_enabled(params["name"], True)
        return {}

    def remove_schedule(self, client, params):
        self.schedules.remove(params["name"])
        return {}

    def run_schedule(self, client, params):
        return {"id": self.schedules.run_now(params["name"])}


class Handlers(ServiceHandlers, ScheduleHandlers):
    """One method per request of REQUESTS, which has checked its parameters: each
    asks the Queue, Workers or Runner to act and shapes the reply (those about
    services and schedules are in ServiceHandlers and ScheduleHandlers)."""

    def __init__(self, server):
        self.server = server
        self.store = server.store      # read only
        self.queue = server.queue
        self.edits = server.edits
        self.workers = server.workers
        self.runner = server.runner
        self.services = server.services
        self.schedules = server.schedules
        self.hooks = server.hooks
        self.clients = server.clients
        self.log_dir = server.log_dir

    def reply_when_ended(self, client, job_ids, make_reply):
        """Defer CLIENT's reply until none of JOB_IDS is running any more."""
        running = self.runner.running
        return self.clients.reply_when(
            client, lambda: not any(job_id in running for job_id in job_ids), make_reply)

    def job_of_process(self, client, job_id):
        """True if job JOB_ID is running and CLIENT's process is one of its processes
        (see process_of_job): what JOB_ID in an environment is taken on."""
        attempt = self.runner.running.get(job_id)
        return attempt is not None and not attempt.ended and attempt.pid is not None and \
            client.pid > 0 and process_of_job(client.pid, attempt.pid)

    def with_children(self, jobs):
        """JOBS (JSON) with the ids of their children."""
        children = self.store.families.children_of([job["id"] for job in jobs])
        for job in jobs:
            job["children"] = children.get(job["id"], [])
        return jobs

    def with_hooks(self, jobs):
        """JOBS (JSON) with their hook runs (see hook_run_to_json), oldest first."""
        runs = self.store.hook_rows.of_jobs([job["id"] for job in jobs])
        for job in jobs:
            job["hooks"] = [hook_run_to_json(row, row["id"] in self.hooks.running)
                            for row in runs.get(job["id"], ())]
        return jobs

    def with_dependencies(self, jobs):
        """JOBS (JSON) with the conditions they still wait on: after, after_any."""
        waiting = [job["id"] for job in jobs if job["state"] == JobState.WAITING.value]
        conditions = self.store.dependencies.unmet(waiting) if waiting else {}
        for job in jobs:
            job["after"], job["after_any"] = conditions.get(job["id"], ([], []))
        return jobs

    # --- the server -----------------------------------------------------------

    def ping(self, client, params):
        return {"pid": os.getpid(), "data_dir": self.server.data_dir, "log_dir": self.log_dir}

    def stop(self, client, params):
        self.server.stopping = True
        self.clients.stop_replies.append(client)
        return DEFERRED

    def ssh_config(self, client, params):
        """The queue's ssh config: what add_slave's check must read too."""
        return {"ssh_config": self.server.ssh_config}

    def status(self, client, params):
        waiting_limit = params["waiting_limit"]
        waiting = self.store.jobs_in_state(JobState.WAITING,
                                           -1 if waiting_limit is None else waiting_limit)
        running = self.with_hooks([job_to_json(row, self.log_dir)
                                   for row in self.store.jobs_in_state(JobState.RUNNING)])
        slaves = [worker.to_json([job for job in running if worker.name in job_workers(job)])
                  for worker in self.workers.all()]
        waitlist = self.with_hooks(self.with_dependencies([job_to_json(row, self.log_dir)
                                                           for row in waiting]))
        arrays = self.arrays()
        self.say_why_they_wait(waitlist, arrays)
        schedules = self.schedules.describe()
        environment_ids = {job["environment"] for job in waitlist + running + schedules}
        environments = self.store.environments(environment_ids) \
            if params["environments"] else {}
        return {
            "server": {"pid": os.getpid(), "version": VERSION,
                       "data_dir": self.server.data_dir, "log_dir": self.log_dir},
            "paused": self.queue.paused,
            "placement": self.queue.placement,
            "hooks": self.hooks.describe(),
            "slaves": slaves,
            "resources": resource_totals(slaves),
            "job_waitlist": waitlist,
            "running_jobs": running,
            "counts": self.store.counts(),
            "services": self.services.describe(),
            "schedules": schedules,
            "arrays": arrays,
            "environments": {str(key): value for key, value in environments.items()},
            "dashboard": self.server.dashboard.describe(),
        }

    def say_why_they_wait(self, waitlist, arrays):
        """Set each waiting job's waiting_for (WAITLIST: JSON, with dependencies)."""
        capacities = self.workers.capacities()
        now = time.time()
        failed_on = self.store.failed_on([job["id"] for job in waitlist if job["attempt"]])
        limits = {array["id"]: (array["max_running"], array["counts"].get("running", 0))
                  for array in arrays if array["max_running"] is not None}
        for job in waitlist:
            job["waiting_for"] = waiting_reason(job, capacities, self.queue.paused, now,
                                                failed_on.get(job["id"], ()),
                                                limits.get(job["array"]), self.queue.holders)

    def live(self):
        """What the live views show (see watch): the workers; the first LIVE_LIST_LIMIT
        running and waiting jobs (and why they wait); the counts; the latest ends
        and failures; how fast jobs end and the time the waiting ones may take."""
        counts = self.store.counts()
        running = [live_job(job_to_json(row, self.log_dir)) for row in
                   self.store.jobs_in_state(JobState.RUNNING, LIVE_LIST_LIMIT)]
        waiting = self.with_dependencies([job_to_json(row, self.log_dir) for row in
                                          self.store.jobs_in_state(JobState.WAITING,
                                                                   LIVE_LIST_LIMIT)])
        self.say_why_they_wait(waiting, self.arrays())
        rate = self.server.activity.rate()
        return {
            "server": {"pid": os.getpid(), "version": VERSION,
                       "data_dir": self.server.data_dir},
            "now": iso_time(time.time()), "paused": self.queue.paused, "counts": counts,
            # Without variables: a live view shows where things run, not their secrets.
            "workers": [without_variables(dict(worker.to_json([]),
                                               used=sorted(worker.busy_slots)))
                        for worker in self.workers.all()],
            "running": running, "waiting": [live_job(job) for job in waiting],
            "recent": [live_job(job_to_json(row, self.log_dir))
                       for row in self.store.latest_ends(LIVE_RECENT)],
            "failures": [live_job(job_to_json(row, self.log_dir))
                         for row in self.store.latest_ends(LIVE_RECENT, failed=True)],
            "ends_per_minute": round(rate, 1),
            "seconds_left": None if not rate else round(counts["waiting"] * 60 / rate),
            "activity": self.server.activity.to_json(),
            "services": [without_variables(service) for service in self.services.describe()],
        }

    def watch(self, client, params):
        return self.clients.watch(client, params["interval"])

    def dashboard(self, client, params):
        if params["stop"]:
            return self.server.dashboard.turn_off()
        return self.server.dashboard.turn_on(params["listen"], params["metrics_open"])

    def arrays(self):
        """The arrays with tasks still waiting or running, and their tasks by state."""
        live = self.store.arrays.live()
        counts = self.store.arrays.counts([array["id"] for array in live])
        return [{"id": array["id"], "spec": array["spec"], "max_running": array["max_running"],
                 "tasks": sum(counts[array["id"]].values()), "counts": counts[array["id"]]}
                for array in live]

    # --- workers --------------------------------------------------------------

    def worker_names(self, client, params):
        return list(self.workers)

    def add_slave(self, client, params):
        self.workers.add(params["hosts"], params["slots"], params["variables"],
                         params["ssh_checked"], params["ssh_reuse"], params["down_after"],
                         params["endpoints"], params["slots_of"], params["resources"])
        return params["hosts"]

    def remove_slave(self, client, params):
        hosts, mode = params["hosts"], params["mode"]
        for host in hosts:
            self.workers.named(host)
            jobs = self.runner.jobs_on(host)
            if jobs and mode is None:
                raise UserError(
                    f"worker {host} is running job(s) {', '.join(map(str, jobs))}: use "
                    f"--wait to remove it when they end, or --kill to end them now")
        killed = []
        for host in hosts:
            if not self.workers.get(host).busy_slots:
                self.workers.forget(host)
                continue
            self.workers.drain(host)
            if mode == "kill":
                for job_id in self.runner.jobs_on(host):
                    self.runner.kill(job_id, params["grace"], f"worker {host} removed with --kill")
                    killed.append(job_id)

        def outcome():
            draining = [host for host in hosts if host in self.workers]
            return {"removed": [host for host in hosts if host not in draining],
                    "draining": draining}
        if killed:
            return self.reply_when_ended(client, killed, outcome)
        return outcome()

    def edit_slave(self, client, params):
        """Change workers' slots or variables; running jobs are not touched."""
        edited = [{"host": worker.name, "slots": worker.slots,
                   "variables": sorted(worker.variables),
                   "slots_in_use": len(worker.busy_slots), "ssh_reuse": worker.ssh_reuse,
                   "down_after": self.workers.down_after_of(worker.name),
                   "resources": worker.resources_json()}
                  for worker in self.workers.edit(
                      params["hosts"], params["slots"], params["variables"],
                      params["unset"], params["ssh_reuse"], params["down_after"],
                      params["resources"])]
        return {**edited[0], "edited": edited}   # (the first alone: what one host got)

    def pause(self, client, params):
        return self.set_paused(params["hosts"], True)

    def resume(self, client, params):
        return self.set_paused(params["hosts"], False)

    def set_paused(self, hosts, paused):
        """Pause or resume the whole queue, or the workers HOSTS."""
        if hosts:
            self.workers.set_paused(hosts, paused)
            changed = True
        else:
            changed = self.queue.paused != paused
            self.edits.set_paused(paused)
            self.clients.progress_changed()   # their progress line says so
        return {"hosts": hosts, "paused": paused, "changed": changed}

    # --- jobs -----------------------------------------------------------------

    def add_job(self, client, params):
        """Queue one job (ARGS), or an array: one task per list in ARGS_LIST, per
        TASK_ARGS line or per --array index, all or none; children of the job PARENT
        if the request comes from one of its processes."""
        claimed = params["parent"]
        if params["nohup"] and claimed is None:
            raise UserError("--nohup is for jobs added from inside a running job (JOB_ID "
                            "is not set): a job added from outside has no parent to outlive")
        parent = claimed if claimed is not None and self.job_of_process(client, claimed) \
            else None
        array = params["array"]
        first, last, skipped = self.queue.add(
            params["script"], params["args_list"] or [params["args"]], params["cwd"],
            params["environment"], params["variables"], params["umask"], params["options"],
            self.queue.named(params["after"]), self.queue.named(params["after_any"]), array,
            parent, params["nohup"] and parent is not None)
        reply = {"id": first, "first": first, "last": last, "skipped": skipped,
                 "array": None if array is None else first, "parent": parent}
        if claimed is not None and parent is None:
            reply["note"] = (f"JOB_ID={claimed} is set, but this add_job does not come from a "
                             f"process of running job {claimed}: queued as a job of its own, "
                             "with no parent")
        return reply

    def remove_job(self, client, params):
        if params["ids"] is not None:
            job_ids = self.waiting_named(params["ids"])
            for row in self.queue.existing(job_ids, "id, state, result, worker, service, "
                                                    "replica"):
                refuse_replica(row, "cannot be removed")
                refuse_unless_waiting(row)
        else:
            script, args = params["script"], params["args"]
            job_ids = self.store.waiting_with_command(script, args)
            if not job_ids:
                raise UserError(f"no waiting job runs {script} with those arguments; "
                                "see ./cli.py status")
        skipped = self.edits.remove(job_ids)
        return {"removed": job_ids, "skipped": skipped}

    def kill(self, client, params):
        """Kill running jobs (process group, grace, SIGKILL) and waiting ones before they run."""
        # A parent's kill is its family's: its descendants, --nohup ones too.
        named = self.queue.named(params["ids"])
        family = self.store.families.descendants(named)
        job_ids = named + [job_id for job_id in family if job_id not in set(named)]
        rows = self.queue.existing(job_ids, "id, state, result, service")
        ended = [row for row in rows if row["state"] == JobState.DONE.value]
        if len(ended) == len(rows):
            raise UserError(f"job {ended[0]['id']} has already ended ({ended[0]['result']})"
                            if len(params["ids"]) == 1 and len(ended) == 1 else
                            f"job {params['ids'][0]} and its family have already ended"
                            if len(params["ids"]) == 1 else "all those jobs have already ended")
        waiting = [row["id"] for row in rows if row["state"] == JobState.WAITING.value]
        running = [row["id"] for row in rows if row["state"] == JobState.RUNNING.value]
        if waiting:
            self.queue.kill_waiting(waiting)
            # A replica killed before it ran starts again at once, as a new job.
            for name in sorted({row["service"] for row in rows if row["service"] is not None
                                and row["state"] == JobState.WAITING.value}):
                self.services.converge(name)
        for job_id in running:
            self.runner.kill(job_id, params["grace"], "killed with ./cli.py kill")
        # A range may hold jobs that already ended: left alone.
        outcome = {"killed": waiting + running, "ended": len(ended)}
        if running:
            return self.reply_when_ended(client, running, lambda: outcome)
        return outcome

    def retry(self, client, params):
        """Run ended jobs again: the ids named, or those the filters pick among them.
        An array named whole retries its tasks that ended without success."""
        state, result = params["state"]
        if state not in (None, JobState.DONE.value):
            raise UserError(f"only ended jobs can be retried: --state takes done or how a job "
                            f"ended ({', '.join(result.value for result in JobResult)})")
        filtered = params["failed"] or state is not None or params["script"] is not None
        if not filtered and params["ids"] is None:
            raise UserError("name the jobs to retry: ids, or --failed, --state S or --script P")
        if not filtered:
            arrays = self.arrays_named(params["ids"])
            job_ids = self.queue.named([name for name in params["ids"] if name not in arrays])
            tasks = [row["id"] for row in self.store.jobs_by_id(self.queue.named(arrays))
                     if row["state"] == JobState.DONE.value
                     and row["result"] != JobResult.SUCCEEDED.value]
            retried, back, held = self.edits.retry(job_ids + tasks, named=not arrays) \
                if job_ids or tasks else ([], [], [])
            return {"retried": retried, "back": back, "held": held}
        job_ids = None if params["ids"] is None else self.queue.named(params["ids"])
        if job_ids is not None:
            self.queue.existing(job_ids)
        results = (JobResult.FAILED.value, JobResult.TIMED_OUT.value) if params["failed"] \
            else (result,)
        chosen = [row["id"] for wanted in results for row in self.store.find_jobs(
            JobState.DONE.value, wanted, None, params["script"]) if row["service"] is None]
        if job_ids is not None:
            chosen = sorted(set(chosen) & set(job_ids))
        retried, back, held = self.edits.retry(sorted(chosen), named=False) \
            if chosen else ([], [], [])
        return {"retried": retried, "back": back, "held": held}

    def waiting_named(self, names):
        """The job ids NAMES stand for, where an array named whole stands for its
        waiting tasks (or, if none waits, for all, to be refused one by one)."""
        job_ids = self.queue.named(names)
        if self.arrays_named(names):
            job_ids = [row["id"] for row in self.store.jobs_by_id(job_ids)
                       if row["state"] == JobState.WAITING.value] or job_ids
        return job_ids

    def arrays_named(self, names):
        """Those of NAMES that name an array whole ('N' where N is an array's id)."""
        bare = [name for name in names or () if isinstance(name, str) and "." not in name]
        arrays = self.store.arrays.among([int(name) for name in bare]) if bare else {}
        return [name for name in bare if int(name) in arrays]

    def priority(self, client, params):
        job_ids = self.waiting_named(params["ids"])
        self.edits.set_priority(job_ids, params["priority"])
        return {"ids": job_ids, "priority": params["priority"]}

    def jobs(self, client, params):
        """Jobs from the history, filtered; or one job in full."""
        state, result = params["state"]
        return self.with_hooks(self.find_jobs(params, state, result))

    def find_jobs(self, params, state, result):
        if params["tree"] and params["id"] is None:
            return self.with_children([job_to_json(row, self.log_dir)
                                       for row in self.store.families.members()])
        if params["tree"]:   # (an array's: its first task's, as all its tasks')
            job_id = self.queue.named([params["id"]])[0]
            self.queue.existing([job_id])
            return self.family_of(job_id)
        if params["id"] is not None and self.arrays_named([params["id"]]):
            # An array named whole: its tasks, as a list.
            rows = self.store.find_jobs(state, result, params["worker"], params["script"],
                                        params["last"], int(params["id"]), params["schedule"],
                                        params["offset"])
            return self.with_children(
                self.with_dependencies([job_to_json(row, self.log_dir) for row in rows]))
        if params["id"] is not None:
            if state or result or params["worker"] or params["script"] or params["last"] or \
                    params["schedule"]:
                raise UserError("give either a job ID or filters (--state, --worker, "
                                "--script, --schedule, --last), not both (for an array's tasks: "
                                "--array ID with filters)")
            job_id, = self.queue.named([params["id"]])
            row = self.store.job(job_id)
            if row is None:
                raise UserError(f"unknown job id {job_id} (never queued, or purged); "
                                "see ./cli.py jobs")
            job, = self.with_children(self.with_dependencies([job_to_json(row, self.log_dir)]))
            job["attempts"] = [attempt_to_json(attempt) for attempt in self.store.attempts(job_id)]
            return [job]
        rows = self.store.find_jobs(state, result, params["worker"], params["script"],
                                    params["last"], params["array"], params["schedule"],
                                    params["offset"])
        return self.with_children(
            self.with_dependencies([job_to_json(row, self.log_dir) for row in rows]))

    def family_of(self, job_id):
        """The family of JOB_ID: its eldest ancestor and every descendant of that one."""
        root = self.store.families.root(job_id)
        members = [root] + self.store.families.descendants([root])
        rows = sorted(self.store.jobs_by_id(members, "*"), key=lambda row: row["id"])
        return self.with_children([job_to_json(row, self.log_dir) for row in rows])

    def purge(self, client, params):
        """Delete finished jobs that ended more than OLDER_THAN seconds ago, with their logs."""
        return {"purged": self.edits.purge(params["older_than"])}

    def wait(self, client, params):
        """Stream progress until the jobs (default: all waiting or running now; with
        CHILDREN_OF, the children of the job the client runs in) are done."""
        parent = params["children_of"]
        if parent is not None:
            if not self.job_of_process(client, parent):
                raise UserError(f"wait --children waits for the children of the job it runs "
                                f"in, but this process is not one of running job {parent}'s "
                                "(JOB_ID alone does not make it one)")
            rows = self.store.families.children_to_wait_for(parent)
        elif params["ids"] is None:
            rows = self.store.unfinished_jobs()
        else:
            rows = self.queue.existing(self.queue.named(params["ids"]))
        return self.clients.subscribe(client, rows)

    def load_status(self, client, params):
        """Replace the workers, the waiting queue and (if the document has them) the
        services; running jobs are left alone."""
        workers, jobs = params["workers"], params["jobs"]
        schedules = params["schedules"]
        keep_ids, differences, stopping = self.services.load_status(
            workers, jobs, params["document"].get("paused"), params["services"],
            None if schedules is None else
            lambda changes: self.schedules.replace(changes, schedules))
        shown = [public_difference(difference) for difference in differences]
        notes = params["notes"] + [
            "the tasks of arrays were loaded as plain jobs (without ARRAY_ID and TASK_ID): "
            "their ids could not be kept"] * (not keep_ids and any(job["task"] for job in jobs))
        return self.reply_when_ended(client, stopping, lambda: {
            "workers": len(workers), "jobs": len(jobs), "ids_kept": keep_ids,
            "notes": notes, "services": shown})


def without_variables(described):
    """A worker or service (JSON) without its -e variables, for the live views."""
    return {key: value for key, value in described.items() if key != "envs"}


def public_difference(difference):
    """A difference of load_services as its reply shows it: without its spec."""
    return {key: value for key, value in difference.items() if key != "spec"}


def refuse_replica(row, what):
    """A replica's job is its service's to start and stop."""
    if row["service"] is not None and row["state"] != JobState.DONE.value:
        raise UserError(f"job {row['id']} is replica {row['replica']} of service "
                        f"{row['service']} and {what}: change the service instead "
                        f"(./cli.py scale {row['service']} N, or stop_service); "
                        "nothing was changed")


def refuse_unless_waiting(row):
    if row["state"] == JobState.RUNNING.value:
        raise UserError(f"job {row['id']} is running on {row['worker']} and cannot be removed; "
                        f"to stop it: ./cli.py kill {row['id']}")
    if row["state"] == JobState.DONE.value:
        raise UserError(f"job {row['id']} has already ended ({row['result']})")


###############################################################################
# Server #######################################################################
###############################################################################

class Server(Events):
    """The wiring: the units above, the data dir, and the event loop.

    Nothing here polls: the loop sleeps in select() until a client writes, a
    supervisor exits, a timer is due or a signal arrives, and the queue is
    looked at after each batch of events.
    """

    def __init__(self, data_dir, log_dir, log, job_fd_limit, spawner,
                 check_interval=DEFAULT_CHECK_INTERVAL, ssh_config=KEEP_SSH_CONFIG,
                 down_after=None, placement=None, hook_settings=None):
        import selectors   # here: clients do not need it
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.log = log
        self.spawner = spawner
        self.ssh_config = ssh_config   # the queue's (see load): None for ssh's defaults
        self.down_after = down_after   # ditto: failures in a row that set a worker aside
        self.placement = placement     # ditto: spread or pack (see plan_starts)
        # ditto: what start said of hooks, {"on_end": argv, or None to clear it;
        # "hook_timeout": seconds}, each only if it said it
        self.hook_settings = hook_settings or {}
        self.paths = data_dir_paths(data_dir)
        self.store = Store(self.paths["database"])
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.timers = Timers(log, (self.store.sqlite3.Error, OSError),
                             lambda: len(self.runner.running))
        self.workers = Workers(self.store, self.timers, self, log)
        self.queue = Queue(self.store, self.workers, self.timers, self, log, log_dir)
        self.edits = JobEdits(self.queue, self.store, self.workers, self, log)
        self.jobs_ssh = JobsSsh(data_dir, log)
        self.runner = Runner(self.store, self.queue, self.workers, self.timers, self.selector,
                             spawner, self.jobs_ssh, log, self.paths["run"], job_fd_limit)
        self.probes = HealthProbes(self.timers, self.selector, self.runner, log, log_dir)
        self.services = Services(self.store, self.queue, self.edits, self.runner, self.workers,
                                 self.probes, log)
        self.runner.replica_running = self.services.replica_running
        self.schedules = Schedules(self.store, self.queue, self.workers, self.timers, log)
        self.hooks = Hooks(self.store, self.timers, self.selector, log, log_dir)
        self.health = HealthMonitor(self.workers, self.timers, self.selector, log, log_dir,
                                    check_interval)
        self.clients = Clients(self.selector, log, self.store, self.paths, data_dir, log_dir,
                               paused=lambda: self.queue.paused)
        self.clients.handlers = Handlers(self)   # (they need the clients too)
        self.activity = Activity()
        self.dashboard = Dashboard(self.store, self.timers, self.selector, log, self.paths,
                                   data_dir, log_dir)
        self.next_snapshot = 0.0    # monotonic: the live views' next snapshot, at the soonest
        self.snapshot_timer = None  # monotonic: when the pending snapshot timer fires

    def load(self):
        """Read the queue, recover what ran while no server did, and settle the rest."""
        if self.ssh_config is not KEEP_SSH_CONFIG:
            with self.store.transaction():
                self.store.set_setting("ssh_config", self.ssh_config)
        if self.placement is not None:
            with self.store.transaction():
                self.store.set_setting("placement", self.placement)
        with self.store.transaction():   # before recovery: the ends it records get them
            for key, value in self.hook_settings.items():
                if value is None:
                    self.store.drop_setting(key)
                else:
                    self.store.set_setting(key, value)
        self.ssh_config = self.health.ssh_config = self.store.setting("ssh_config", None)
        self.workers.load(self.down_after)
        # First: recovery may remove a drained worker, and write.
        self.jobs_ssh.prepare(list(self.workers), self.ssh_config)
        self.runner.recover()
        self.queue.load()
        self.services.converge_all()
        self.schedules.load()
        self.hooks.load()

    # --- what the lifecycle tells the rest (Events) ----------------------------

    def jobs_moved(self, job_ids, state):
        self.clients.jobs_moved(job_ids, state)
        if state == JobState.DONE:
            self.activity.ended(len(job_ids))
            self.schedules.runs_ended(job_ids)
            self.hooks.wake()

    def jobs_removed(self, job_ids):
        self.clients.jobs_removed(job_ids)

    def workers_changed(self, names=()):
        for name in names:
            self.runner.release_control_dir(name)
        self.jobs_ssh.write_config(list(self.workers), self.ssh_config)
        self.timers.until_saved("skipping the --on jobs that no worker left can run",
                                self.queue.skip_stranded)
        self.timers.until_saved("moving replicas off workers that take no jobs",
                                self.services.move_off_unusable)
        self.health.update()
        self.clients.waiters_due = True
        self.clients.live_changed()
        self.room_changed()

    def worker_unusable(self, name, why):
        self.timers.until_saved(f"moving the replicas of worker {name}",
                                lambda: self.services.move_off(name, why))

    def room_changed(self):
        """The one place that says the queue must be looked at again: a job became
        ready, slots were freed, a worker came or came back, the queue resumed."""
        self.queue.schedule_needed = True
        self.activity.room_made()
        self.clients.live_changed()

    def health_watch_changed(self):
        self.health.update()

    def kills_recorded(self, job_ids, grace):
        for job_id in job_ids:
            attempt = self.runner.running.get(job_id)
            if attempt is not None:
                self.runner.signal_kill(attempt, grace)

    # --- the loop -------------------------------------------------------------

    def serve(self):
        wakeup_read, wakeup_write = socket.socketpair()
        wakeup_read.setblocking(False)
        wakeup_write.setblocking(False)
        signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda number, frame: self.request_stop())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.selector.register(wakeup_read, EVENT_READ,
                               lambda events: wakeup_read.recv(4096))
        self.health.update()
        # Here, not in load: its helper asks what the socket serves.
        self.guarded(self.dashboard.load)
        while not self.stopping:
            # Everything that follows from the last events, before sleeping again:
            # what the scheduler starts is news for the clients too.
            if self.queue.schedule_needed:
                self.guarded(self.schedule)
            if self.clients.waiters_due:
                self.guarded(self.clients.answer_waiters)
            if self.clients.subscriptions:
                self.guarded(self.clients.send_progress)
            if self.clients.watchers:
                self.guarded(self.send_snapshots)
            for key, events in self.selector.select(self.timers.timeout()):
                self.guarded(key.data, events)
            for callback in self.timers.due():
                self.guarded(callback)
        self.shutdown()

    def schedule(self):
        """Start waiting jobs on free slots, as many as fit."""
        starts = self.queue.take_starts()
        self.runner.start(starts)
        self.activity.started(starts)

    def send_snapshots(self):
        """The live views' next snapshot, once something changed, but at most as often
        as keeps its cost under LIVE_COST_SHARE of the loop's time: a live view
        never slows the scheduler much, however big the queue."""
        due = self.clients.snapshot_due()
        if due is None:
            return
        now = time.monotonic()
        due = max(due, self.next_snapshot)
        if now < due:
            # Wake the loop then (nothing else may), unless a timer will sooner.
            if self.snapshot_timer is None or due < self.snapshot_timer:
                self.snapshot_timer = due
                self.timers.add(time.time() + due - now, self.snapshot_timer_due)
            return
        snapshot = encode_event(dict(self.clients.handlers.live(), event="live"))
        cost = time.monotonic() - now
        self.next_snapshot = now + max(LIVE_MIN_INTERVAL, cost / LIVE_COST_SHARE)
        self.clients.send_snapshot(snapshot, now)

    def snapshot_timer_due(self):
        self.snapshot_timer = None   # (the loop sends the snapshot: see serve)

    def guarded(self, callback, *args):
        """Run one event's work; a bug in it is logged, not fatal to the queue."""
        try:
            callback(*args)
        except Exception:   # noqa: BLE001
            self.log.exception("internal error (the server goes on)")

    def request_stop(self):
        self.stopping = True

    def shutdown(self):
        """Stop listening and let go of the data dir; jobs keep running."""
        self.clients.close()
        self.dashboard.stop()
        self.health.stop()
        self.probes.stop()
        self.hooks.stop()
        self.runner.release_ssh_root()
        self.store.close()
        self.spawner.close()
        try:
            os.waitpid(self.spawner.pid, 0)
        except ChildProcessError:
            pass
        self.log.info("server stopped; %d job(s) left running", len(self.runner.running))


def run_server(data_dir, log_dir, notify, check_interval=DEFAULT_CHECK_INTERVAL,
               ssh_config=KEEP_SSH_CONFIG, down_after=None, placement=None, hook_settings=None):
    """Own DATA_DIR, recover, listen, and serve until stopped."""
    if not hasattr(os, "pidfd_open"):
        raise UserError("the server needs Linux 5.3 or later (pidfd) and Python 3.10+")
    os.umask(0o077)
    spawner = Spawner()    # before anything big is loaded: see Spawner
    filelock = require("filelock")
    paths = data_dir_paths(data_dir)
    import sqlite3
    try:
        lock, server = open_server(data_dir, log_dir, paths, filelock, notify, spawner,
                                   check_interval, ssh_config, down_after, placement,
                                   hook_settings)
    except (OSError, sqlite3.Error) as error:
        # The disk may be full or read-only: say so, and what to do.
        fault = storage_fault(getattr(error, "filename", None) or data_dir, error)
        if fault:
            raise UserError(f"cannot start the server: {fault[0]}; nothing was changed: "
                            f"{fault[1]}, then start again") from None
        if isinstance(error, sqlite3.Error):
            raise
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(f"cannot start the server: {error.strerror or error}{where}") from None
    try:
        server.serve()
    finally:
        try:
            os.unlink(paths["pid"])
        except OSError:
            pass   # (a read-only disk: the lock, not this file, says who runs)
        lock.release()
        # Answered last, so that a client sees "stopped" only once a new start can run.
        for client in server.clients.stop_replies:
            try:
                client.connection.setblocking(True)
                client.connection.sendall(encode_reply(result={"pid": os.getpid()}))
            except OSError:
                pass
            client.connection.close()


def open_server(data_dir, log_dir, paths, filelock, notify, spawner, check_interval,
                ssh_config, down_after, placement=None, hook_settings=None):
    """Take the data dir, recover and listen; return (lock, server) ready to serve."""
    import resource
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    os.chmod(data_dir, 0o700)   # the tool's own directory; a log dir the user chose is left as it is
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    lock = filelock.FileLock(paths["lock"], mode=0o600)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(f"a server is already running for {data_dir} (pid "
                        f"{running_server_pid(paths['pid']) or 'unknown'}); stop it with "
                        "./cli.py stop") from None
    _write_file(paths["pid"], f"{os.getpid()}\n")
    # One pidfd per running job: lift the soft limit on descriptors to the hard
    # one (jobs get the original limit back).
    job_fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (job_fd_limit[1], job_fd_limit[1]))
    log = server_logger(log_dir, foreground=not notify)
    spawner.log = log
    try:
        server = Server(data_dir, log_dir, log, job_fd_limit, spawner, check_interval,
                        ssh_config, down_after, placement, hook_settings)
        server.load()
        server.clients.listen()
    except BaseException:
        # Refused (a corrupt database, a full disk): leave the data dir as it was.
        try:
            os.unlink(paths["pid"])
        except OSError:
            pass
        raise
    log.info("server %d listening on %s (data dir %s, %d job(s) running)", os.getpid(),
             paths["socket"], data_dir, len(server.runner.running))
    if notify:
        print(f"READY {os.getpid()}", flush=True)
        null_fd = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null_fd, fd)
    return lock, server


def running_server_pid(pid_path):
    """The pid of the server holding the lock; a racing winner may not have written it yet."""
    deadline = time.monotonic() + 1.0
    while True:
        pid = read_pid(pid_path)
        if pid is not None and os.path.exists(f"/proc/{pid}") or time.monotonic() > deadline:
            return pid
        time.sleep(0.02)


def server_logger(log_dir, foreground):
    import logging
    log = logging.getLogger("cli.py")
    log.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers = [logging.FileHandler(os.path.join(log_dir, SERVER_LOG_FILE))]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


###############################################################################
# Client commands ##############################################################
###############################################################################

# [0-9], not \d: \d and int() also take other scripts' digits, such as '١'.
DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\Z")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
JOB_ID_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?\Z")


def parse_duration(text, what, limit=MAX_DURATION, positive=False):
    """Seconds from 90, 90s, 10m, 2h, 7d or 1w, at most LIMIT (and more than 0 if
    POSITIVE)."""
    match = DURATION.match(text.strip().lower())
    if not match:
        raise UserError(f"{what} {text!r} is not a duration: write a number of seconds, or "
                        "one with a unit like 30s, 10m, 2h or 7d")
    seconds = float(match[1]) * DURATION_UNITS[match[2]]
    if positive and seconds <= 0:
        raise UserError(f"{what} must be longer than 0")
    if seconds > limit:
        longest = f"{limit / 86400:g} days" if limit > 86400 else f"{limit / 3600:g} hours"
        raise UserError(f"{what} {text} is too long: at most {longest}")
    return seconds


def parse_job_ids(words):
    """Job ids as typed: 12, a range 12-14, or 12,13; 7.3 for task 3 of array 7.  A
    range is a list of job ids (ints); one number (12) and a task (7.3) go to the
    server as typed (strings), which knows whether 12 is an array (Queue.named)."""
    job_ids = []
    for word in words:
        for part in filter(None, word.split(",")):
            task = JOB_NAME.match(part)
            if task and task[2] is not None:
                if not 1 <= int(task[1]) <= MAX_JOB_ID:
                    raise UserError(f"{part}: array ids run from 1 to {MAX_JOB_ID}")
                job_ids.append(f"{int(task[1])}.{int(task[2])}")
                continue
            match = JOB_ID_RANGE.match(part)
            if not match:
                raise UserError(f"{part!r} is not a job id, a range of ids or a task (like "
                                "12, 12-14 or 7.3)")
            if max(len(match[1]), len(match[2] or "")) > len(str(MAX_JOB_ID)):
                raise UserError(f"{part}: job ids run from 1 to {MAX_JOB_ID}")
            first, last = int(match[1]), int(match[2] or match[1])
            if last < first:
                raise UserError(f"the range {part} runs backwards: write {last}-{first}")
            if first < 1 or last > MAX_JOB_ID:
                raise UserError(f"{part}: job ids run from 1 to {MAX_JOB_ID}")
            if last - first + len(job_ids) >= MAX_BULK_JOBS:
                raise UserError(f"more than {MAX_BULK_JOBS} job ids at once: give smaller ranges")
            job_ids.extend([str(first)] if match[2] is None else range(first, last + 1))
    if not job_ids:
        raise UserError("no job ids given")
    return list(dict.fromkeys(job_ids))   # each once, in the order given


def plain_number(text):
    """TEXT is ASCII digits only: isdigit() alone also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def one_job_id(text):
    """argparse type for commands that show one job (or one array: its id): the id as
    typed, for the server (see parse_job_ids)."""
    match = JOB_NAME.match(text)
    if not match or not 1 <= int(match[1]) <= MAX_JOB_ID:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one job id, array id or task like 7.3 (ids run from 1 to "
            f"{MAX_JOB_ID}; for several jobs: jobs --last N, or jobs --json)")
    return f"{int(match[1])}" + (f".{int(match[2])}" if match[2] is not None else "")


def array_id(text):
    """argparse type for jobs --array."""
    if not plain_number(text) or not 1 <= int(text) <= MAX_JOB_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is not an array id (what add_job "
                                         "printed, like 7)")
    return int(text)


def looks_like_job_ids(words):
    return all(JOB_ID_RANGE.match(part) or JOB_NAME.match(part)
               for word in words for part in word.split(",") if part)


def positive_int(text):
    """argparse type for counts that must be at least 1 (--slots, --last)."""
    if not plain_number(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def down_after_count(text):
    """argparse type for --down-after: 0 (off) to MAX_DOWN_AFTER."""
    if not plain_number(text) or int(text) > MAX_DOWN_AFTER:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to "
                                         f"{MAX_DOWN_AFTER}")
    return int(text)


def retry_count(text):
    """argparse type for --retries: 0 or more, at most MAX_RETRIES."""
    if not plain_number(text) or int(text) > MAX_RETRIES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to "
                                         f"{MAX_RETRIES}")
    return int(text)


def connect(data_dir, command, params):
    """A connection to the server of DATA_DIR with the request already sent."""
    path = socket_path(data_dir)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        connection.close()
        raise UserError(f"no server running for {data_dir}; start it with ./cli.py start"
                        + ("" if data_dir == os.path.abspath(DEFAULT_DATA_DIR)
                           else f" --server_data_dir {data_dir}")) from None
    except PermissionError:
        connection.close()
        raise UserError(f"permission denied on {path}: the server belongs to another user"
                        ) from None
    # The request carries the caller's environment: only hand it to our own server.
    peer_uid = struct.unpack("3i", connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    if peer_uid != os.getuid():
        connection.close()
        raise UserError(f"the server on {path} runs as another user (uid {peer_uid}); "
                        "refusing to talk to it")
    try:
        connection.sendall(encode_request(command, params))
    except OSError:
        pass   # the server may have refused the request early: its reply says why
    return connection


def request(data_dir, command, **params):
    """Send one request to the server of DATA_DIR and return its result."""
    return stream(data_dir, command, None, **params)


def stream(data_dir, command, on_event, on_idle=None, **params):
    """Send one request; hand each event line to ON_EVENT until the reply; return its result.

    ON_IDLE, if given, is called after each second in which nothing came.
    """
    with connect(data_dir, command, params) as connection:
        for line in reply_lines(connection, on_idle):
            message = decode_reply_line(line, data_dir)
            if "event" in message and on_event is not None:
                on_event(message)
            elif "ok" in message:
                return reply_result(message)
    raise LostServer(f"the server for {data_dir} went away before answering (stopped or "
                     "crashed; see its server.log); start it again and retry")


def reply_lines(connection, on_idle=None):
    """The lines the server sends, the last one even without its newline."""
    import select
    lines = LineReader()
    while True:
        # A timeout on the socket itself would do, but a file made of a socket
        # refuses every read after its first timeout: hence select.
        if on_idle is not None and not select.select([connection], [], [], 1.0)[0]:
            on_idle()
            continue
        chunk = connection.recv(1 << 16)
        if not chunk:
            break
        yield from lines.feed(chunk)
    if lines.pending:
        yield bytes(lines.pending)


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def command_start(options):
    """Start the server for a data dir, in the background unless --foreground.

    Returns once the server accepts commands, so `./cli.py start && ./cli.py
    add_slave ...` needs no sleep.  A second start on the same data dir fails
    and names the running server's pid; what a killed server left behind
    (lock, pid file, socket) does not block a new start.  Running jobs from
    before are picked up again, and those that ended meanwhile are recorded
    with their real exit status.
    """
    data_dir = options.data_dir
    log_dir = resolve_dir(options.log_dir or options.log_dir_positional or DEFAULT_LOG_DIR)
    check_interval = parse_duration(options.check_interval, "--check-interval")
    ssh_config = start_ssh_config(options)
    hook_settings = start_hook_settings(options)
    if options.foreground:
        run_server(data_dir, log_dir, notify=options.notify, check_interval=check_interval,
                   ssh_config=ssh_config, down_after=options.down_after,
                   placement=options.placement, hook_settings=hook_settings)
        return 0
    import subprocess
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "start", "--foreground", "--notify",
         "--server_data_dir", data_dir, "--log_dir", log_dir,
         "--check-interval", str(check_interval)] +
        ([] if ssh_config is KEEP_SSH_CONFIG else ["--ssh-config", ssh_config or "default"]) +
        ([] if options.down_after is None else ["--down-after", str(options.down_after)]) +
        ([] if options.placement is None else ["--placement", options.placement]) +
        start_hook_arguments(hook_settings),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, cwd="/")
    output = []
    for line in server.stdout:
        text = line.decode(errors="replace").rstrip("\n")
        if text.startswith("READY "):
            print(f"server started (pid {text.split()[1]}) for {data_dir}; "
                  f"job logs in {log_dir}")
            return 0
        output.append(text)
    server.wait()
    message = "\n".join(output).strip() or f"the server exited with status {server.returncode}"
    raise UserError(message[len("Error: "):] if message.startswith("Error: ") else message)


def start_hook_settings(options):
    """What start says of hooks: {"on_end": argv, or None (--no-on-end) to clear it;
    "hook_timeout": seconds}, each only if given (the queue keeps what it has)."""
    settings = {}
    if options.on_end is not None and options.no_on_end:
        raise UserError("--on-end sets the hook of every job and --no-on-end clears it: "
                        "choose one")
    if options.on_end is not None:
        settings["on_end"] = hook_command(options.on_end)
    elif options.no_on_end:
        settings["on_end"] = None
    if options.hook_timeout is not None:
        settings["hook_timeout"] = parse_duration(options.hook_timeout, "--hook-timeout",
                                                  positive=True)
    return settings


def start_hook_arguments(settings):
    """START_HOOK_SETTINGS's, as the background server's own start takes them again."""
    import shlex
    arguments = []
    if "on_end" in settings:
        arguments += ["--no-on-end"] if settings["on_end"] is None else \
            ["--on-end", shlex.join(settings["on_end"])]
    if "hook_timeout" in settings:
        arguments += ["--hook-timeout", format(settings["hook_timeout"], "f")]
    return arguments


def start_ssh_config(options):
    """The ssh config that start gives the queue: --ssh-config, else CLI_PY_SSH_CONFIG
    (how older versions named it), checked; KEEP_SSH_CONFIG if neither is given."""
    text = options.ssh_config
    if text is None:
        text = os.environ.get(SSH_CONFIG_VARIABLE) or None
    if text is None:
        return KEEP_SSH_CONFIG
    if text in ("default", "none"):
        return None if text == "default" else "none"
    path = resolve_dir(text)
    if re.search(r'["\n\0]', path):
        raise UserError(f"--ssh-config {text!r}: the path cannot contain quotes or newlines; "
                        "move the file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise UserError(f"--ssh-config {text}: cannot read it ({error.strerror})") from None
    if os.path.isdir(path):
        raise UserError(f"--ssh-config {text} is a directory: give an ssh config file")
    try:
        ssh_settings(["--", "localhost"], path)
    except SshConfigError as error:
        raise UserError(f"--ssh-config {text}: {error}; fix it and start again "
                        f"(check with ssh -F {path} -G HOST)") from None
    return path


def queue_ssh_config(data_dir):
    """The ssh config of the queue's server, which add_slave's check must read too.
    CLI_PY_SSH_CONFIG, if set, must name the same: the server's is the one jobs use."""
    try:
        ssh_config = request(data_dir, "ssh_config")["ssh_config"]
    except LostServer:
        raise
    except UserError as error:
        if "unknown command" not in str(error):
            raise
        raise UserError("the running server is older than this cli.py: restart it "
                        "(./cli.py stop && ./cli.py start), then try again") from None
    wanted = os.environ.get(SSH_CONFIG_VARIABLE)
    named = {"default": None, "none": "none"}.get(wanted, wanted and resolve_dir(wanted))
    if wanted and named != ssh_config:
        raise UserError(f"{SSH_CONFIG_VARIABLE} is {wanted}, but the queue's server uses "
                        f"{ssh_config or 'the default ssh config'}: the ssh config is set "
                        "where the server starts, for checks and jobs alike; restart it with "
                        f"./cli.py stop && ./cli.py start --ssh-config {wanted}, or unset "
                        f"{SSH_CONFIG_VARIABLE}")
    return ssh_config


def command_stop(options):
    """Stop the server.  Running jobs keep running; the next start picks them up."""
    result = request(options.data_dir, "stop")
    print(f"server stopped (pid {result['pid']})")
    return 0


def command_status(options):
    """Show workers, running and waiting jobs (or everything as JSON with --json)."""
    if options.json:
        print_json(request(options.data_dir, "status"))
        return 0
    result = request(options.data_dir, "status", waiting_limit=STATUS_TABLE_HEAD,
                     environments=False)
    print(render_status(result))
    return 0


def print_json(document):
    """Readable JSON, fast at any size: one line per key and per list item.

    json.dumps with indent= falls back to the pure-Python encoder, which takes
    seconds for 100,000 jobs; compact pieces go through the C one.
    """
    def lines(value, indent):
        pad = " " * indent
        if isinstance(value, list) and value:
            yield "[\n" + ",\n".join(pad + " " + json.dumps(item) for item in value) + \
                f"\n{pad}]"
        elif isinstance(value, dict) and value and indent == 0:
            parts = [f' {json.dumps(key)}: {"".join(lines(item, 1))}'
                     for key, item in value.items()]
            yield "{\n" + ",\n".join(parts) + "\n}"
        else:
            yield json.dumps(value)
    sys.stdout.write("".join(lines(document, 0)) + "\n")


def render_status(status):
    tabulate = require("tabulate").tabulate
    lines = [f"server pid {status['server']['pid']}, data dir {status['server']['data_dir']}, "
             f"job logs in {status['server']['log_dir']}, placement "
             f"{status.get('placement', PLACEMENTS[0])}"]
    dashboard = status.get("dashboard", {})
    if dashboard.get("on"):
        lines.append(f"dashboard on {dashboard['url']} (./cli.py dashboard prints it with its "
                     "token)" + (f"; not served: {dashboard['error']}" if dashboard["error"]
                                 else ""))
    if status["paused"]:
        lines.append("QUEUE PAUSED: no new job starts (./cli.py resume)")
    now = time.time()
    with_resources = any(slave.get("resources") for slave in status["slaves"])
    workers = [[slave["ip"], slave["status"], f"{slave['slots_in_use']}/{slave['slots']}",
                *[", ".join(resource_usage_lines(slave.get("resources", {}))) or "-"]
                * with_resources,
                " ".join(str(job["id"]) for job in slave["running_jobs"]) or "-",
                _health_text(slave, now), " ".join(sorted(slave["envs"])) or "-"]
               for slave in status["slaves"]]
    if status.get("services"):
        lines += ["", f"Services ({len(status['services'])})", render_services(status["services"])]
    if status.get("schedules"):
        lines += ["", f"Schedules ({len(status['schedules'])})",
                  render_schedules(status["schedules"])]
    lines += ["", f"Workers ({len(workers)})"]
    lines.append(tabulate(workers, headers=["worker", "status", "slots",
                                            *["resources"] * with_resources, "jobs",
                                            "last check", "variables"])
                 if workers else "  none: add one with ./cli.py add_slave HOST")
    if status.get("resources"):
        lines.append("Resources: " + ", ".join(resource_usage_lines(status["resources"])))
    holding = any(job.get("grant") for job in status["running_jobs"])
    running = [[job["id"], "+".join(job_workers(job)), job["slot"],
                *[grant_text(job.get("grant"))] * holding,
                _elapsed(now - parse_iso_time(job["started_at"])), _command_line(job), job["log"]]
               for job in status["running_jobs"]]
    if running:
        lines += ["", f"Running ({len(running)})",
                  tabulate(running, headers=["job", "worker", "slot", *["holds"] * holding,
                                             "running for", "command", "log"])]
    if status.get("arrays"):
        lines += ["", f"Arrays ({len(status['arrays'])})"]
        lines += [array_line(array) for array in status["arrays"]]
    counts = status["counts"]
    if status["job_waitlist"]:
        waiting = [[job["id"], job["priority"], job["waiting_for"], _command_line(job, 50)]
                   for job in status["job_waitlist"]]
        lines += ["", f"Waiting ({counts.get('waiting', 0)})",
                  tabulate(waiting, headers=["job", "priority", "waiting for", "command"])]
        hidden = counts.get("waiting", 0) - len(waiting)
        if hidden > 0:
            lines.append(f"... and {hidden} more (./cli.py status --json lists them all)")
    lines += ["", "Jobs: " + ", ".join(f"{counts.get(name, 0)} {name}" for name in
                                      ("waiting", "running", "succeeded", "failed", "killed",
                                       "timed_out", "skipped")
                                      if counts.get(name) or name in ("waiting", "running",
                                                                      "succeeded", "failed"))]
    return "\n".join(lines)


def array_line(array):
    """array 7: 1000 tasks, 812 succeeded, 3 failed, 50 running, 135 waiting (at most 50
    at once)."""
    counts = array["counts"]
    shown = [name for name in ("succeeded", "failed", "timed_out", "killed", "skipped",
                               "running", "waiting") if counts.get(name)]
    return (f"array {array['id']}: {array['tasks']} task{'s' * (array['tasks'] != 1)}, "
            + ", ".join(f"{counts[name]} {name}" for name in shown)
            + (f" (at most {array['max_running']} at once)" if array["max_running"] else ""))


def _health_text(slave, now, width=HEALTH_TEXT_WIDTH):
    """The worker's last check, cut to WIDTH (status --json has the whole reason).

    The table's other columns and tabulate's spacing take 50 characters: a reason
    cut to 30 keeps the table of workers with short names within 80 columns.
    """
    if not slave["checked_at"]:
        return "-" if slave["ssh_checked"] else "not checked"
    text = f"{slave['health']}, {_elapsed(now - parse_iso_time(slave['checked_at']))} ago"
    if slave["check_reason"]:
        text += f": {slave['check_reason']}"
    return text if len(text) <= width else text[:width - 3] + "..."


def _command_line(job, width=60):
    """The job's command as the user probably typed it, cut to WIDTH."""
    script = job["script"]
    if script.startswith(job["cwd"].rstrip("/") + "/"):
        script = "./" + script[len(job["cwd"].rstrip("/")) + 1:]
    text = " ".join(_shell_word(part) for part in [script, *job["args"]])
    return text if len(text) <= width else text[:width - 3] + "..."


# How bash's $'...' quoting writes these characters (printf %q writes the same).
SHELL_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r",
                 "\x1b": "\\E"}


def _shell_word(text):
    """TEXT quoted for a shell; a newline or other character a terminal would act on
    instead of show is escaped the way bash's $'...' quoting does, so that it cannot
    break a table's row."""
    import shlex
    if all(map(_shown_as_is, text)):
        return shlex.quote(text)
    escaped = []
    for character in text:
        code = ord(character)
        if character in SHELL_ESCAPES:
            escaped.append(SHELL_ESCAPES[character])
        elif _shown_as_is(character):
            escaped.append(character)
        elif code < 0x80:   # (\xHH is a byte: above 0x7f it would not be this character)
            escaped.append(f"\\x{code:02x}")
        else:
            escaped.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "$'" + "".join(escaped) + "'"


def _shown_as_is(character):
    # A byte that was not UTF-8 (a surrogate escape) is printed as the byte it
    # was (see main): only bytes above 0x7f are escaped so, never a newline or
    # another ASCII control character.
    return character.isprintable() or 0xDC80 <= ord(character) <= 0xDCFF


def _elapsed(seconds):
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def command_add_slave(options):
    """Register workers, after checking that each accepts a passwordless SSH login.

    Each host is checked with fabric by running `true`, going where the jobs'
    ssh goes: the queue's ssh config (start --ssh-config) as ssh itself reads
    it, ProxyJump and ProxyCommand included, keys or agent only (never a
    prompt), and host keys checked against known_hosts as ssh checks them.
    Hosts are checked in parallel, those that pass are added, and each failure
    is printed with its reason and makes the exit status non-zero.
    """
    named = [(host, options.slots) for host in expand_hosts(options.hosts)]
    if options.hosts_file is not None:
        named += read_hosts_file(options.hosts_file, options.slots)
    if not named:
        raise UserError("name the workers to add: HOST ..., or --hosts-file FILE")
    hosts = unique_hosts([host for host, _ in named])
    slots_of = dict(named)
    variables = dict(parse_assignment(text) for text in options.env)
    resources = worker_resources(options)
    timeout = parse_duration(options.timeout, "--timeout", limit=MAX_SSH_TIMEOUT, positive=True)
    registered = set(request(options.data_dir, "workers"))
    for host in hosts:
        if host in registered:
            raise UserError(already_registered(host))
    ssh_config = queue_ssh_config(options.data_dir)
    if options.skip_ssh_auth_check:
        results = resolve_new_hosts(hosts, ssh_config)
    else:
        results = check_hosts(hosts, timeout, ssh_config,
                              CheckProgress(len(hosts) > 1 and sys.stderr.isatty()))
    failures = {host: reason for host, (reason, _) in results.items() if reason}
    passed = [host for host in hosts if host not in failures]
    for host, reason in failures.items():
        print(f"{host}: {reason}", file=sys.stderr)
    if passed:
        request(options.data_dir, "add_slave", hosts=passed, slots=options.slots,
                slots_of={host: slots_of[host] for host in passed
                          if slots_of[host] != options.slots},
                variables=variables, ssh_checked=not options.skip_ssh_auth_check,
                ssh_reuse=options.ssh_reuse, down_after=options.down_after,
                endpoints={host: results[host][1] for host in passed}, resources=resources)
        declared = resources_text(_worker_resources(resources))
        for host in passed:
            print(f"added {host} ({slots_of[host]} slot{'s' if slots_of[host] > 1 else ''}"
                  + (f", {declared})" if declared else ")"))
    if failures:
        raise UserError(f"{len(failures)} of {len(hosts)} worker(s) not added: fix the "
                        "reasons above (see Troubleshooting in README.md) and add them again")
    return 0


def command_remove_slave(options):
    """Remove workers.  A busy worker needs --wait (drain) or --kill (end its jobs)."""
    hosts = unique_hosts(expand_hosts(options.hosts))
    mode = "wait" if options.wait else "kill" if options.kill else None
    result = request(options.data_dir, "remove_slave", hosts=hosts, mode=mode)
    for host in result["removed"]:
        print(f"removed {host}")
    for host in result["draining"]:
        print(f"{host} takes no new jobs and will be removed when its jobs end")
    return 0


def command_add_job(options):
    """Queue a job and print its id; or an array of tasks, and print the array's id.

    The job runs SCRIPT with ARGS exactly as given, in the current directory,
    with the current environment plus the worker's and the job's -e variables,
    plus JOB_ID, SLAVE_IP, SLAVE_HOST, SLAVE_PORT, SLAVE_USER, SLOT, SLOTS and
    JOB_ATTEMPT (and SPLIT_HOSTS and SPLIT_PART with --split).  An array is
    many tasks from one call, each a job of its own with ARRAY_ID and TASK_ID:
    --array SPEC gives one task per index (Slurm's syntax; %K runs at most K at
    once); after ARGS, each `::: A B C` group adds one argument per task,
    several groups give every combination (as in GNU parallel); --args-file
    gives one task per line of arguments, --each-line one per line in TASK_ARG.
    Either all are queued or none.  The array's id stands for all its tasks in
    wait, kill, jobs, logs, retry, ... and ARRAY.TASK names one.  With --slots
    K --split, the K slots may come from several workers: see --split below.

    Added from inside a running job (by its script, or anything it started),
    the jobs are that job's children: they are killed when it ends, unless
    added with --nohup (see `jobs --tree`, `wait --children`).
    """
    parent = job_of_environment()
    if options.nohup and parent is None:
        raise UserError("--nohup is for jobs added from inside a running job (JOB_ID is not "
                        "set): a job added from outside has no parent to outlive")
    script = resolve_script(options.script)
    args = options.args
    if args[:1] in (["-e"], ["--args-file"], ["--array"], ["--each-line"]):
        print(f"note: {args[0]} after SCRIPT goes to the script as an argument; put "
              "add_job's own options before SCRIPT", file=sys.stderr)
    variables = dict(parse_assignment(text) for text in options.env)
    policy = job_policy(options)
    tasks = task_request(options, args)
    if options.array is not None:
        array_request(options.array, tasks.get("args_list"), tasks.get("task_args"))
    family = {} if parent is None else {"parent": parent, "nohup": options.nohup}
    result = request(options.data_dir, "add_job", script=script, cwd=current_dir(),
                     environment=dict(os.environ), variables=variables, umask=current_umask(),
                     array=options.array, **policy, **tasks, **family)
    print(result["array"] or result["id"])
    if result.get("note"):
        print(f"note: {result['note']}", file=sys.stderr)
    if result.get("skipped"):
        print(f"note: {describe_ids(list(range(result['first'], result['last'] + 1)))} "
              f"will not run (skipped): {result['skipped']}", file=sys.stderr)
    return 0


def task_request(options, args):
    """The arguments of add_job's request: ARGS for one job (or each --array task),
    an argument list per task (:::, --args-file), or ARGS and one TASK_ARG per
    task (--each-line)."""
    if options.each_line is None:
        arg_lists = job_arguments(args, options.args_file)
        many = ":::" in args or options.args_file is not None
        return {"args_list": arg_lists} if many else {"args": arg_lists[0]}
    if options.args_file is not None or ":::" in args:
        raise UserError("--each-line makes one task per line; ::: and --args-file make "
                        "tasks too: use one of them")
    return {"args": args, "task_args": read_lines(options.each_line)}


def read_lines(path):
    """--each-line: the lines of PATH (- for stdin) that are not blank, without their
    line ends."""
    try:
        stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    with stream:
        try:
            lines = [line.decode().rstrip("\r\n") for line in stream if line.strip()]
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text: TASK_ARG carries text; convert it "
                            "(iconv -t UTF-8)") from None
    if not lines:
        raise UserError(f"{path} holds no line: write one line per task")
    if len(lines) > MAX_BULK_JOBS:
        raise UserError(f"{path} holds more than {MAX_BULK_JOBS} lines; split it")
    if any("\0" in line for line in lines):
        raise UserError(f"{path} holds a NUL byte, which no variable can carry")
    return lines


def job_of_environment():
    """The job this process says it runs in (JOB_ID, set for every job script), or
    None.  Only a claim: the server checks it against the process (process_of_job)."""
    text = os.environ.get("JOB_ID")
    if text is None:
        return None
    if not plain_number(text) or not 1 <= int(text) <= MAX_JOB_ID:
        print(f"note: JOB_ID={text!r} is not a job id; ignored", file=sys.stderr)
        return None
    return int(text)


def job_policy(options):
    """add_job's scheduling options, checked, as the request carries them."""
    not_before = None
    if options.at is not None:
        not_before = parse_start_time(options.at)
    elif options.delay is not None:
        not_before = time.time() + parse_duration(options.delay, "--delay")
    return {
        "slots_wanted": options.slots,
        **({"split": True} if getattr(options, "split", False) else {}),
        "on": host_list(options.on, "--on"),
        "prefer": host_list(options.prefer, "--prefer"),
        "exclude": host_list(options.exclude, "--exclude"),
        "after": parse_job_ids(options.after) if options.after else [],
        "after_any": parse_job_ids(options.after_any) if options.after_any else [],
        "ssh_reuse": options.ssh_reuse,
        "priority": options.priority,
        "retries": options.retries,
        "retry_delay": 0.0 if options.retry_delay is None else
        parse_duration(options.retry_delay, "--retry-delay"),
        "timeout": None if options.timeout is None else
        parse_duration(options.timeout, "--timeout", positive=True),
        "not_before": None if not_before is None else iso_time(not_before),
        "on_end": None if getattr(options, "on_end", None) is None else
        hook_command(options.on_end),
        "resources": job_resources(options),
        "estimate": None if options.estimate is None else
        parse_duration(options.estimate, "--estimate", positive=True),
    }


def job_resources(options):
    """--gpus, --mem and --resource of add_job, add_service and add_schedule, as the
    request carries them; None for none."""
    resources = {}
    if options.gpus is not None:
        gpus = job_gpus(options.gpus)
        resources["gpus"] = gpus // GPU_UNITS if gpus % GPU_UNITS == 0 else gpus / GPU_UNITS
    if options.mem is not None:
        resources["mem"] = parse_size(options.mem, "--mem")
        if not resources["mem"]:
            raise UserError("--mem 0: ask for some memory (like --mem 16G), or leave it out")
    for text in options.resource:
        name, count = resource_assignment(text, 1)
        resources[name] = count
    return resources or None


def resource_assignment(text, low):
    """--resource NAME=COUNT: (NAME, COUNT), COUNT a whole number from LOW."""
    name, equals, count = text.partition("=")
    if not equals or not RESOURCE_NAME.match(name) or name in ("gpus", "mem", "slots"):
        raise UserError(f"--resource {text!r}: write NAME=COUNT, like licence=1 (NAME a "
                        "letter, then letters, digits, _ or -; for GPUs and memory use --gpus "
                        "and --mem)")
    if not plain_number(count.strip()) or int(count) < low or int(count) > MAX_RESOURCE_COUNT:
        raise UserError(f"--resource {text!r}: COUNT must be a whole number from {low}")
    return name, int(count)


def worker_resources(options, edit=False):
    """add_slave's (or, if EDIT, edit_slave's) --gpus, --mem and --resource, as the
    request carries them: None for none (or no change)."""
    resources = {}
    if options.gpus is not None:
        resources["gpus"] = [] if edit and options.gpus.strip() == "0" else \
            worker_gpus(options.gpus)
    if options.mem is not None:
        resources["mem"] = parse_size(options.mem, "--mem")
        if not (resources["mem"] or edit):
            raise UserError("--mem 0: declare some memory (like --mem 256G), or leave it out")
    for text in options.resource:
        name, count = resource_assignment(text, 0 if edit else 1)
        resources[name] = count
    return resources or None


def hook_command(text, flag="--on-end"):
    """--on-end's PROGRAM [ARGS...], one word for argparse, split into an argv as a
    POSIX shell would split it (but nothing is run to do it, and no shell ever
    runs the hook); PROGRAM resolved as add_job's SCRIPT is, to an absolute path."""
    import shlex
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise UserError(f"{flag} {text!r}: {error}; it is split into words as a shell "
                        "would, so fix its quoting") from None
    if not words:
        raise UserError(f"{flag} needs a program, like {flag} 'notify-send \"job done\"'")
    program = words[0]
    if "/" not in program and not os.path.exists(program):
        import shutil
        program = shutil.which(program) or program
    program = os.path.abspath(program)
    try:
        check_script(program, shown=words[0], what=f"{flag} program")
    except UserError as error:
        raise UserError(f"{error} (give a path, or a command on PATH)") from None
    return [program, *words[1:]]


def host_list(texts, flag):
    """Worker names from repeatable, comma-separated --on/--prefer/--exclude; None if none."""
    if not texts:
        return None
    hosts = expand_hosts(host for text in texts for host in split_host_list(text))
    if not hosts:
        raise UserError(f"{flag} needs worker names, like {flag} node1,node2")
    for host in hosts:
        validate_host_name(host)
    return list(dict.fromkeys(hosts))


def parse_start_time(text):
    """--at: '2026-12-01 16:45' (local time), ISO 8601 with a zone, or '16:45' (the
    next time the clock shows it); seconds since the epoch."""
    from datetime import datetime, timedelta
    text = text.strip()
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text):
            clock = datetime.strptime(text, "%H:%M:%S" if text.count(":") == 2 else "%H:%M")
            moment = datetime.now().replace(hour=clock.hour, minute=clock.minute,
                                            second=clock.second, microsecond=0)
            if moment.timestamp() <= time.time():
                moment += timedelta(days=1)
            return moment.timestamp()
        return parse_iso_time(text)
    except (ValueError, OverflowError, OSError):
        raise UserError(f"--at {text!r} is not a time: use '2026-12-01 16:45' (local time), "
                        "'16:45', or ISO 8601 with a zone like 2026-12-01T16:45:00+01:00") \
            from None


def job_arguments(args, args_file):
    """One argument list per job: ARGS, or ARGS plus each ::: combination or file line."""
    if ":::" not in args and args_file is None:
        return [args]
    if ":::" in args and args_file is not None:
        raise UserError("use either ::: or --args-file, not both")
    if args_file is not None:
        return [args + line for line in read_args_file(args_file)]
    import itertools
    head = args.index(":::")
    groups, group = [], None
    for arg in args[head:]:
        if arg == ":::":
            group = []
            groups.append(group)
        else:
            group.append(arg)
    if any(not group for group in groups):
        raise UserError("each ::: needs at least one argument after it")
    count = 1
    for group in groups:
        count *= len(group)
    if count > MAX_BULK_JOBS:
        raise UserError(f"the ::: groups make {count} jobs; at most {MAX_BULK_JOBS} at once")
    return [args[:head] + list(combination) for combination in itertools.product(*groups)]


def read_args_file(path):
    """Arguments per line, split as a POSIX shell would (quotes, escapes, # comments)."""
    import shlex
    try:
        stream = sys.stdin if path == "-" else \
            open(path, encoding="utf-8", errors="surrogateescape")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    jobs = []
    with stream:
        for number, line in enumerate(stream, 1):
            try:
                words = shlex.split(line, comments=True)
            except ValueError as error:
                raise UserError(f"{path}, line {number}: {error}; fix the quoting "
                                "(nothing was queued)") from None
            if words:
                jobs.append(words)
            if len(jobs) > MAX_BULK_JOBS:
                raise UserError(f"{path} holds more than {MAX_BULK_JOBS} jobs; split it")
    if not jobs:
        raise UserError(f"{path} holds no job: write one line of arguments per job")
    return jobs


def command_remove_job(options):
    """Remove waiting jobs by id, or every waiting job with this exact script and args."""
    targets = [options.first, *options.rest]
    if looks_like_job_ids(targets):
        result = request(options.data_dir, "remove_job", ids=parse_job_ids(targets))
    else:
        script = resolve_script(options.first, must_run=False)
        result = request(options.data_dir, "remove_job", script=script, args=options.rest)
    print(f"removed {describe_ids(result['removed'])}")
    return 0


def describe_ids(job_ids):
    """job 4, or jobs 4-9 for a run, or jobs 4, 7, 9, 12-20 (runs of 3 or more)."""
    job_ids = sorted(job_ids)
    if len(job_ids) == 1:
        return f"job {job_ids[0]}"
    if job_ids == list(range(job_ids[0], job_ids[-1] + 1)):
        return f"jobs {job_ids[0]}-{job_ids[-1]}"
    runs = []   # [first, last] of each run of consecutive ids
    for job_id in job_ids:
        if runs and job_id == runs[-1][1] + 1:
            runs[-1][1] = job_id
        else:
            runs.append([job_id, job_id])
    return "jobs " + ", ".join(f"{first}-{last}" if last - first >= 2 else
                               ", ".join(map(str, range(first, last + 1)))
                               for first, last in runs)


def command_kill(options):
    """End jobs: running ones get SIGTERM to their process group, then SIGKILL.

    Running jobs get SIGTERM to their whole process group, and SIGKILL after
    the grace period if anything is left; waiting jobs end without running.
    Either way they end as killed.  A job's family goes with it: the jobs added
    from inside it (its children, theirs, and so on), --nohup ones too.
    Returns once they have ended.
    """
    grace = parse_duration(options.grace, "--grace", limit=MAX_KILL_GRACE)
    job_ids = parse_job_ids(options.ids)
    result = request(options.data_dir, "kill", ids=job_ids, grace=grace)
    print(f"killed {describe_ids(result['killed'])}"
          + (f" ({result['ended']} had already ended)" if result["ended"] else ""))
    return 0


def command_retry(options):
    """Run ended jobs again: same id, same options, as a new attempt.

    Each job goes back to the queue under its id, with its --retries afresh;
    its log, attempts and JOB_ATTEMPT carry on from the last attempt.  Jobs
    that were skipped because it failed (--after, --after-any) come back with
    it, and theirs in turn, unless another failed job would skip them again.
    With --failed (failed or timed out), --state or --script, only the ended
    jobs that match are retried: all of them, or those among the IDs given.
    Waiting and running jobs are refused.
    """
    if options.failed and options.state is not None:
        raise UserError("--failed is --state failed plus timed_out: give one or the other")
    if not options.ids and not (options.failed or options.state or options.script):
        raise UserError("name the jobs to retry: IDS (like 12 or 12-20), or --failed, "
                        "--state S or --script P")
    job_ids = parse_job_ids(options.ids) if options.ids else None
    result = request(options.data_dir, "retry", ids=job_ids, failed=options.failed,
                     state=options.state, script=options.script)
    if not result["retried"]:
        print("nothing to retry: no ended job matches")
        return 0
    print(f"retried {describe_ids(result['retried'])}"
          + (f"; back with them, the dependents they had skipped: {describe_ids(result['back'])}"
             if result["back"] else "")
          + (f"; still skipped (another job they wait for failed): "
             f"{describe_ids(result['held'])}" if result["held"] else ""))
    return 0


def command_add_service(options):
    """Declare a service: keep N replicas of SCRIPT running, each started again when it ends.

    Each replica runs SCRIPT like a job (same log, kill, placement, history and
    recovery), with SERVICE=NAME, REPLICA (0 to N-1, kept by a replica that
    starts again) and, with --port P, PORT=P+REPLICA, besides JOB_ID, SLAVE_IP
    and the rest.  A replica whose job ends, for any reason but scale,
    stop_service or remove_service, starts again: after 1s, twice as long after
    each quick end, up to 5m, and after 1s again once it has run for a minute.
    Replicas start before waiting batch jobs and take slots as jobs do.  The
    service comes back when the server starts, until stop_service.
    """
    script = resolve_script(options.script)
    variables = dict(parse_assignment(text) for text in options.env)
    health = None
    if options.health_tcp or options.health_cmd is not None:
        health = {"tcp": True} if options.health_tcp else {"cmd": options.health_cmd}
        health.update(interval=parse_duration(options.health_interval, "--health-interval",
                                              positive=True),
                      failures=options.health_failures)
    result = request(options.data_dir, "add_service", name=options.name, script=script,
                     args=options.args, cwd=current_dir(), environment=dict(os.environ),
                     variables=variables, umask=current_umask(), replicas=options.replicas,
                     port=options.port, slots_wanted=options.slots,
                     on=host_list(options.on, "--on"),
                     prefer=host_list(options.prefer, "--prefer"),
                     exclude=host_list(options.exclude, "--exclude"),
                     ssh_reuse=options.ssh_reuse, health=health,
                     resources=job_resources(options))
    jobs = [instance["job"] for instance in result["instances"]]
    print(f"service {result['name']}: {result['replicas']} replica(s)"
          + (f" ({describe_ids(jobs)})" if jobs else ""))
    return 0


def command_scale(options):
    """Change how many replicas of a service run; scaling down stops the highest-numbered.

    The replicas stopped get SIGTERM, and SIGKILL after the grace period, as
    kill does; scale returns once they have ended.
    """
    grace = parse_duration(options.grace, "--grace", limit=MAX_KILL_GRACE)
    result = request(options.data_dir, "scale", name=options.name,
                     replicas=options.replicas, grace=grace)
    print(f"service {result['name']}: {result['replicas']} replica(s), {result['running']} "
          "running")
    return 0


def command_stop_service(options):
    """Stop every replica of a service and keep it stopped (its spec stays).

    Until start_service it stays stopped, across server restarts too.
    """
    grace = parse_duration(options.grace, "--grace", limit=MAX_KILL_GRACE)
    result = request(options.data_dir, "stop_service", name=options.name, grace=grace)
    print(f"service {result['name']}: stopped")
    return 0


def command_start_service(options):
    """Start a stopped service again: its replicas are queued at once."""
    result = request(options.data_dir, "start_service", name=options.name)
    print(f"service {result['name']}: started, {result['replicas']} replica(s)")
    return 0


def command_remove_service(options):
    """Stop every replica of a service and forget it (their jobs stay in the history)."""
    grace = parse_duration(options.grace, "--grace", limit=MAX_KILL_GRACE)
    result = request(options.data_dir, "remove_service", name=options.name, grace=grace)
    print(f"service {options.name}: removed"
          + (f" ({describe_ids(result['stopped'])} stopped)" if result["stopped"] else ""))
    return 0


def command_services(options):
    """List the services: wanted, running and healthy replicas, restarts, last end.

    With a NAME, that service in full, with each replica: its job, worker,
    since when, health and restarts.
    """
    services = request(options.data_dir, "services", name=options.name)
    if options.json:
        print_json(services if options.name is None else services[0])
        return 0
    if options.name is None:
        print(render_services(services) if services else
              "no services (add one with ./cli.py add_service NAME -- SCRIPT)")
        return 0
    print(render_service(services[0]))
    return 0


def render_services(services):
    """One line per service, for services and status."""
    tabulate = require("tabulate").tabulate
    rows = [[service["name"], "started" if service["enabled"] else "stopped",
             service["replicas"], service["running"], service["healthy"], service["restarts"],
             service["last_end"] or "-", _placement_text(service)]
            for service in services]
    return tabulate(rows, headers=["service", "state", "wanted", "running", "healthy",
                                   "restarts", "last end", "placement"])


def render_service(service):
    """services NAME: the service's spec, then each replica."""
    tabulate = require("tabulate").tabulate
    now = time.time()
    lines = [f"service:   {service['name']} ({'started' if service['enabled'] else 'stopped'})",
             f"command:   {_command_line(service, 200)}",
             f"replicas:  {service['replicas']} wanted, {service['running']} running, "
             f"{service['healthy']} healthy, {service['restarts']} restart(s)",
             f"port:      {service['port'] if service['port'] is not None else '-'}"
             + (f" (PORT {service['port']} to {service['port'] + service['replicas'] - 1})"
                if service["port"] is not None and service["replicas"] > 1 else ""),
             f"placement: {_placement_text(service)}",
             f"health:    {_health_check_text(service['health'])}",
             f"last end:  {service['last_end'] or '-'}", ""]
    rows = [[instance["replica"], instance["state"], instance["job"] or "-",
             instance["worker"] or "-",
             _elapsed(now - parse_iso_time(instance["since"])) if instance["since"] else "-",
             instance["health"] or "-", instance["restarts"],
             instance["why"] or instance["health_reason"] or instance["last_end"] or "-"]
            for instance in service["instances"]]
    lines.append(tabulate(rows, headers=["replica", "state", "job", "worker", "for", "health",
                                         "restarts", "last end"]) if rows else "no replicas")
    return "\n".join(lines)


def _health_check_text(health):
    if health is None:
        return "no check (running counts as healthy)"
    probe = "TCP connect to SLAVE_HOST:PORT" if health.get("tcp") else f"`{health['cmd']}`"
    every = _duration_text(health["interval"]) if health["interval"] >= 1 else \
        f"{health['interval']:g}s"
    return (f"{probe} every {every}, restarted after "
            f"{health['failures']} failure(s) in a row")


def _placement_text(service):
    parts = [f"{service['slots']} slots"] if service["slots"] > 1 else []
    for key in ("on", "prefer", "exclude"):
        if service[key]:
            parts.append(f"--{key} {','.join(service[key])}")
    return " ".join(parts) or "any worker"


def command_load_services(options):
    """Make the services those of a JSON document: add, change and remove them to match.

    The document lists every service, as services --json prints them (a list,
    or {"services": [...]}, so a status --json document loads too): name,
    script, args, cwd, envs, replicas, port, enabled, health, slots, on,
    prefer, exclude and ssh_reuse.  Only name and script are required; cwd
    defaults to the current directory, replicas to 1, enabled to true, and a
    relative script is found as add_service finds it.  The fields services
    --json adds about the running replicas (running, healthy, restarts,
    last_end, instances) are ignored.

    The document is checked whole first: a mistake in it is one error line,
    naming the service and the field, and nothing changes.  Then, in one step,
    a service missing here is added; one whose script, args, cwd, envs, port,
    health or placement changed is replaced, and its replicas restart with the
    new spec; one whose replicas changed is scaled, one whose enabled changed
    is stopped or started; one not in the document is removed.  The replicas
    stopped get SIGTERM, then SIGKILL after --grace, and load_services returns
    once they have ended.  It prints one line per difference, or "no change":
    loading the same document again changes nothing.  New and replaced
    services run in your current environment and umask, as add_service's do;
    those alone never count as a change.
    """
    grace = parse_duration(options.grace, "--grace", limit=MAX_KILL_GRACE)
    document, too_deep = read_json_document(options.file, "a services document")
    for index, entry in enumerate(services_in(document)):
        # Scripts are found here, where PATH and the current directory are the user's.
        if isinstance(entry, dict) and isinstance(entry.get("script"), str):
            try:
                entry["script"] = resolve_script(entry["script"])
            except UserError as error:
                name = f" ({entry['name']})" if isinstance(entry.get("name"), str) else ""
                raise UserError(f"services[{index}]{name}: {error}") from None
    try:
        result = request(options.data_dir, "load_services", document=document,
                         cwd=current_dir(), environment=dict(os.environ),
                         umask=current_umask(), grace=grace)
    except RecursionError:   # json.dumps gives up a few levels before json.load does
        raise UserError(too_deep) from None
    for line in service_difference_lines(result["changes"]) or ["no change"]:
        print(line)
    return 0


def service_difference_lines(differences):
    """One line per difference load_services (or load_status) made."""
    lines = []
    for difference in differences:
        name, change = difference["name"], difference["change"]
        (replicas_before, replicas), (enabled_before, enabled) = \
            difference["replicas"], difference["enabled"]
        if change == "added":
            lines.append(f"added {name} ({replicas} replica{'s' if replicas != 1 else ''}"
                         f"{'' if enabled else ', stopped'})")
        elif change == "changed":
            fields = difference["fields"] + \
                ([f"replicas {replicas_before} -> {replicas}"]
                 if replicas != replicas_before else []) + \
                ([("started" if enabled else "stopped")] if enabled != enabled_before else [])
            restart = enabled and enabled_before and replicas and replicas_before
            lines.append(f"changed {name}: {', '.join(fields)}"
                         + (" (its replicas restart)" if restart else ""))
        elif change == "scaled":
            lines.append(f"scaled {name} {replicas_before} -> {replicas}")
        else:   # started, stopped, removed
            lines.append(f"{change} {name}")
    return lines


def command_add_schedule(options):
    """Run a job on a schedule: every D, daily at HH:MM, on a cron line, or after another one.

    Each time the schedule fires, it queues a normal job of SCRIPT with ARGS
    (its own id, log, retries and placement, with the options given here), with
    SCHEDULE=NAME and SCHEDULED_FOR (the local time it was due, ISO 8601) in its
    environment.  While the schedule's previous run still waits or runs, a due
    time is skipped and counted (--overlap lets runs overlap).  --every counts
    from the previous firing; the first comes one interval after add_schedule
    (run_schedule fires one now).  --daily and --cron times are local, in the
    server's zone (TZ when it started, else the system's): a daylight-saving
    change neither skips nor doubles a run.  Times missed while the server was
    stopped or the machine slept fire once when it is back, however many there
    were, unless --skip-missed.  No due time ever fires twice, kill -9 of the
    server included.
    """
    script = resolve_script(options.script)
    variables = dict(parse_assignment(text) for text in options.env)
    every = None if options.every is None else \
        parse_duration(options.every, "--every", positive=True)
    schedule_rule(every, options.daily, options.days, options.cron, options.after_schedule)
    policy = job_policy(options)
    for name in ("after", "after_any", "not_before"):
        del policy[name]
    schedule = request(options.data_dir, "add_schedule", name=options.name, every=every,
                       daily=options.daily, days=options.days, cron=options.cron,
                       after_schedule=options.after_schedule, overlap=options.overlap,
                       skip_missed=options.skip_missed, script=script, args=options.args,
                       cwd=current_dir(), environment=dict(os.environ), variables=variables,
                       umask=current_umask(), **policy)
    print(f"schedule {schedule['name']}: {schedule['rule_text']}, "
          + (f"next run {_local_time(schedule['next_due'], '%Y-%m-%d %H:%M:%S')}"
             if schedule["next_due"] else "runs after each success of "
             f"{schedule['rule'].get('after')}"))
    return 0


def command_schedules(options):
    """List the schedules: rule, next run, latest run and how it ended, runs, skips.

    NEXT is local time; SKIPPED counts the due times that found the previous
    run not ended (see add_schedule --overlap).  Each run is a job: see them
    with ./cli.py jobs --schedule NAME.
    """
    schedules = request(options.data_dir, "schedules", name=options.name)
    if options.json:
        print_json(schedules if options.name is None else schedules[0])
        return 0
    if not schedules:
        print("no schedules (add one with ./cli.py add_schedule NAME --every 1h -- SCRIPT)")
        return 0
    print(render_schedules(schedules))
    return 0


def render_schedules(schedules):
    tabulate = require("tabulate").tabulate
    rows = [[schedule["name"], schedule["rule_text"],
             "paused" if schedule["paused"] else
             _local_time(schedule["next_due"], "%Y-%m-%d %H:%M:%S")
             if schedule["next_due"] else "-",
             "-" if schedule["last_job"] is None else
             f"job {schedule['last_job']} ({schedule['last_result'] or schedule['last_state'] or 'gone'})",
             schedule["runs"], schedule["skipped"], _command_line(schedule, 40)]
            for schedule in schedules]
    return tabulate(rows, headers=["schedule", "rule", "next run", "last run", "runs",
                                   "skipped", "command"])


def command_pause_schedule(options):
    """Stop a schedule from firing until resume_schedule; its jobs are left alone."""
    request(options.data_dir, "pause_schedule", name=options.name)
    print(f"schedule {options.name}: paused")
    return 0


def command_resume_schedule(options):
    """Let a paused schedule fire again, from now on: the times that passed while it was
    paused do not fire."""
    request(options.data_dir, "resume_schedule", name=options.name)
    print(f"schedule {options.name}: resumed")
    return 0


def command_remove_schedule(options):
    """Forget a schedule; the jobs it queued stay (waiting ones still run)."""
    request(options.data_dir, "remove_schedule", name=options.name)
    print(f"schedule {options.name}: removed")
    return 0


def command_run_schedule(options):
    """Fire a schedule now, once, and print the id of the job it queued.

    Refused while its previous run has not ended, unless it was added with
    --overlap.  A --every schedule counts its next run from this one; other
    rules keep their next time.  Works on a paused schedule too.
    """
    result = request(options.data_dir, "run_schedule", name=options.name)
    print(result["id"])
    return 0


def command_priority(options):
    """Change the priority of waiting jobs: higher starts first, FIFO among equals.

    Every job starts with the priority add_job gave it (default 0).  Running
    and finished jobs cannot be changed.
    """
    job_ids = parse_job_ids(options.ids)
    result = request(options.data_dir, "priority", ids=job_ids, priority=options.priority)
    print(f"{describe_ids(result['ids'])}: priority {result['priority']}")
    return 0


def command_jobs(options):
    """List jobs from the history: where each is, how it ended, where its log is.

    Without --last the table shows the most recent 50; --json lists every job
    that matches.  With an ID, shows that one job in full, with its parent and
    children; with an array's id (or --array), lists its tasks, which the
    filters then narrow.  --tree shows families (jobs added from inside other
    jobs) as trees: every family, or with an ID the one that job belongs to.
    """
    if options.tree:
        if options.state or options.worker or options.script or options.last or \
                options.array is not None or options.schedule:
            raise UserError("--tree shows whole families: give it no --state, --worker, "
                            "--script, --schedule, --last or --array")
        jobs = request(options.data_dir, "jobs", id=options.id, tree=True)
        if options.json:
            print_json(jobs)
        else:
            print(render_tree(jobs) if jobs else "no families: no job was added from inside "
                  "another job")
        return 0
    script = options.script
    if script is not None and "/" in script:
        script = os.path.abspath(script)
    last = options.last if options.last is not None or options.json else JOBS_TABLE_LAST
    filters = {"state": options.state, "worker": options.worker, "script": script,
               "schedule": options.schedule}
    if options.id is not None:
        if options.array is not None:
            raise UserError("give either an ID or --array, not both")
        # The user's own --last only: the server refuses filters for one job.
        jobs = request(options.data_dir, "jobs", id=options.id, last=options.last, **filters)
        if len(jobs) == 1 and "attempts" in jobs[0]:   # one job in full, not an array
            print(json.dumps(jobs[0], indent=1) if options.json else render_job(jobs[0]))
            return 0
        jobs = jobs[-last:] if last is not None else jobs
    else:
        jobs = request(options.data_dir, "jobs", array=options.array, last=last, **filters)
    if options.json:
        print_json(jobs)
        return 0
    print(render_jobs(jobs) if jobs else "no jobs")
    if options.last is None and len(jobs) == JOBS_TABLE_LAST:
        print(f"(the last {JOBS_TABLE_LAST}: --last N shows more, --json every one)")
    return 0


def render_jobs(jobs):
    """The jobs table; a task column if some of them are tasks of arrays."""
    tabulate = require("tabulate").tabulate
    now = time.time()
    tasks = any(job["array"] is not None for job in jobs)
    table = [[job["id"]] + [task_name(job) or "-"] * tasks +
             [job["result"] or job["state"], _exit_text(job), job["worker"] or "-",
              "-" if job["slot"] is None else job["slot"], job["attempt"],
              _local_time(job["submitted_at"]), _runtime(job, now), _command_line(job)]
             for job in jobs]
    return tabulate(table, headers=["job"] + ["task"] * tasks +
                    ["state/result", "exit", "worker", "slot", "attempt", "submitted",
                     "runtime", "command"])


def task_name(job):
    """ARRAY.TASK of a task (its JSON form), None for a job of no array."""
    return None if job["array"] is None else f"{job['array']}.{job['task']}"


def render_tree(jobs):
    """Families as trees: each job under its parent, with how it is or ended."""
    by_id = {job["id"]: job for job in jobs}
    lines = []
    # A stack, not recursion: a family may be deeper than Python's recursion limit.
    stack = [(job, "", "") for job in reversed(jobs) if job["parent"] not in by_id]
    while stack:
        job, prefix, branch = stack.pop()
        how = job["result"] or job["state"]
        reason = f" ({job['reason']})" if job["result"] and job["reason"] else ""
        shown = prefix if len(prefix) <= TREE_INDENT_LIMIT else \
            "…" + prefix[-TREE_INDENT_LIMIT + 1:]
        lines.append(f"{shown}{branch}{job['id']}  {how}{reason}"
                     f"{'  [nohup]' if job['nohup'] else ''}  {_command_line(job)}")
        children = [by_id[child] for child in job["children"] if child in by_id]
        below = prefix + ("" if not branch else "   " if branch == "└─ " else "│  ")
        below = below[-TREE_INDENT_LIMIT:] if len(below) > 2 * TREE_INDENT_LIMIT else below
        for child in reversed(children):
            stack.append((child, below, "└─ " if child is children[-1] else "├─ "))
    return "\n".join(lines)


def render_job(job):
    lines = []
    for key in ("id", "task", "state", "result", "exit_code", "signal", "reason", "worker",
                "slots", "parts", "attempt", "retries", "priority", "timeout", "not_before",
                "script", "args", "cwd", "envs", "submitted_at", "started_at", "ended_at",
                "log", "parent", "children", "schedule", "on_end", "resources", "estimate",
                "grant"):
        value = job.get(key)
        if key in ("resources", "estimate", "grant"):
            if not value:
                continue   # (lines for jobs that ask for resources or give an estimate)
            value = need_text(ResourceNeed.shown(value)) + " per slot" * job["split"] \
                if key == "resources" else _duration_text(value) if key == "estimate" \
                else grant_text(value)
        elif key == "schedule":
            if value is None:
                continue
            value += f" (due {_local_time(job['scheduled_for'], '%Y-%m-%d %H:%M:%S')})"
        elif key == "task":
            if value is None:
                continue
            value = task_name(job) + (f" (TASK_ARG={job['task_arg']})"
                                      if job["task_arg"] is not None else "")
        elif key == "parts":
            if not job["split"]:
                continue   # (a line for --split jobs only)
            value = " + ".join(f"{worker} ({len(slots)})" for worker, slots in value) \
                if value else None
        elif key == "parent" and value is not None and job["nohup"]:
            value = f"{value} (nohup: outlives its end)"
        elif key == "children":
            value = ", ".join(map(str, value)) if value else None
        elif key == "on_end":
            if value is None:
                continue   # (a line for jobs with a hook of their own only)
            import shlex
            value = shlex.join(value)
        elif key == "signal" and value is not None:
            value = f"{value} ({_signal_name(value)})"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value, ensure_ascii=False)
        lines.append(f"{key + ':':14s}{'-' if value is None else value}")
    for attempt in job.get("attempts", []):
        if attempt is job["attempts"][0]:
            lines.append("attempts:")
        where = "+".join(worker for worker, _ in attempt["parts"]) if attempt.get("parts") \
            else attempt["worker"]
        lines.append(f"  {attempt['attempt']}. {attempt['result']} on {where} "
                     f"(exit {_exit_text(attempt)}), {_local_time(attempt['started_at'])} to "
                     f"{_local_time(attempt['ended_at'])}"
                     + (f": {attempt['reason']}" if attempt["reason"] else ""))
    lines += hook_lines(job.get("hooks", ()))
    return "\n".join(lines)


def hook_lines(hooks):
    """jobs ID's lines on the job's hook runs: how each went, or that it is to run."""
    import shlex
    lines = ["hooks:"] if hooks else []
    for hook in hooks:
        if hook["state"] != "done":
            how = hook["state"] + (" (again: it had not finished when the server went)"
                                   if hook["starts"] > (hook["state"] == "running") else "")
        elif hook["error"]:
            how = hook["error"]
        else:
            how = ("timed out, " if hook["timed_out"] else "") + \
                (f"exit {hook['exit_code']}" if hook["exit_code"] is not None else
                 _signal_name(hook["signal"])) + \
                f" after {hook['duration']:.1f}s, at {_local_time(hook['ended_at'])}"
        lines.append(f"  {shlex.join(hook['program'])} ({hook['from']}'s --on-end): {how}")
    return lines


def _exit_text(job):
    if job["signal"] is not None:
        return _signal_name(job["signal"])
    return "-" if job["exit_code"] is None else str(job["exit_code"])


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _local_time(iso, form="%m-%d %H:%M:%S"):
    return "-" if iso is None else time.strftime(form, time.localtime(parse_iso_time(iso)))


def _runtime(job, now):
    if job["started_at"] is None:
        return "-"
    end = parse_iso_time(job["ended_at"]) if job["ended_at"] else now
    return _elapsed(end - parse_iso_time(job["started_at"]))


def command_logs(options):
    """Print a job's output; with -f follow it until the job ends.

    With -f, exits with the job's own exit status (128 + N for a job ended by
    signal N), like the job itself would.
    """
    jobs = request(options.data_dir, "jobs", id=options.id)
    if len(jobs) != 1 or "attempts" not in jobs[0]:
        return print_array_logs(options, jobs)
    job = jobs[0]
    if not options.follow:
        if job["started_at"] is None and job["state"] == JobState.DONE.value:
            raise UserError(f"job {job['id']} never ran ({job['result']}), so it has no output")
        if job["started_at"] is None:
            raise UserError(f"job {job['id']} has not started yet, so it has no output; "
                            f"use ./cli.py logs -f {job['id']} to wait for it")
        copy_log(job["log"], 0, missing_ok=False)
        return 0
    return follow_log(options.data_dir, job)


def print_array_logs(options, tasks):
    """logs ARRAY: the log of each of its tasks that ran, one after another, each under
    a header (as tail prints several files)."""
    if options.follow:
        raise UserError(f"logs -f follows one job: name one task of array {options.id}, "
                        f"like {options.id}.{tasks[0]['task'] if tasks else 1}")
    started = [task for task in tasks if task["started_at"] is not None]
    if not started:
        raise UserError(f"no task of array {options.id} has started yet, so there is no "
                        "output")
    for number, task in enumerate(started):
        gap = "\n" if number else ""
        print(f"{gap}==> task {task_name(task)} (job {task['id']}, "
              f"{task['result'] or task['state']}) <==", flush=True)
        copy_log(task["log"], 0)
    return 0


def copy_log(path, offset, missing_ok=True):
    """Write the log from OFFSET to stdout; return the new offset."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            while True:
                chunk = log.read(1 << 16)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                offset += len(chunk)
    except FileNotFoundError:
        if not missing_ok:
            raise UserError(f"the log {path} is gone (purged, or deleted by hand)") from None
        return offset
    sys.stdout.buffer.flush()
    return offset


def follow_log(data_dir, job):
    """tail -f the log while the server tells us (wait) when the job ends."""
    import select
    offset = 0
    with connect(data_dir, "wait", {"ids": [job["id"]]}) as connection:
        lines = LineReader()
        while True:
            readable, _, _ = select.select([connection], [], [], 0.2)
            offset = copy_log(job["log"], offset)
            if not readable:
                continue
            chunk = connection.recv(1 << 16)
            if not chunk:
                raise LostServer(f"the server for {data_dir} went away while following job "
                                 f"{job['id']}; start it again and retry")
            for line in lines.feed(chunk):
                message = decode_reply_line(line, data_dir)
                if "ok" in message:
                    result = reply_result(message)
                    copy_log(job["log"], offset)
                    failures = result["not_succeeded"]
                    return job_exit_status(failures[0]) if failures else 0


def job_exit_status(job):
    """The status a shell would report for the job: its exit code, or 128 + signal."""
    if job["exit_code"] is not None:
        return job["exit_code"] or (0 if job["result"] == JobResult.SUCCEEDED.value else 1)
    if job["signal"] is not None:
        return 128 + job["signal"]
    return 1


def command_purge(options):
    """Delete finished jobs (and their logs) that ended longer ago than --older-than.

    Waiting and running jobs are never touched.  --older-than 0 purges every
    finished job.
    """
    older_than = parse_duration(options.older_than, "--older-than")
    result = request(options.data_dir, "purge", older_than=older_than)
    print(f"purged {result['purged']} finished job(s) and their logs")
    return 0


def command_wait(options):
    """Wait until jobs have ended; exit 0 only if every one succeeded.

    Waits for the given jobs, or for every job waiting or running when wait
    starts.  The server tells wait when jobs end (nothing polls).  On a
    terminal a progress line is redrawn in place; in a pipe or with --quiet
    only the result is printed.  Jobs that did not succeed are listed on
    stderr and the exit status is 1; 2 if the server went away meanwhile.

    With --children, run from inside a job (its script, or anything it
    started), waits for the jobs that job added: its children.
    """
    if options.children and options.ids:
        raise UserError("wait takes either job ids or --children, not both")
    job_ids = parse_job_ids(options.ids) if options.ids else None
    family = {}
    if options.children:
        parent = job_of_environment()
        if parent is None:
            raise UserError("wait --children waits for the children of the job it runs in, "
                            "but JOB_ID is not set: run it from a job's script")
        family = {"children_of": parent}
    progress = ProgressLine(sys.stderr.isatty() and not options.quiet)
    try:
        result = stream(options.data_dir, "wait", progress.show,
                        on_idle=progress.tick if progress.enabled else None, ids=job_ids,
                        **family)
    finally:
        progress.clear()
    total, failures = result["total"], sorted(result["not_succeeded"], key=lambda job: job["id"])
    if total == 0:
        print(f"nothing to wait for: job {family['children_of']} has no children" if family
              else "nothing to wait for: no job is waiting or running")
        return 0
    if not failures:
        print(f"all {total} job(s) succeeded" if total > 1 else "the job succeeded")
        return 0
    for job in failures:
        print(f"job {job['id']}: {describe_outcome(job)}", file=sys.stderr)
    raise UserError(f"{len(failures)} of {total} job(s) did not succeed: "
                    f"{', '.join(str(job['id']) for job in failures[:20])}"
                    + (" ..." if len(failures) > 20 else ""))


def describe_outcome(job):
    details = []
    if job["exit_code"] is not None:
        details.append(f"exit code {job['exit_code']}")
    if job["signal"] is not None:
        details.append(_signal_name(job["signal"]))
    if job.get("reason"):
        details.append(job["reason"])
    return job["result"] + (f" ({'; '.join(details)})" if details else "")


class ProgressLine:
    """One line on a terminal, redrawn in place at most ten times a second, and at
    least once a second so that the elapsed time moves while no job ends."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.width = 0
        self.last = None   # the server's latest progress event

    def show(self, progress):
        self.last = progress
        now = time.monotonic()
        if not self.enabled or (now - self.drawn_at < 0.1 and progress["running"]):
            return
        self.drawn_at = now
        elapsed = now - self.started
        text = (f"{progress['done']}/{progress['total']} done"
                f" ({progress['failed']} failed), {progress['running']} running, "
                f"{progress['waiting']} waiting, {_elapsed(elapsed)} elapsed")
        if progress.get("paused"):
            text += ", QUEUE PAUSED (./cli.py resume)"
        elif progress["done"] and progress["done"] < progress["total"] and elapsed > 1:
            remaining = elapsed / progress["done"] * (progress["total"] - progress["done"])
            text += f", about {_elapsed(remaining)} left"
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = len(text)

    def tick(self):
        """Redraw the latest progress with the time that has passed since."""
        if self.last is not None:
            self.show(self.last)

    def clear(self):
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def command_pause(options):
    """Stop starting jobs: on every worker, or only on the HOSTs given.

    Running jobs go on.  A paused queue or worker stays paused across restarts
    until resume.
    """
    hosts = unique_hosts(expand_hosts(options.hosts))
    result = request(options.data_dir, "pause", hosts=hosts)
    if hosts:
        print(f"paused {', '.join(hosts)}: running jobs go on, no new job starts "
              "there (resume with ./cli.py resume "
              + " ".join(map(_shell_word, options.hosts)) + ")")
    else:
        result_word = "queue paused" if result["changed"] else "the queue was already paused"
        print(f"{result_word}: running jobs go on, no new job starts (./cli.py resume)")
    return 0


def command_resume(options):
    """Start jobs again: the whole queue, or only on the HOSTs given.

    A worker set aside because jobs kept failing to reach it (see start
    --down-after) is taken back too, without waiting for a health check.
    """
    hosts = unique_hosts(expand_hosts(options.hosts))
    result = request(options.data_dir, "resume", hosts=hosts)
    if hosts:
        print(f"resumed {', '.join(hosts)}")
    else:
        print("queue resumed" if result["changed"] else "the queue was not paused")
    return 0


def command_edit_slave(options):
    """Change a worker's slots or variables without removing it.

    With fewer slots than are in use, running jobs finish and no new job
    starts there until it fits.  Variables reach jobs started from now on.
    """
    variables = dict(parse_assignment(text) for text in options.env)
    for name in options.unset:
        validate_variable_name(name)
    if options.down_after is not None and options.down_after != "default" and \
            not (plain_number(options.down_after) and int(options.down_after) <= MAX_DOWN_AFTER):
        _bad_down_after(options.down_after)
    resources = worker_resources(options, edit=True)
    if options.slots is None and not variables and not options.unset and \
            options.ssh_reuse is None and options.down_after is None and resources is None:
        raise UserError("nothing to change: give --slots, -e NAME=VALUE, --unset NAME, "
                        "--down-after K, --[no-]ssh-reuse, --gpus, --mem or --resource")
    changes = {} if options.ssh_reuse is None else {"ssh_reuse": options.ssh_reuse}
    if resources is not None:
        changes["resources"] = resources
    if options.down_after is not None:
        changes["down_after"] = None if options.down_after == "default" else \
            int(options.down_after)
    hosts = unique_hosts(expand_hosts(options.hosts))
    result = request(options.data_dir, "edit_slave", hosts=hosts, slots=options.slots,
                     variables=variables, unset=options.unset, **changes)
    for worker in result["edited"]:
        down_after = worker["down_after"]
        print(f"{worker['host']}: {worker['slots']} slot(s) ({worker['slots_in_use']} in use), "
              f"variables: {' '.join(worker['variables']) or 'none'}, "
              f"ssh reuse: {'on' if worker['ssh_reuse'] else 'off'}, set aside after "
              + (f"{down_after} failures in a row" if down_after else "no failures (off)")
              + "".join(f", {line}" for line in
                        resource_usage_lines(worker.get("resources", {}))))
    return 0


def _bad_down_after(text):
    raise UserError(f"--down-after {text!r}: give a whole number from 0 to {MAX_DOWN_AFTER}, "
                    "or 'default' for the server's")


def read_json_document(path, what):
    """(The JSON document in PATH (- for stdin), the error to give if it is too deeply
    nested to send): WHAT it should be names it in errors."""
    shown = "standard input" if path == "-" else path
    too_deep = f"{shown} is nested too deeply to be {what}"
    try:
        if path == "-":
            return json.load(sys.stdin), too_deep
        with open(path, encoding="utf-8") as document_file:
            return json.load(document_file), too_deep
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise UserError(f"{shown} is not valid JSON: {error}") from None
    except RecursionError:
        raise UserError(too_deep) from None


def command_load_status(options):
    """Replace the workers and the waiting queue with a status --json document."""
    document, too_deep = read_json_document(options.file, "a status document")
    try:
        result = request(options.data_dir, "load_status", document=document,
                         cwd=current_dir(), environment=dict(os.environ),
                         umask=current_umask())
    except RecursionError:   # json.dumps gives up a few levels before json.load does
        raise UserError(too_deep) from None
    print(f"loaded {result['workers']} worker(s) and {result['jobs']} waiting job(s)"
          + ("" if result["ids_kept"] else " (renumbered: their ids were taken)"))
    for line in service_difference_lines(result.get("services", ())):
        print(line)
    for note in result.get("notes", ()):
        print(f"note: {note}", file=sys.stderr)
    return 0


def resolve_script(script, must_run=True):
    """An absolute path: as given if that exists, else looked up on PATH."""
    if not script:
        raise UserError("empty script name: give the path of an executable job script")
    candidate = script
    if "/" not in script and not os.path.exists(script):
        import shutil
        candidate = shutil.which(script) or script
    path = os.path.abspath(candidate)
    if must_run:
        check_script(path, shown=script)
    return path


def current_dir():
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise UserError("the current directory no longer exists; cd somewhere that does") \
            from None


def resolve_dir(path):
    return os.path.abspath(os.path.expanduser(path))


###############################################################################
# Live views: top ##############################################################
###############################################################################

def command_top(options):
    """A live view of the queue in this terminal: workers, running jobs, speed, failures.

    It redraws when something happens (the server sends a snapshot after each
    change, a few times a second at most), and each second for the clocks.
    Keys: q quits; up and down select a running job; l shows the tail of its
    log (l or Esc: back); k kills it (y confirms);
    p pauses or resumes the queue; w pauses or resumes the selected job's
    worker.  Lists longer than the screen show their top and count the rest.
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("Error: top needs a terminal; for a snapshot use ./cli.py status (or "
              "status --json)", file=sys.stderr)
        return 2
    import curses
    connection = connect(options.data_dir, "watch", {})
    with connection:
        return curses.wrapper(lambda screen: TopView(screen, connection,
                                                     options.data_dir).run())


class TopView:
    """The screen of `top`: a snapshot from the server, the selection, and the keys."""

    def __init__(self, screen, connection, data_dir):
        self.screen = screen
        self.connection = connection
        self.data_dir = data_dir
        self.snapshot = None
        self.selected = None        # the id of the selected running job
        self.showing_log = False
        self.confirm_kill = None    # the job a kill waits for y to confirm
        self.message = ""
        self.lines = LineReader()

    def run(self):
        import curses
        import selectors
        curses.curs_set(0)
        self.screen.nodelay(True)
        self.screen.keypad(True)
        events = selectors.DefaultSelector()
        events.register(self.connection, selectors.EVENT_READ, "server")
        events.register(sys.stdin, selectors.EVENT_READ, "keys")
        self.draw()
        while True:
            for key, _ in events.select(1.0):
                if key.data == "server" and not self.read_server():
                    return 1
            # Keys, and a resize: curses learns of it (SIGWINCH) only inside getch.
            if not self.read_keys():
                return 0
            self.draw()

    def read_server(self):
        """Take the server's lines; False once it has gone (the view ends)."""
        chunk = self.connection.recv(1 << 20)
        if not chunk:
            raise LostServer(f"the server for {self.data_dir} went away (stopped or crashed)")
        for line in self.lines.feed(chunk):
            message = decode_reply_line(line, self.data_dir)
            if message.get("event") == "live":
                self.snapshot = message
            elif "ok" in message:
                reply_result(message)   # raises the server's error (it is stopping)
                return False
        return True

    def read_keys(self):
        """Act on the keys pressed; False on q."""
        import curses
        while True:
            key = self.screen.getch()
            if key == -1:
                return True
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
                # What curses thinks is on the screen is not what the terminal kept.
                self.screen.clear()
                continue
            character = chr(key) if 0 <= key < 256 else ""
            if self.confirm_kill is not None:
                self.answer_kill(character)
            elif character == "q":
                return False
            elif key in (curses.KEY_UP, curses.KEY_DOWN):
                self.move_selection(-1 if key == curses.KEY_UP else 1)
            elif character == "l" or key == 27 and self.showing_log:
                self.showing_log = not self.showing_log and self.selected is not None
            elif character == "k" and self.selected is not None:
                self.confirm_kill = self.selected
                self.message = f"kill job {self.selected}? y: yes, any other key: no"
            elif character == "p":
                self.act("resume" if self.snapshot and self.snapshot["paused"] else "pause",
                         hosts=[])
            elif character == "w":
                self.toggle_worker()

    def running(self):
        return self.snapshot["running"] if self.snapshot else []

    def move_selection(self, step):
        ids = [job["id"] for job in self.running()]
        if not ids:
            return
        index = ids.index(self.selected) + step if self.selected in ids else 0
        self.selected = ids[max(0, min(len(ids) - 1, index))]

    def answer_kill(self, character):
        job_id, self.confirm_kill = self.confirm_kill, None
        if character in ("y", "Y"):
            self.act("kill", ids=[job_id], grace=DEFAULT_KILL_GRACE)
            self.message = f"job {job_id}: kill sent" if not self.message else self.message
        else:
            self.message = f"job {job_id} not killed"

    def toggle_worker(self):
        job = next((job for job in self.running() if job["id"] == self.selected), None)
        if job is None:
            self.message = "select a running job first (up, down): w pauses its worker"
            return
        worker = next((worker for worker in self.snapshot["workers"]
                       if worker["ip"] == job["worker"]), None)
        paused = worker is not None and worker["state"] == WorkerState.PAUSED.value
        self.act("resume" if paused else "pause", hosts=[job["worker"]])

    def act(self, command, **params):
        """Send a request as the command line would; its error is shown, not raised."""
        try:
            request(self.data_dir, command, **params)
            self.message = ""
        except UserError as error:
            self.message = str(error)

    # --- drawing --------------------------------------------------------------

    def draw(self):
        import curses
        self.screen.erase()
        height, width = self.screen.getmaxyx()
        rows = self.log_rows(height) if self.showing_log else self.main_rows(height)
        footer = self.message or ("l or Esc: back" if self.showing_log else
                                  "q quit  up/down select  l log  k kill  p pause queue  "
                                  "w pause worker")
        for number, (text, attribute) in enumerate(rows[:height - 1]):
            self.put(number, text, attribute, width)
        self.put(height - 1, footer, curses.A_REVERSE, width)
        self.screen.refresh()

    def put(self, row, text, attribute, width):
        import curses
        try:
            self.screen.addnstr(row, 0, text.ljust(width), width, attribute)
        except curses.error:
            pass   # the bottom right corner, or a screen smaller than we thought

    def main_rows(self, height):
        import curses
        snapshot = self.snapshot
        if snapshot is None:
            return [("waiting for the server's first snapshot...", curses.A_NORMAL)]
        now = time.time()
        counts = snapshot["counts"]
        rows = [("cli.py top  " + ("QUEUE PAUSED (p resumes)  " if snapshot["paused"] else "")
                 + snapshot["server"]["data_dir"], curses.A_BOLD),
                (top_counts_line(snapshot), curses.A_NORMAL)]
        # Room: workers get up to a third, failures up to 4 lines, running the rest.
        room = height - 1 - len(rows) - 3
        failures = snapshot["failures"][:max(0, min(4, room // 4))]
        workers = snapshot["workers"]
        shown_workers = workers[:max(1, room // 3)] if workers else []
        rows.append((f"Workers ({len(workers)})", curses.A_BOLD))
        rows += [(top_worker_line(worker), curses.A_NORMAL) for worker in shown_workers]
        if not workers:
            rows.append(("  none: add one with ./cli.py add_slave HOST", curses.A_NORMAL))
        elif len(workers) > len(shown_workers):
            rows.append((f"  ... and {len(workers) - len(shown_workers)} more", curses.A_DIM))
        running = snapshot["running"]
        left = height - 1 - len(rows) - 1 - (len(failures) + 1 if failures else 0)
        rows.append((f"Running ({counts.get('running', 0)})", curses.A_BOLD))
        if self.selected not in [job["id"] for job in running]:
            self.selected = running[0]["id"] if running else None
        shown = top_window(running, self.selected, max(1, left - 1))
        for job in shown:
            rows.append((top_job_line(job, now),
                         curses.A_REVERSE if job["id"] == self.selected else curses.A_NORMAL))
        hidden = counts.get("running", 0) - len(shown)
        if hidden > 0:
            rows.append((f"  ... and {hidden} more", curses.A_DIM))
        if failures:
            rows.append(("Latest failures", curses.A_BOLD))
            rows += [(f"  {job['id']:>6}  {job['result']:<9} {_exit_text(job):<8} "
                      f"{_local_time(job['ended_at'])}  {_command_line(job, 40)}",
                      curses.A_NORMAL) for job in failures]
        return rows

    def log_rows(self, height):
        import curses
        job = next((job for job in self.running() if job["id"] == self.selected), None)
        if job is None:
            self.showing_log = False
            return self.main_rows(height)
        lines = log_tail(job["log"], height - 2)
        return [(f"job {job['id']} on {job['worker']}: {job['log']}", curses.A_BOLD)] + \
            [(line, curses.A_NORMAL) for line in lines]


def top_counts_line(snapshot):
    counts = snapshot["counts"]
    text = ", ".join(f"{counts.get(name, 0)} {name}" for name in
                     ("waiting", "running", "succeeded", "failed")) + \
        "".join(f", {counts[name]} {name}" for name in ("killed", "timed_out", "skipped")
                if counts.get(name))
    text += f" | {snapshot['ends_per_minute']:g} ends/min"
    if snapshot["seconds_left"] is not None and counts.get("waiting"):
        text += f", ~{_duration_text(snapshot['seconds_left'])} left"
    return text


def top_worker_line(worker):
    used, slots = len(worker["used"]), worker["slots"]
    width = min(slots, 20)
    filled = round(used * width / slots) if slots else 0
    bar = "#" * filled + "." * (width - filled)
    gpus = worker.get("resources", {}).get("gpus")
    return f"  {worker['ip']:<20.20} [{bar}] {used}/{slots}" + \
        (f" gpus {gpus['used']:g}/{gpus['total']}" if gpus else "") + \
        f"  {worker['status']}" + \
        (f" ({worker['check_reason']})" if worker["health"] != "up" and
         worker["check_reason"] else "")


def top_job_line(job, now):
    where = f"{job['worker']}:{job['slot']}"
    ran = _elapsed(now - parse_iso_time(job["started_at"])) if job["started_at"] else "-"
    return f"  {job['id']:>6}  {where:<14.14} {ran:>9}  {_command_line(job, 200)}"


def top_window(jobs, selected, size):
    """The SIZE jobs of JOBS to show: the first ones, or a window that holds SELECTED."""
    ids = [job["id"] for job in jobs]
    index = ids.index(selected) if selected in ids else 0
    first = max(0, index - size + 1)
    return jobs[first:first + size]


def log_tail(path, count):
    """The last COUNT lines of the log at PATH (its last 64 kB), as text."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 65536))
            text = log.read().decode(errors="replace")
    except OSError as error:
        return [f"(no log yet: {error.strerror})"]
    return text.splitlines()[-count:] if count > 0 else []


###############################################################################
# Live views: the dashboard ####################################################
###############################################################################

# The dashboard's web server is a helper process of the server's (cli.py
# _dashboard; the server's side is Dashboard) and a client of it like any
# command: the live pages share one `watch` connection (LiveFeed), and each
# action is the request the command line sends.  http.server is imported here
# only, by that process.

def command_dashboard(options):
    """Serve a live web page of the queue: workers, jobs, charts, and actions.

    The server starts a web server of its own (a helper process) on
    127.0.0.1:8750, or where --listen says, and brings it back at each start
    until `dashboard --stop`.  This prints its URL with the token that every
    request needs (kept owner-only in DATA_DIR/dashboard.token); the page moves
    the token into a cookie.  From another machine, forward the port: ssh -L
    8750:127.0.0.1:8750 HOST, then open the URL there.  The page pauses and
    resumes the queue and workers, kills (after a confirmation) and retries
    jobs, and scales services, through the same requests as the commands.
    /metrics serves Prometheus's text format.  Each call gives the whole
    setting: what it leaves out is the default (loopback, /metrics closed).
    """
    if options.stop:
        reply = request(options.data_dir, "dashboard", stop=True)
        print("dashboard stopped; its token is deleted" if reply["was_on"]
              else "the dashboard was not on")
        return 0
    reply = request(options.data_dir, "dashboard", listen=options.listen,
                    metrics_open=options.metrics_open)
    if not reply["loopback"]:
        print(f"Warning: the dashboard listens on {reply['listen']}, where other machines may "
              "reach it: whoever has its token can pause, kill and retry jobs, and plain HTTP "
              "carries the token unencrypted; prefer 127.0.0.1 with ssh -L", file=sys.stderr)
    if reply["metrics_open"]:
        print(f"{reply['url']}metrics answers anyone, without the token (--metrics-open)",
              file=sys.stderr)
    print(f"{reply['url']}?token={reply['token']}")
    return 0


def listen_argument(text):
    """argparse type for dashboard --listen."""
    try:
        return listen_text(*parse_listen_address(text))
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


DASHBOARD_ACTIONS = ("pause", "resume", "kill", "retry", "scale")
# What a job's page shows of a job: where it is and what it runs, never its
# environment or its -e variables.
DASHBOARD_JOB_FIELDS = LIVE_JOB_FIELDS + (
    "attempts", "children", "parent", "after", "after_any", "retries", "timeout",
    "not_before", "slots_wanted", "on", "prefer", "exclude", "hooks")
SECURITY_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                    ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"))


# The whole page: one HTML document for the live view (/) and a job's page
# (/job/ID), with its style and script inline (no network needed beyond the
# dashboard itself).  The script builds the tables from the snapshots (/events)
# and draws the charts as SVG; it escapes every value it shows (h).
DASHBOARD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>cli.py dashboard</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f4f4f2}
header{position:sticky;top:0;z-index:1;background:#263238;color:#eee;padding:8px 16px;
 display:flex;gap:14px;align-items:center;flex-wrap:wrap}
header a{color:#eee}main{padding:4px 16px 16px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px 12px}
section:empty{display:none}h2{font-size:15px;margin:2px 0 6px}
main>section{content-visibility:auto;contain-intrinsic-size:auto 300px}
table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:2px 8px;border-bottom:1px solid #eee;white-space:nowrap;
 vertical-align:top}
th{font-weight:600;color:#555}td.cmd{white-space:normal;word-break:break-all;
 font:12px ui-monospace,monospace}
button{font:inherit;padding:0 8px;cursor:pointer}button.danger{color:#b00020}
input{width:5em}.paused{background:#ffd54f;color:#222;padding:1px 8px;border-radius:4px}
.bad{color:#b00020}.good{color:#2e7d32}.dim{color:#777}
.charts{display:flex;gap:24px;flex-wrap:wrap}.charts figure{margin:0}
figcaption{font-size:12px;color:#555}svg text{font-size:10px;fill:#555}
pre{background:#111;color:#ddd;padding:8px;max-height:65vh;overflow:auto;white-space:pre-wrap;
 word-break:break-all;margin:0}
#message{color:#ffcc80}
</style></head>
<body><header><b>cli.py</b><span id="where"></span><span id="summary"></span>
<span id="message" role="status"></span></header><main id="main">connecting...</main>
<script>
"use strict";
// 25 rows a list: a redraw beside a busy server stays cheap (layout and paint grow
// with the rows).
const SHOWN = 25, $ = id => document.getElementById(id);
const h = v => String(v ?? "").replace(/[&<>"']/g,
  c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
let snap = null, fresh = false, skew = 0, queued = false, confirming = null, jobId = null;
const pages = {running: 0, waiting: 0, done: 0}, paged = {}, drawn = {};

function say(text) { $("message").textContent = text || ""; }
function post(action, body) {
  say(action + "...");
  return fetch("/api/" + action, {method: "POST", body: JSON.stringify(body),
                                  headers: {"Content-Type": "application/json"}})
    .then(r => r.json()).then(r => { say(r.ok ? "" : r.error); if (jobId) loadJob(); })
    .catch(e => say(String(e)));
}
function seconds(t) { return t ? (Date.now() + skew - Date.parse(t)) / 1000 : null; }
function span(s) {
  if (s == null) return "-";
  s = Math.max(0, Math.round(s));
  return s < 60 ? s + "s" : s < 3600 ? Math.floor(s / 60) + "m " + s % 60 + "s"
    : Math.floor(s / 3600) + "h " + Math.floor(s % 3600 / 60) + "m";
}
function command(j) { return [j.script.split("/").pop()].concat(j.args || []).join(" "); }
function link(j) { return `<a href="/job/${j.id}">${j.id}</a>`; }
function ended(j) {
  const how = j.exit_code != null ? "exit " + j.exit_code : j.signal != null ? "signal " + j.signal : "";
  return `<span class="${j.result === "succeeded" ? "good" : "bad"}">${h(j.result)}</span> ${h(how)}`;
}
function killButton(j) {
  return confirming === j.id
    ? `<button class="danger" data-act="kill-yes" data-id="${j.id}">kill job ${j.id}?</button>` +
      ` <button data-act="kill-no">no</button>`
    : `<button class="danger" data-act="kill" data-id="${j.id}">kill</button>`;
}
function table(heads, rows) {
  return `<table><tr>${heads.map(x => `<th>${x}</th>`).join("")}</tr>` +
    rows.map(r => `<tr>${r.join("")}</tr>`).join("") + "</table>";
}
const td = (x, cls) => `<td${cls ? ` class="${cls}"` : ""}>${x}</td>`;

// --- the live view -----------------------------------------------------------
function live() {
  $("main").innerHTML = ["charts", "workers", "services", "running", "waiting", "ends"]
    .map(id => `<section id="${id}"></section>`).join("");
  const events = new EventSource("/events");
  events.addEventListener("live", e => {
    const first = !snap;
    snap = JSON.parse(e.data); skew = Date.parse(snap.now) - Date.now(); say("");
    if (first) draw(); else fresh = true;
  });
  events.addEventListener("lost", e => say("lost the server: " + JSON.parse(e.data).error));
  events.onerror = () => say("lost the dashboard's web server; trying again...");
  // Drawn once a second at most (snapshots come up to 5 times), and only the clocks
  // when nothing else changed: a browser beside the server must cost it little.
  setInterval(() => { if (document.hidden) return; if (fresh) draw(); else tick(); }, 1000);
}
function tick() {
  for (const cell of document.querySelectorAll("[data-since]"))
    cell.textContent = span(seconds(cell.dataset.since)) + (cell.dataset.ago ? " ago" : "");
}
function draw() {
  if (queued) return;
  queued = true;
  requestAnimationFrame(() => { queued = false; fresh = false; if (snap) { render(); tick(); } });
}
function put(id, html) {
  const section = $(id);
  // A field being typed into is left alone until it is left.
  if (drawn[id] === html || section.contains(document.activeElement) &&
      document.activeElement.tagName === "INPUT") return;
  drawn[id] = html; section.innerHTML = html;
}
function render() {
  const c = snap.counts, done = Object.keys(c).filter(k => k !== "waiting" && k !== "running");
  $("where").textContent = snap.server.data_dir;
  const left = snap.seconds_left != null && c.waiting ? `, about ${span(snap.seconds_left)} left` : "";
  $("summary").innerHTML = ["waiting", "running", ...done].map(k => `${c[k] || 0} ${k}`).join(", ") +
    ` | ${snap.ends_per_minute} ended/min${left} ` +
    (snap.paused ? '<span class="paused">QUEUE PAUSED</span> ' : "") +
    `<button id="queue" data-act="${snap.paused ? "resume" : "pause"}">` +
    `${snap.paused ? "resume" : "pause"} queue</button>`;
  put("charts", charts());
  put("workers", workers());
  put("services", services());
  put("running", list("running", "Running", ["job", "worker:slot", "for", "attempt", "command", ""],
    j => [td(link(j)), td(h(j.parts ? j.parts.map(p => p[0] + ":" + p[1].join("+")).join(" ")
                                     : j.worker + ":" + j.slot)),
          `<td data-since="${h(j.started_at)}"></td>`, td(j.attempt), td(h(command(j)), "cmd"), td(killButton(j))]));
  put("waiting", list("waiting", "Waiting", ["job", "priority", "waiting for", "command", ""],
    j => [td(link(j)), td(j.priority), td(h(j.waiting_for || "")), td(h(command(j)), "cmd"),
          td(killButton(j))]));
  put("ends", list("done", "Ended", ["job", "how", "ended", "worker", "command", ""],
    j => [td(link(j)), td(ended(j)), `<td data-since="${h(j.ended_at)}" data-ago="1"></td>`,
          td(h(j.worker || "-")),
          td(h(command(j)), "cmd"),
          td(j.result !== "succeeded" ? `<button data-act="retry" data-id="${j.id}">retry</button>` : "")]));
}
function workers() {
  const rows = snap.workers.map(w => {
    const used = w.used.length, width = w.slots ? Math.round(120 * used / w.slots) : 0;
    const bar = `<svg width="120" height="12"><rect width="120" height="12" fill="#e0e0e0"/>` +
      `<rect width="${width}" height="12" fill="#42a5f5"/></svg>`;
    const paused = w.state === "paused";
    return [td(h(w.ip)), td(bar + ` ${used}/${w.slots}`), td(h(w.status)),
            td(`<span class="${w.health === "up" ? "good" : "bad"}">${h(w.health)}</span> ` +
               h(w.health !== "up" && w.check_reason || "")),
            td(`<button data-act="${paused ? "resume" : "pause"}-worker" data-worker="${h(w.ip)}">` +
               `${paused ? "resume" : "pause"}</button>`)];
  });
  return `<h2>Workers (${rows.length})</h2>` + (rows.length ? table(["worker", "slots", "status",
    "health", ""], rows) : '<span class="dim">none: add one with ./cli.py add_slave HOST</span>');
}
function services() {
  if (!snap.services.length) return "";
  return `<h2>Services (${snap.services.length})</h2>` + table(
    ["service", "desired", "running", "healthy", "restarts", "last end", "scale to"],
    snap.services.map(s => [td(h(s.name) + (s.enabled ? "" : ' <span class="dim">(stopped)</span>')),
      td(s.replicas), td(s.running), td(s.healthy), td(s.restarts), td(h(s.last_end || "-")),
      td(`<input type="number" min="0" value="${s.replicas}" id="scale-${h(s.name)}">` +
         ` <button data-act="scale" data-service="${h(s.name)}">scale</button>`)]));
}
// Lists show SHOWN jobs a page: the first pages are the snapshot's (its first 100),
// deeper ones come from the jobs request (running and waiting ones on by id from
// where the snapshot ends; ended ones newest first, after the latest ends).
function list(kind, title, heads, row) {
  const c = snap.counts, total = kind === "done"
    ? Object.keys(c).filter(k => k !== "waiting" && k !== "running").reduce((n, k) => n + c[k], 0)
    : c[kind] || 0;
  const page = pages[kind], live = kind === "done" ? snap.recent.concat(snap.failures.filter(
    f => !snap.recent.some(r => r.id === f.id))) : snap[kind];
  const jobs = fromSnapshot(kind, page, live, total) ? live.slice(page * SHOWN, (page + 1) * SHOWN)
    : paged[kind] || [];
  const count = Math.max(1, Math.ceil(total / SHOWN) + (kind === "done" ? 1 : 0));
  const pager = count > 1 ? ` <button data-act="page" data-list="${kind}" data-step="-1"` +
    `${page ? "" : " disabled"}>&lt;</button> page ${page + 1} of ${count} ` +
    `<button data-act="page" data-list="${kind}" data-step="1"${page + 1 < count ? "" : " disabled"}` +
    `>&gt;</button>` : "";
  const note = kind === "done" && page === 0 ? ' <span class="dim">(latest ends and failures)</span>' : "";
  return `<h2>${title} (${total})${pager}${note}</h2>` +
    (jobs.length ? table(heads, jobs.map(row)) : '<span class="dim">none</span>');
}
function fromSnapshot(kind, page, live, total) {
  return kind === "done" ? page === 0 : (page + 1) * SHOWN <= live.length || live.length >= total;
}
function loadPage(kind) {
  const page = pages[kind], c = snap.counts;
  const total = kind === "done" ? 0 : c[kind] || 0;
  if (fromSnapshot(kind, page, kind === "done" ? [] : snap[kind], total)) {
    paged[kind] = null; return draw();
  }
  let query;
  if (kind === "done") query = `state=done&last=${SHOWN}&offset=${(page - 1) * SHOWN}`;
  else {
    const first = page * SHOWN, count = Math.min(SHOWN, total - first);
    query = `state=${kind}&last=${count}&offset=${total - first - count}`;
  }
  fetch("/api/jobs?" + query).then(r => r.json()).then(r => {
    if (!r.ok) return say(r.error);
    paged[kind] = kind === "done" ? r.result.reverse() : r.result; draw();
  });
}
function charts() {
  const a = snap.activity;
  return `<h2>Activity since ${new Date(Date.parse(a.since)).toLocaleString()}: ` +
    `${a.starts} started, ${a.ends} ended</h2><div class="charts">` +
    `<figure>${perMinute(a.per_minute)}<figcaption>starts (blue) and ends (green) ` +
    `per minute, last hour</figcaption></figure>` +
    `<figure>${histogram(a.waits)}<figcaption>queue wait: starts by how long they waited, up ` +
    `to each bound</figcaption></figure>` +
    `<figure>${histogram(a.latency)}<figcaption>scheduling latency: from room for a job to ` +
    `its start</figcaption></figure></div>`;
}
function perMinute(minutes) {
  const W = 300, H = 90, top = Math.max(1, ...minutes.map(m => Math.max(m[1], m[2])));
  const line = (k, color) => `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="` +
    minutes.map((m, i) => `${(i * W / 59).toFixed(1)},${(H - m[k] * H / top).toFixed(1)}`).join(" ") + '"/>';
  return `<svg width="${W + 40}" height="${H + 14}"><g transform="translate(36,2)">` +
    `<line x1="0" y1="${H}" x2="${W}" y2="${H}" stroke="#ccc"/>` + line(1, "#1e88e5") + line(2, "#43a047") +
    `<text x="-4" y="8" text-anchor="end">${top}</text><text x="-4" y="${H}" text-anchor="end">0</text>` +
    `<text x="0" y="${H + 11}">-60m</text><text x="${W}" y="${H + 11}" text-anchor="end">now</text></g></svg>`;
}
function histogram(histo) {
  const label = b => b < 1 ? b * 1000 + "ms" : b < 60 ? b + "s" : b < 3600 ? b / 60 + "m"
    : b < 86400 ? b / 3600 + "h" : b / 86400 + "d";
  const names = histo.bounds.map(label).concat(["&gt;" + label(histo.bounds.at(-1))]);
  const W = 38, H = 70, top = Math.max(1, ...histo.counts);
  return `<svg width="${names.length * W}" height="${H + 26}">` + histo.counts.map((n, i) => {
    const height = n * H / top;
    return `<rect x="${i * W + 3}" y="${H - height + 12}" width="${W - 6}" height="${height}" fill="#8e24aa"/>` +
      `<text x="${i * W + W / 2}" y="${H - height + 10}" text-anchor="middle">${n || ""}</text>` +
      `<text x="${i * W + W / 2}" y="${H + 24}" text-anchor="middle">${names[i]}</text>`;
  }).join("") + "</svg>";
}

// --- a job's page --------------------------------------------------------------
function jobPage(id) {
  jobId = id;
  $("main").innerHTML = '<p><a href="/">&larr; the queue</a></p><section id="job"></section>' +
    '<section id="attempts"></section><section><h2>Log <span id="follow" class="dim"></span></h2>' +
    '<pre id="log"></pre></section>';
  loadJob();
  const log = $("log"), events = new EventSource(`/job/${id}/log`);
  $("follow").textContent = "(following)";
  events.addEventListener("log", e => {
    const bottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = (log.textContent + JSON.parse(e.data)).slice(-1000000);
    if (bottom) log.scrollTop = log.scrollHeight;
  });
  events.addEventListener("end", () => {
    events.close(); $("follow").textContent = "(the job has ended)"; loadJob();
  });
}
function loadJob() {
  fetch(`/api/job/${jobId}`).then(r => r.json()).then(r => {
    if (!r.ok) return say(r.error);
    const j = r.result, where = j.worker ? `${j.worker}:${(j.slots || [j.slot]).join("+")}` : "-";
    $("where").textContent = `job ${j.id}`;
    const action = j.state === "done"
      ? (j.result !== "succeeded" ? `<button data-act="retry" data-id="${j.id}">retry</button>` : "")
      : killButton(j);
    put("job", `<h2>Job ${j.id}: ${j.state === "done" ? ended(j) : h(j.state)} ${action}</h2>` +
      table(["", ""], [["command", h([j.script].concat(j.args).join(" "))], ["directory", h(j.cwd)],
        ["worker", h(where)], ["attempt", j.attempt], ["submitted", h(j.submitted_at)],
        ["started", h(j.started_at || "-")], ["ended", h(j.ended_at || "-")],
        ["reason", h(j.reason || "-")], ["log", h(j.log)]].map(r => [td(r[0]), td(r[1], "cmd")])));
    put("attempts", `<h2>Attempts (${j.attempts.length} ended)</h2>` + (j.attempts.length ? table(
      ["attempt", "worker", "how", "started", "ended", "reason"],
      j.attempts.map(t => [td(t.attempt), td(h(t.worker || "-")), td(ended(t)),
        td(h(t.started_at || "-")), td(h(t.ended_at || "-")), td(h(t.reason || ""), "cmd")]))
      : '<span class="dim">none yet</span>'));
  });
}

document.addEventListener("click", e => {
  const b = e.target.closest("button[data-act]");
  if (!b) return;
  const act = b.dataset.act, id = Number(b.dataset.id);
  if (act === "pause" || act === "resume") post(act, {});
  else if (act.endsWith("-worker")) post(act.split("-")[0], {worker: b.dataset.worker});
  else if (act === "kill") confirming = id;
  else if (act === "kill-yes") { confirming = null; post("kill", {id: id}); }
  else if (act === "kill-no") confirming = null;
  else if (act === "retry") post("retry", {id: id});
  else if (act === "scale")
    post("scale", {service: b.dataset.service,
                   replicas: Number($("scale-" + b.dataset.service).value)});
  else if (act === "page") { pages[b.dataset.list] += Number(b.dataset.step); loadPage(b.dataset.list); }
  if (jobId) loadJob(); else draw();
});
const route = location.pathname.match(/^\\/job\\/([0-9]+)$/);
if (route) jobPage(route[1]); else live();
</script></body></html>
"""


def dashboard_main():
    """The dashboard's web server (cli.py _dashboard), a process of the server's own so
    that no page ever holds up its loop.  It reads its settings as one JSON line on
    stdin ({"listen_fd", "listen", "token", "metrics_open", "data_dir"}; the socket
    is the server's, open here) and serves HTTP on it, a thread per connection.
    EOF on stdin (the server is gone) ends it."""
    import http.server
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # (^C of a foreground server: it decides)
    settings = json.loads(sys.stdin.buffer.readline() or b"null")
    if not settings:
        return   # the server went before it said anything
    site = DashboardSite(settings)

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "cli.py-dashboard"
        sys_version = ""
        timeout = 60   # seconds: a connection that sends nothing (or reads nothing) ends

        def do_GET(self):
            site.serve(self, "GET")

        def do_POST(self):
            site.serve(self, "POST")

        def log_message(self, format, *args):
            pass   # a request line may carry ?token=: none goes to server.log

    listener = socket.socket(fileno=settings["listen_fd"])
    web = http.server.ThreadingHTTPServer(listener.getsockname()[:2], Handler,
                                          bind_and_activate=False)
    web.socket.close()
    web.socket = listener

    def end_with_the_server():
        while os.read(0, 4096):
            pass
        os._exit(0)
    threading.Thread(target=end_with_the_server, daemon=True).start()
    web.serve_forever(poll_interval=None)   # (None: it sleeps until a browser connects)


class LiveFeed:
    """The server's live snapshots for the dashboard's pages: one `watch` connection
    while any page (or /metrics) reads, however many there are, and the latest
    line.  A reader takes the newest line and skips those it was too slow for."""

    def __init__(self, data_dir):
        import threading
        self.data_dir = data_dir
        self.changed = threading.Condition()
        self.line = None          # the latest: a snapshot's JSON line, or a "lost" event's
        self.number = 0           # lines so far
        self.readers = 0
        self.connection = None    # the watch, while one is open
        self.thread = None

    def join(self):
        import threading
        with self.changed:
            self.readers += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self.watch, daemon=True)
                self.thread.start()

    def leave(self):
        with self.changed:
            self.readers -= 1
            if self.readers == 0 and self.connection is not None:
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)   # wakes the watch: it ends
                except OSError:
                    pass   # it has ended already

    def next(self, seen, timeout):
        """(number, line) of the newest line after line number SEEN; SEEN's again
        after TIMEOUT seconds without one."""
        with self.changed:
            self.changed.wait_for(lambda: self.number != seen and self.line is not None,
                                  timeout)
            return (self.number, self.line) if self.line is not None else (seen, None)

    def publish(self, line):
        with self.changed:
            self.line = line
            self.number += 1
            self.changed.notify_all()

    def watch(self):
        while True:
            with self.changed:
                if self.readers == 0:
                    self.thread, self.line = None, None
                    return
            try:
                why = self.follow(connect(self.data_dir, "watch",
                                          {"interval": DASHBOARD_SNAPSHOTS}))
            except (UserError, OSError) as error:
                why = str(error)
            with self.changed:
                if self.readers == 0:
                    continue
            self.publish(json.dumps({"event": "lost", "error": why}).encode())
            time.sleep(1.0)   # the server may be starting again: ask once a second

    def follow(self, connection):
        """Publish what CONNECTION (a watch) sends until it ends; why it ended."""
        with connection:
            with self.changed:
                if self.readers == 0:
                    return None
                self.connection = connection
            try:
                lines = LineReader()
                while True:
                    chunk = connection.recv(1 << 20)
                    if not chunk:
                        return f"the server for {self.data_dir} went away"
                    for line in lines.feed(chunk):
                        if line.startswith(b'{"ok"'):   # the last line: the server stops
                            return json.loads(line).get("error")
                        self.publish(line)
            finally:
                with self.changed:
                    self.connection = None


class DashboardSite:
    """What the dashboard serves, and to whom: the token (from ?token= once, then a
    cookie; or an Authorization: Bearer header) for everything, and the page's own
    origin for actions."""

    def __init__(self, settings):
        self.data_dir = settings["data_dir"]
        self.token = settings["token"]
        self.metrics_open = settings["metrics_open"]
        # Cookies ignore ports: two queues' dashboards on one host need two names.
        self.cookie = f"cli_py_dashboard_{settings['listen'].rsplit(':', 1)[1]}"
        self.feed = LiveFeed(self.data_dir)
        self.page = DASHBOARD_PAGE.encode()
        self.page_policy = content_policy(DASHBOARD_PAGE)

    def serve(self, handler, method):
        import urllib.parse
        path, _, query = handler.path.partition("?")
        params = urllib.parse.parse_qs(query)
        try:
            refusal = self.refusal(handler, method, path, params)
            if refusal is not None:
                self.send_text(handler, *refusal)
            elif method == "POST":
                self.act(handler, path)
            else:
                self.get(handler, path, params)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the browser went away
        except Exception:   # noqa: BLE001 - a bug: logged (stderr is server.log), answered 500
            import traceback
            traceback.print_exc()
            try:
                self.send_text(handler, 500, "internal error: see the server's server.log")
            except OSError:
                pass

    def get(self, handler, path, params):
        page = path == "/" or re.fullmatch(r"/job/[0-9]{1,19}", path)
        job_path = re.fullmatch(r"/(?:api/job|job)/([0-9]{1,19})(/log)?", path)
        if page and "token" in params:
            # The token leaves the address bar (and the history) for a cookie that no
            # script reads (HttpOnly) and no other site's request carries (Strict).
            handler.send_response(303)
            handler.send_header("Location", path)
            handler.send_header("Set-Cookie", f"{self.cookie}={self.token}; HttpOnly; "
                                "SameSite=Strict; Path=/; "
                                f"Max-Age={DASHBOARD_COOKIE_DAYS * 86400}")
            self.end_headers(handler, b"")
        elif page:
            self.send(handler, 200, "text/html; charset=utf-8", self.page,
                      (("Content-Security-Policy", self.page_policy),))
        elif path == "/events":
            self.send_events(handler)
        elif path == "/metrics":
            self.send_metrics(handler)
        elif path == "/api/jobs":
            self.send_reply(handler, lambda: [dashboard_job(job) for job in request(
                self.data_dir, "jobs", **jobs_page(params))])
        elif job_path and path.startswith("/api/"):
            # An int: job N itself, even where N is also an array's id.
            self.send_reply(handler, lambda: dashboard_job(
                request(self.data_dir, "jobs", id=int(job_path[1]))[0]))
        elif job_path and job_path[2]:
            self.send_log(handler, job_path[1])
        else:
            self.send_text(handler, 404, f"no page {path} here")

    # --- who may ask ----------------------------------------------------------

    def refusal(self, handler, method, path, params):
        """(status, why) if the request may not be served; None if it may."""
        import hmac
        if method == "GET" and path == "/metrics" and self.metrics_open:
            return None
        given = self.credential(handler, params if method == "GET" else {})
        if given is None:
            return 401, ("this dashboard needs its token: open the URL that ./cli.py "
                         "dashboard printed")
        if not hmac.compare_digest(given.encode(errors="surrogateescape"),
                                   self.token.encode()):
            return 403, ("wrong token (the dashboard was turned off and on again?): open "
                         "the URL that ./cli.py dashboard prints")
        if method == "POST":
            # The cookie is SameSite=Strict already; the origin is checked all the same.
            if handler.headers.get("Origin") != f"http://{handler.headers.get('Host')}":
                return 403, "refused: actions come from the dashboard's own page only (Origin)"
            if handler.headers.get_content_type() != "application/json":
                return 415, "an action is a JSON object (Content-Type: application/json)"
        return None

    def credential(self, handler, params):
        """The token the request gives: ?token= (GET only), Authorization: Bearer, or
        the cookie; None if none."""
        import http.cookies
        if params.get("token"):
            return params["token"][0]
        authorization = handler.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            return authorization[len("Bearer "):].strip()
        cookies = http.cookies.SimpleCookie()
        try:
            cookies.load(handler.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return None
        return cookies[self.cookie].value if self.cookie in cookies else None

    # --- actions --------------------------------------------------------------

    def act(self, handler, path):
        """POST /api/ACTION with a JSON object: the request the command line sends for
        it, checked by the server as the command line's is."""
        action = path[len("/api/"):] if path.startswith("/api/") else None
        if action not in DASHBOARD_ACTIONS:
            self.send_text(handler, 404, f"no action {path} here")
            return
        try:
            length = int(handler.headers.get("Content-Length") or 0)
            posted = json.loads(handler.rfile.read(length)) if 0 < length <= 4096 else None
        except ValueError:
            posted = None
        if not isinstance(posted, dict):
            self.send_text(handler, 400, "an action is a JSON object of at most 4 kB")
            return
        command, params = action_request(action, posted)
        self.send_reply(handler, lambda: request(self.data_dir, command, **params))

    # --- replies ----------------------------------------------------------------

    def send_reply(self, handler, make):
        """MAKE's result as {"ok": true, "result"}, or the server's refusal as {"ok":
        false, "error"}: the message the command line would print."""
        try:
            status, reply = 200, {"ok": True, "result": make()}
        except LostServer as error:
            status, reply = 503, {"ok": False, "error": str(error)}
        except UserError as error:
            status, reply = 400, {"ok": False, "error": str(error)}
        self.send(handler, status, "application/json", json.dumps(reply).encode())

    def send_text(self, handler, status, text):
        headers = (("WWW-Authenticate", 'Bearer realm="cli.py dashboard"'),) \
            if status == 401 else ()
        self.send(handler, status, "text/plain; charset=utf-8", f"{status}: {text}\n".encode(),
                  headers)

    def send(self, handler, status, content_type, body, headers=()):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        for name, value in headers:
            handler.send_header(name, value)
        self.end_headers(handler, body)

    def end_headers(self, handler, body):
        for name, value in SECURITY_HEADERS:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start_stream(self, handler):
        """Server-Sent Events: the response stays open; the browser reconnects by itself."""
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        for name, value in SECURITY_HEADERS:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(b"retry: 2000\n\n")

    # --- live data ------------------------------------------------------------

    def send_events(self, handler):
        """/events: each snapshot of the queue as it comes (a "live" event), or why
        there is none (a "lost" event)."""
        self.start_stream(handler)
        self.feed.join()
        try:
            seen = 0
            while True:
                number, line = self.feed.next(seen, DASHBOARD_KEEPALIVE)
                if number == seen:
                    handler.wfile.write(b": still here\n\n")   # a closed tab shows here
                    continue
                seen = number
                kind = b"lost" if line.startswith(b'{"event": "lost"') else b"live"
                handler.wfile.write(b"event: " + kind + b"\ndata: " + line + b"\n\n")
        finally:
            self.feed.leave()

    def send_metrics(self, handler):
        """/metrics: the latest snapshot in Prometheus's text format.  With no page
        open, a scrape costs the server one snapshot."""
        self.feed.join()
        try:
            _, line = self.feed.next(0, 10.0)
        finally:
            self.feed.leave()
        snapshot = json.loads(line) if line is not None else {}
        if snapshot.get("event") != "live":
            self.send_text(handler, 503, snapshot.get("error") or
                           "the server sent no snapshot within 10 s")
            return
        self.send(handler, 200, "text/plain; version=0.0.4; charset=utf-8",
                  metrics_text(snapshot).encode())

    def send_log(self, handler, name):
        """/job/ID/log: the tail of a job's log, then what it writes as it writes it
        ("log" events), until the job has ended ("end")."""
        import codecs
        import select
        try:
            job = request(self.data_dir, "jobs", id=int(name))[0]
            waiting = connect(self.data_dir, "wait", {"ids": [job["id"]]})
        except UserError as error:
            self.send_text(handler, 404, str(error))
            return
        self.start_stream(handler)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset, quiet = log_start(job["log"]), time.monotonic()
        with waiting:
            lines = LineReader()
            while True:
                readable = select.select([waiting], [], [], DASHBOARD_LOG_FOLLOW)[0]
                chunk, offset = read_log(job["log"], offset)
                # wait's reply (not its progress lines) says the job has ended; so
                # does the server going away, as far as following goes.
                ended = readable and any(line.startswith(b'{"ok"') for line in
                                         lines.feed(waiting.recv(1 << 16) or b'{"ok"\n'))
                if ended:
                    chunk += read_log(job["log"], offset)[0]
                if chunk:
                    handler.wfile.write(b"event: log\ndata: " + json.dumps(
                        text.decode(chunk)).encode() + b"\n\n")
                    quiet = time.monotonic()
                if ended:
                    handler.wfile.write(b"event: end\ndata: {}\n\n")
                    return
                if time.monotonic() - quiet > DASHBOARD_KEEPALIVE:
                    handler.wfile.write(b": still here\n\n")
                    quiet = time.monotonic()


def action_request(action, posted):
    """(command, params) of the request that the page's ACTION stands for; the server
    checks the values as it checks the command line's."""
    if action in ("pause", "resume"):
        worker = posted.get("worker")
        return action, {"hosts": [] if worker is None else [worker]}
    if action in ("kill", "retry"):
        return action, {"ids": [posted.get("id")]}
    return action, {"name": posted.get("service"), "replicas": posted.get("replicas")}


def jobs_page(params):
    """The jobs request of /api/jobs?state=S&last=N&offset=O: a page of a list."""
    page = {"state": params.get("state", ["running"])[0]}
    for name in ("last", "offset"):
        value = params.get(name, [""])[0]
        if value:
            if not plain_number(value):
                raise UserError(f"{name} must be a whole number")
            page[name] = int(value)
    page.setdefault("last", LIVE_LIST_LIMIT)
    return page


def dashboard_job(job):
    return {key: job[key] for key in DASHBOARD_JOB_FIELDS if key in job}


def log_start(path):
    """Where a job's page starts reading its log: its last DASHBOARD_LOG_TAIL bytes."""
    try:
        return max(0, os.path.getsize(path) - DASHBOARD_LOG_TAIL)
    except OSError:
        return 0


def read_log(path, offset):
    """(what the log at PATH holds from OFFSET on, at most 1 MB; the new offset)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            chunk = log.read(1 << 20)
    except OSError:
        return b"", offset
    return chunk, offset + len(chunk)


def content_policy(page):
    """The page's Content-Security-Policy: its own inline script and style (by their
    hashes), requests to its own origin, nothing else; no framing."""
    import base64
    import hashlib

    def hashes(tag):
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest())
                        .decode() + "'" for body in re.findall(f"<{tag}>(.*?)</{tag}>", page,
                                                              re.S))
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


# --- /metrics: Prometheus's text format ------------------------------------------

def metrics_text(snapshot):
    """A snapshot (Handlers.live) as Prometheus text: jobs by state, starts and ends,
    workers by state and health, slots, resources, and the two histograms."""
    lines = []

    def family(name, kind, text, samples):
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
        # repr, not :g, which would round a count of millions.
        lines.extend(f"{name}{suffix}{metric_labels(labels)} {value!r}"
                     for suffix, labels, value in samples)
    counts = snapshot["counts"]
    family("cli_py_jobs", "gauge", "Jobs in the database: waiting, running, or how they ended.",
           [("", {"state": state}, counts.get(state, 0))
            for state in ("waiting", "running", *(result.value for result in JobResult))])
    activity = snapshot["activity"]
    family("cli_py_job_starts_total", "counter", "Attempts started since the server started.",
           [("", {}, activity["starts"])])
    family("cli_py_job_ends_total", "counter", "Jobs ended since the server started.",
           [("", {}, activity["ends"])])
    family("cli_py_queue_paused", "gauge", "1 while the queue is paused.",
           [("", {}, int(snapshot["paused"]))])
    workers = snapshot["workers"]
    family("cli_py_workers", "gauge", "Workers by state and health.",
           [("", {"state": state.value, "health": health.value},
             sum(worker["state"] == state.value and worker["health"] == health.value
                 for worker in workers))
            for state in WorkerState for health in WorkerHealth])
    family("cli_py_slots", "gauge", "Slots of all workers.",
           [("", {}, sum(worker["slots"] for worker in workers))])
    family("cli_py_slots_used", "gauge", "Slots running jobs.",
           [("", {}, sum(len(worker["used"]) for worker in workers))])
    family("cli_py_worker_slots", "gauge", "Slots of each worker.",
           [("", {"worker": worker["ip"]}, worker["slots"]) for worker in workers])
    family("cli_py_worker_slots_used", "gauge", "Slots of each worker running jobs.",
           [("", {"worker": worker["ip"]}, len(worker["used"])) for worker in workers])
    # GPUs, memory (bytes) and named resources a worker declares, and those held.
    declared = [(worker["ip"], name, usage) for worker in workers
                for name, usage in worker.get("resources", {}).items()]
    family("cli_py_worker_resource", "gauge", "Each resource a worker declares (add_slave "
           "--gpus, --mem in bytes, --resource).",
           [("", {"worker": ip, "resource": name}, usage["total"]) for ip, name, usage in declared])
    family("cli_py_worker_resource_used", "gauge", "How much of each resource running jobs "
           "hold (GPUs shared with --gpus 0.5 count their share).",
           [("", {"worker": ip, "resource": name}, usage["used"]) for ip, name, usage in declared])
    for name, key, text in (
            ("cli_py_queue_wait_seconds", "waits",
             "How long jobs waited in the queue before they started (since the server started)."),
            ("cli_py_scheduling_latency_seconds", "latency",
             "From a free slot or a ready job to the start it allowed.")):
        family(name, "histogram", text, histogram_samples(activity[key]))
    return "\n".join(lines) + "\n"


def histogram_samples(histogram):
    """A Histogram's JSON as (suffix, labels, value): cumulative buckets, +Inf, sum, count."""
    samples, total = [], 0
    for bound, count in zip(histogram["bounds"] + ["+Inf"], histogram["counts"]):
        total += count
        samples.append(("_bucket", {"le": bound if bound == "+Inf" else f"{bound:g}"}, total))
    return samples + [("_sum", {}, histogram["sum"]), ("_count", {}, total)]


def metric_labels(labels):
    if not labels:
        return ""
    escaped = {name: str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for name, value in labels.items()}
    return "{" + ",".join(f'{name}="{value}"' for name, value in escaped.items()) + "}"


###############################################################################
# Quickstart ###################################################################
###############################################################################

# `quickstart` takes a fresh Debian or Ubuntu machine to three finished jobs,
# with this machine as the worker `localhost`.  Until its Python packages are
# there it uses the standard library only (it runs before fabric is installed,
# then runs itself again under .venv/bin/python), and it checks what could stop
# it before it changes anything it need not.  It leaves the user's keys,
# known_hosts and ssh config alone: the queue gets a key, a known_hosts file and
# an ssh config of its own in DATA_DIR/quickstart, and the one change in ~/.ssh
# is a line in authorized_keys.

QUICKSTART_DIR = "quickstart"       # in the data dir: key, known_hosts, ssh config
QUICKSTART_INPUTS = "quickstart"    # in the current dir: the sample inputs
QUICKSTART_JOBS = 3
QUICKSTART_RESULTS = "results"      # where example_job.sh puts its results
PYTHON_PACKAGES = ("fabric", "filelock", "tabulate")   # requirements.txt, by import name
SSH_BANNER_TIMEOUT = 5.0
SSHD_START_TIMEOUT = 15.0
HERE = os.path.dirname(os.path.abspath(__file__))
# ssh config and ssh -G lists do not survive these in a path (see HostKeyCheck).
PLAIN_SSH_PATH = re.compile(r'[^\s"\'%\\]+\Z')


def shown_path(path):
    """PATH relative to the current directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def run_quietly(argv, timeout=600, **kwargs):
    """Run ARGV; its output is kept for a message, never shown as it comes."""
    import subprocess
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=timeout, **kwargs)


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_or_stop(argv, advice):
    """Run ARGV quietly; if it fails, stop with the last line it printed and ADVICE.
    (A run that hangs is stopped by command_quickstart.)"""
    result = run_quietly(argv)
    if result.returncode != 0:
        command = " ".join(shown_path(word) if word.startswith("/") else word
                           for word in argv)
        said = last_line(result.stderr + result.stdout) or f"exit status {result.returncode}"
        raise UserError(f"{command} failed ({said}): {advice}")
    return result


def as_root():
    """The prefix that runs a command as root: [] for root, sudo -n where sudo needs no
    password, else None."""
    import subprocess
    if os.geteuid() == 0:
        return []
    try:
        if run_quietly(["sudo", "-n", "true"], timeout=30).returncode == 0:
            return ["sudo", "-n"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def probe_ssh_port(port):
    """('ssh', banner), ('closed', None) or ('other', what it said) for localhost:PORT."""
    try:
        connection = socket.create_connection(("localhost", port), timeout=SSH_BANNER_TIMEOUT)
    except ConnectionRefusedError:
        return "closed", None
    except OSError as error:
        return "other", f"no answer: {error.strerror or error}"
    received = b""
    with connection:
        try:
            while len(received) < 4096:
                *lines, _ = received.split(b"\n")   # the complete lines
                # RFC 4253: a server may send other lines before its SSH-... line.
                banner = next((line for line in lines if line.startswith(b"SSH-")), None)
                if banner is not None:
                    return "ssh", banner.decode(errors="replace").strip()
                chunk = connection.recv(1024)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass   # it said nothing in time
    said = last_line(received.decode(errors="replace"))[:60]
    return "other", f"it said {said!r}" if said else "it sent no SSH greeting"


def quickstart_packages(port):
    """OS packages: the ssh client, sshd (unless an SSH server answers already), rsync,
    and python3-venv while this Python lacks cli.py's packages and no .venv has them."""
    import importlib.util
    import shutil
    wanted = {
        "openssh-client": all(map(shutil.which, ("ssh", "ssh-keygen", "ssh-keyscan"))),
        "openssh-server": os.path.exists("/usr/sbin/sshd") or
        probe_ssh_port(port)[0] != "closed",
        "rsync": shutil.which("rsync"),
        "python3-venv": python_packages_ready() or os.path.exists(venv_python()) or
        importlib.util.find_spec("ensurepip"),
    }
    missing = [package for package, present in wanted.items() if not present]
    if not missing:
        print("OS packages already installed: " + ", ".join(wanted))
        return
    command = "apt-get update && apt-get install -y " + " ".join(missing)
    prefix = as_root()
    if prefix is None or not shutil.which("apt-get"):
        raise UserError(f"missing {', '.join(missing)}: as root, run: {command}; then run "
                        "quickstart again")
    run_or_stop(prefix + ["apt-get", "update", "-qq"], f"fix that, or run as root: {command}")
    run_or_stop(prefix + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                          "-qq", *missing], f"fix that, or run as root: {command}")
    print(f"installed {', '.join(missing)} (apt-get{' with sudo' if prefix else ''})")


def quickstart_ssh_server(port):
    """SSH server: one must answer on localhost:PORT; sshd is started if nothing does
    (port 22, as root or with sudo -n)."""
    import subprocess
    kind, said = probe_ssh_port(port)
    if kind == "ssh":
        print(f"an SSH server already answers on localhost:{port} ({said})")
        return
    if kind == "other":
        raise UserError(f"localhost:{port} is taken by something that is not an SSH server "
                        f"({said}): free that port, or run sshd on another port (Port in "
                        "/etc/ssh/sshd_config) and give quickstart --port PORT")
    if port != 22:
        raise UserError(f"nothing listens on localhost:{port}: start an SSH server there "
                        "(Port in /etc/ssh/sshd_config), or leave out --port for port 22")
    prefix = as_root()
    if prefix is None:
        raise UserError("no SSH server listens on localhost:22: as root, run: service ssh "
                        "start; then run quickstart again")
    argv = prefix + ["service", "ssh", "start"]
    try:
        result = run_quietly(argv, timeout=60)
        problem = result.returncode and f"exit status {result.returncode}: " \
            f"{last_line(result.stderr + result.stdout)}"
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    deadline = time.monotonic() + SSHD_START_TIMEOUT
    while probe_ssh_port(port)[0] != "ssh":
        if problem or time.monotonic() > deadline:
            raise UserError(f"the SSH server did not start ({' '.join(argv)}: "
                            f"{problem or 'no answer on port 22'}): see `service ssh status`"
                            " and /var/log/auth.log, then run quickstart again")
        time.sleep(0.2)
    print(f"started the SSH server ({' '.join(argv)}); it answers on localhost:22")


def quickstart_data_dir(data_dir):
    """Data dir: a new one, or one quickstart set up before; never another queue's."""
    if not PLAIN_SSH_PATH.match(data_dir):
        raise UserError(f"the data dir {data_dir} has spaces, quotes, % or backslashes, "
                        "which ssh configs cannot hold: give quickstart --server_data_dir DIR "
                        "with a plain path")
    ours = os.path.exists(os.path.join(data_dir, QUICKSTART_DIR, "ssh_config"))
    if os.path.exists(os.path.join(data_dir, DATABASE_FILE)) and not ours:
        raise UserError(f"{data_dir} holds a queue that quickstart did not set up, which it "
                        "leaves alone: give quickstart --server_data_dir DIR for a new one")
    print(f"data dir {data_dir}: {'set up by quickstart before' if ours else 'new'}")


def venv_python():
    return os.path.join(HERE, ".venv", "bin", "python")


def python_packages_ready(python=None):
    """True if PYTHON (this one by default) can import cli.py's packages."""
    if python is None:
        import importlib.util
        return all(importlib.util.find_spec(name) for name in PYTHON_PACKAGES)
    return run_quietly([python, "-c", "import " + ", ".join(PYTHON_PACKAGES)],
                       timeout=60).returncode == 0


def quickstart_python(options):
    """Python packages: fabric, filelock and tabulate, else a .venv beside cli.py with
    requirements.txt installed; then quickstart goes on under its Python."""
    if python_packages_ready():
        print(f"Python packages already importable ({', '.join(PYTHON_PACKAGES)})")
        return
    venv, python = os.path.dirname(os.path.dirname(venv_python())), venv_python()
    if os.path.exists(python) and python_packages_ready(python):
        print(f"Python packages already in {shown_path(venv)}")
    else:
        requirements = os.path.join(HERE, "requirements.txt")
        if not os.path.exists(requirements):
            raise UserError(f"{requirements} is missing: run quickstart in a clone of "
                            "cli.py's repository")
        if not os.path.exists(python):
            run_or_stop([sys.executable, "-m", "venv", venv],
                        "fix that (apt-get install python3-venv?), then run quickstart again")
        run_or_stop([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     "-r", requirements], "check the network or pip's settings (a proxy?), "
                    "then run quickstart again")
        print(f"installed {', '.join(PYTHON_PACKAGES)} into {shown_path(venv)} "
              "(requirements.txt)")
    sys.stdout.flush()
    os.execv(python, [python, os.path.abspath(__file__), "quickstart", "--venv-ready",
                      "--port", str(options.port), "--server_data_dir", options.data_dir])


def quickstart_key(key_path):
    """SSH key: the queue's own, in the data dir; ~/.ssh's keys are not used.  Returns
    its public half (type and base64)."""
    if os.path.exists(key_path):
        print(f"the queue's SSH key already exists ({shown_path(key_path)})")
    else:
        run_or_stop(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                     f"cli.py quickstart {key_path}", "-f", key_path],
                    "fix that, then run quickstart again")
        print(f"made the queue's SSH key {shown_path(key_path)} (your ~/.ssh keys stay "
              "unused)")
    result = run_quietly(["ssh-keygen", "-y", "-f", key_path], timeout=60)
    fields = result.stdout.split()
    if result.returncode != 0 or len(fields) < 2:
        raise UserError(f"ssh-keygen cannot read {key_path} ({last_line(result.stderr)}): "
                        "remove it and run quickstart again")
    return f"{fields[0]} {fields[1]}"


def quickstart_authorized_key(public_key, key_path):
    """authorized_keys: the one change in ~/.ssh, a line for the queue's key, added once
    (~/.ssh and the file are made 0700 and 0600 if missing).  The account's home
    comes from the password database, as sshd takes it, not from $HOME."""
    import pwd
    home = pwd.getpwuid(os.getuid()).pw_dir
    ssh_dir = os.path.join(home, ".ssh")
    path = os.path.join(ssh_dir, "authorized_keys")
    # from=: the key opens this account to logins from this machine only.
    line = f'from="127.0.0.1,::1" {public_key} cli.py quickstart {key_path}\n'
    blob = public_key.split()[1]
    try:
        if not os.path.isdir(ssh_dir):
            os.mkdir(ssh_dir, 0o700)
            os.chmod(ssh_dir, 0o700)
        try:
            with open(path) as existing:
                text = existing.read()
        except FileNotFoundError:
            text = None
        if text is not None and any(blob in entry.split() for entry in text.splitlines()):
            print(f"{path} already has the queue's key")
            return
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if text is None:
            os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "a") as stream:
            stream.write(("\n" if text and not text.endswith("\n") else "") + line)
    except OSError as error:
        raise UserError(f"cannot add the queue's key to {path} ({error.strerror}): fix "
                        f"that, or add this line to it yourself: {line.strip()}") from None
    print(f"added the queue's key to {path} (one line, for logins from this machine)")


def quickstart_known_hosts(path, port):
    """Known hosts: localhost's host keys, recorded in the data dir.  Taking them on first
    sight is safe here: the connection never leaves this machine."""
    name = "localhost" if port == 22 else f"[localhost]:{port}"
    try:
        with open(path) as known_hosts:
            if any(line.split()[:1] == [name] for line in known_hosts):
                print(f"localhost's host keys already in {shown_path(path)}")
                return
    except FileNotFoundError:
        pass
    result = run_quietly(["ssh-keyscan", "-p", str(port), "-T", "10", "localhost"],
                         timeout=60)
    keys = [line for line in result.stdout.splitlines()
            if line.strip() and not line.startswith("#")]
    if not keys:
        raise UserError(f"ssh-keyscan read no host key from localhost:{port} "
                        f"({last_line(result.stderr) or 'no answer'}): check the SSH server, "
                        "then run quickstart again")
    _write_file(path, "\n".join(keys) + "\n")
    print(f"recorded localhost's host keys in {shown_path(path)}")


def quickstart_ssh_config(path, key_path, known_hosts, port):
    """The queue's ssh config: localhost with the queue's key and known_hosts, then
    whatever ssh reads without -F, so that other hosts behave as usual."""
    import pwd
    text = (f"# Written by cli.py quickstart: the ssh config of the queue in "
            f"{os.path.dirname(os.path.dirname(path))}.\n"
            f"# localhost is reached with the queue's own key and known_hosts; every other\n"
            f"# host as ssh reaches it without -F.\n"
            f"Host localhost\n"
            f"    User {pwd.getpwuid(os.getuid()).pw_name}\n"
            f"    Port {port}\n"
            f"    IdentityFile {key_path}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {known_hosts}\n"
            f"    StrictHostKeyChecking yes\n"
            f"Match all\n"
            f"Include ~/.ssh/config\n"
            f"Include /etc/ssh/ssh_config\n")
    try:
        with open(path) as current:
            if current.read() == text:
                print(f"the queue's ssh config already written ({shown_path(path)})")
                return
    except FileNotFoundError:
        pass
    _write_file(path, text)
    print(f"wrote the queue's ssh config {shown_path(path)}")


def quickstart_login(ssh_config, known_hosts):
    """Login: ssh -F with the queue's config must reach localhost, as the jobs' ssh will."""
    import pwd
    import subprocess
    user = pwd.getpwuid(os.getuid()).pw_name
    argv = ["ssh", "-F", ssh_config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "localhost", "true"]
    try:
        result = run_quietly(argv, timeout=60)
        reason = result.returncode and \
            (last_line(result.stderr) or f"exit status {result.returncode}")
    except subprocess.TimeoutExpired:
        reason = "no answer within 60s"
    shown = f"ssh -F {shown_path(ssh_config)} localhost"
    if not reason:
        print(f"{shown} logs in")
        return
    if "Permission denied" in reason:
        hint = (f"sshd refuses the key: check that /etc/ssh/sshd_config lets {user} "
                "in with ~/.ssh/authorized_keys (AllowUsers, PubkeyAuthentication, "
                "AuthorizedKeysFile) and that your home and ~/.ssh are not writable by others")
    elif "host key" in reason.lower() or "IDENTIFICATION" in reason:
        hint = f"localhost's host key changed: remove {known_hosts} and run quickstart again"
    else:
        hint = f"see {shown} -v true"
    raise UserError(f"{shown} fails ({reason}): {hint}")


def quickstart_server(data_dir, ssh_config):
    """Server: started for the data dir with the queue's ssh config, unless running."""
    try:
        running = request(data_dir, "ssh_config")["ssh_config"]
    except UserError as error:
        if "no server running" not in str(error):
            raise
        COMMANDS["start"](parse_arguments(["start", "--server_data_dir", data_dir,
                                           "--ssh-config", ssh_config]))
        return
    if running != ssh_config:
        raise UserError(f"the server of {data_dir} runs with "
                        f"{running or 'the default ssh config'}, not the queue's "
                        f"{ssh_config}: restart it (./cli.py stop, then ./cli.py start "
                        f"--ssh-config {ssh_config}), then run quickstart again")
    pid = request(data_dir, "status", waiting_limit=0, environments=False)["server"]["pid"]
    print(f"the server already runs (pid {pid}) for {data_dir}")


def quickstart_worker(data_dir):
    """Worker: localhost, added unless it is there; refused if it cannot take jobs."""
    status = request(data_dir, "status", waiting_limit=0, environments=False)
    if status["paused"]:
        raise UserError("the queue is paused: ./cli.py resume, then run quickstart again")
    worker = next((slave for slave in status["slaves"] if slave["ip"] == "localhost"), None)
    if worker is None:
        COMMANDS["add_slave"](parse_arguments(["add_slave", "--server_data_dir", data_dir,
                                               "localhost"]))
        return
    if worker["status"] in ("paused", "draining", "down"):
        reason = {"paused": "./cli.py resume localhost",
                  "draining": "wait until remove_slave has removed it",
                  "down": f"its check fails ({worker['check_reason']}); fix that"}
        raise UserError(f"the worker localhost is {worker['status']}: "
                        f"{reason[worker['status']]}, then run quickstart again")
    print(f"localhost is already a worker ({worker['slots']} slot"
          f"{'s' if worker['slots'] > 1 else ''}, {worker['status']})")


def quickstart_jobs(data_dir):
    """Jobs: example_job.sh on sample inputs in ./quickstart (written if missing),
    waited for.  Returns the first job's id and the inputs."""
    import contextlib
    import io
    inputs = []
    for number in range(1, QUICKSTART_JOBS + 1):
        path = os.path.join(QUICKSTART_INPUTS, f"input-{number}.txt")
        if not os.path.exists(path):
            os.makedirs(QUICKSTART_INPUTS, exist_ok=True)
            with open(path, "w") as sample:
                sample.write(f"sample input {number} of {QUICKSTART_JOBS}, for cli.py\n")
        inputs.append(path)
    script = shown_path(os.path.join(HERE, "example_job.sh"))
    script = script if "/" in script else "./" + script
    array = io.StringIO()
    with contextlib.redirect_stdout(array):   # add_job prints the array's id, alone
        COMMANDS["add_job"](parse_arguments(["add_job", "--server_data_dir", data_dir,
                                             script, ":::", *inputs]))
    # The array's id is its first task's job id; the others follow.
    first = int(array.getvalue())
    last = first + len(inputs) - 1
    print(f"queued jobs {first}-{last} (array {first}): {script} on {', '.join(inputs)}")
    try:
        COMMANDS["wait"](parse_arguments(["wait", "--server_data_dir", data_dir, str(first)]))
    except UserError as error:
        raise UserError(f"{error}; see why with ./cli.py logs ID") from None
    return int(first), inputs


def quickstart_summary(data_dir, first_job, inputs):
    """Where the results are, and what to type next."""
    me = shown_path(os.path.abspath(__file__))
    me = me if "/" in me else "./" + me
    if data_dir != resolve_dir(DEFAULT_DATA_DIR):
        me += f" --server_data_dir {shown_path(data_dir)}"
    print(f"\nresults ({QUICKSTART_RESULTS}/ in {os.getcwd()}):")
    for path in inputs:
        result = os.path.join(QUICKSTART_RESULTS, os.path.basename(path) + ".out")
        try:
            with open(result, errors="replace") as text:
                print(f"  {result}: {text.read().strip()}")
        except OSError as error:
            print(f"  {result}: cannot read it ({error.strerror})")
    venv = os.path.dirname(os.path.dirname(venv_python()))
    next_steps = []
    if os.path.realpath(sys.prefix) == os.path.realpath(venv) and \
            os.environ.get("VIRTUAL_ENV") != venv:
        next_steps.append((f". {shown_path(venv)}/bin/activate",
                           "in each new shell, first: cli.py's packages are there"))
    next_steps += [(f"{me} status", "the workers and the jobs"),
                   (f"{me} logs {first_job}.1", f"what task 1 of array {first_job} printed"),
                   (f"{me} add_slave --slots 8 node1 node2",
                    "real machines: see README.md, Quick start"),
                   (f"{me} add_job ./example_job.sh ::: data/*.txt", "one job per file"),
                   (f"{me} stop", "stop the server; running jobs go on")]
    width = max(len(command) for command, _ in next_steps)
    print("\nnext:")
    for command, why in next_steps:
        print(f"  {command.ljust(width)}   # {why}")


def replica_count(text):
    """argparse type for --replicas and scale's N."""
    if not plain_number(text) or int(text) > MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of replicas (0 to "
                                         f"{MAX_REPLICAS})")
    return int(text)


def port_number(text):
    """argparse type for --port."""
    if not plain_number(text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def quickstart_steps(options):
    """The steps of command_quickstart, in order."""
    if not options.venv_ready:
        quickstart_packages(options.port)
        quickstart_ssh_server(options.port)
        quickstart_data_dir(options.data_dir)
        quickstart_python(options)       # may go on under .venv/bin/python
    directory = os.path.join(options.data_dir, QUICKSTART_DIR)
    make_private_dir(options.data_dir)
    make_private_dir(directory)
    key_path = os.path.join(directory, "id_ed25519")
    known_hosts = os.path.join(directory, "known_hosts")
    ssh_config = os.path.join(directory, "ssh_config")
    public_key = quickstart_key(key_path)
    quickstart_authorized_key(public_key, key_path)
    quickstart_known_hosts(known_hosts, options.port)
    quickstart_ssh_config(ssh_config, key_path, known_hosts, options.port)
    quickstart_login(ssh_config, known_hosts)
    quickstart_server(options.data_dir, ssh_config)
    quickstart_worker(options.data_dir)
    first_job, inputs = quickstart_jobs(options.data_dir)
    quickstart_summary(options.data_dir, first_job, inputs)
    return 0


def command_quickstart(options):
    """Make this machine a worker of its own queue, and run three sample jobs on it.

    For a first try, on a fresh Debian or Ubuntu machine: as root or a user
    with sudo, or as anyone where the packages are installed and sshd runs.
    Each step prints one line, and a step already done is skipped, so running
    it again is safe: it only queues three new jobs.  What cannot be done stops
    it with one line saying what to do.  The steps:

      OS packages    openssh-client, openssh-server, rsync, python3-venv
                     (apt-get, as root or with sudo -n)
      SSH server     one must answer on localhost:22 (or --port); sshd is
                     started if nothing does
      Python         fabric, filelock, tabulate; else a .venv beside cli.py
                     with requirements.txt, and the rest runs under it
      SSH key        the queue's own, in DATA_DIR/quickstart, with localhost's
                     host keys and an ssh config that uses both for localhost
                     (start --ssh-config); the one change in ~/.ssh is a line
                     for that key in authorized_keys
      server, worker start, and add_slave localhost
      jobs           example_job.sh on quickstart/input-{1,2,3}.txt, waited
                     for; the results are in results/
    """
    import subprocess
    try:
        return quickstart_steps(options)
    except OSError as error:   # a directory we may not write to, a program gone
        raise UserError(f"{error.filename or 'quickstart'}: {error.strerror or error}: fix "
                        "that, then run quickstart again") from None
    except subprocess.TimeoutExpired as error:
        raise UserError(f"{' '.join(error.cmd)} took over {error.timeout:g}s: see why, then "
                        "run quickstart again") from None


###############################################################################
# Argument parsing #############################################################
###############################################################################

COMMANDS = {
    "quickstart": command_quickstart,
    "start": command_start,
    "stop": command_stop,
    "status": command_status,
    "add_slave": command_add_slave,
    "remove_slave": command_remove_slave,
    "add_job": command_add_job,
    "remove_job": command_remove_job,
    "load_status": command_load_status,
    "kill": command_kill,
    "priority": command_priority,
    "retry": command_retry,
    "add_service": command_add_service,
    "scale": command_scale,
    "stop_service": command_stop_service,
    "start_service": command_start_service,
    "remove_service": command_remove_service,
    "services": command_services,
    "add_schedule": command_add_schedule,
    "top": command_top,
    "dashboard": command_dashboard,
    "schedules": command_schedules,
    "pause_schedule": command_pause_schedule,
    "resume_schedule": command_resume_schedule,
    "remove_schedule": command_remove_schedule,
    "run_schedule": command_run_schedule,
    "load_services": command_load_services,
    "jobs": command_jobs,
    "logs": command_logs,
    "purge": command_purge,
    "wait": command_wait,
    "pause": command_pause,
    "resume": command_resume,
    "edit_slave": command_edit_slave,
}

EXAMPLES = {
    "quickstart": "./cli.py quickstart               # again at any time: it redoes nothing\n"
                  "  ./cli.py quickstart --port 2222   # where sshd listens on port 2222\n"
                  "  ./cli.py quickstart --server_data_dir ~/try-queue",
    "start": "./cli.py start\n  ./cli.py start --server_data_dir ~/queue --log_dir ~/queue/logs\n"
             "  ./cli.py start --foreground          # under systemd or screen\n"
             "  ./cli.py start --ssh-config ~/cluster/ssh_config\n"
             "  ./cli.py start --placement pack     # best fit: big workers kept for big jobs\n"
             "  ./cli.py start --on-end ./notify.sh  # runs as each job ends (remembered)\n"
             "  ./cli.py start --on-end ./chat.sh --hook-timeout 30s   # see README: "
             "Completion hooks\n"
             "  ./cli.py start --no-on-end           # jobs' own --on-end still run",
    "stop": "./cli.py stop",
    "status": "./cli.py status\n  ./cli.py status --json > state.json",
    "add_slave": "./cli.py add_slave node1 node2 alice@10.0.0.7 alice@10.0.0.8:2222 '[fd00::5]'\n"
                 "  ./cli.py add_slave --slots 8 -e SCRATCH=/scratch bignode\n"
                 "  ./cli.py add_slave --slots 4 'node[01-16]' 'gpu[1-4,7]'   # host ranges\n"
                 "  ./cli.py add_slave --hosts-file cluster.txt   # lines like node1 or 8/node2\n"
                 "  ./cli.py add_slave --slots 32 --gpus 4 --mem 256G 'gpu[1-2]'   # GPUs 0-3\n"
                 "  ./cli.py add_slave --gpus 0,2,5 --resource licence=2 gpu3",
    "remove_slave": "./cli.py remove_slave node1\n  ./cli.py remove_slave --wait node2\n"
                    "  ./cli.py remove_slave --kill node3\n"
                    "  ./cli.py remove_slave --wait 'node[09-16]'",
    "add_job": "./cli.py add_job ./job.sh input-1.dat\n"
               "  ./cli.py add_job -e THREADS=4 ./job.sh -- --flag 'two words'\n"
               "  ./cli.py add_job ./job.sh ::: data/*.csv                 # one task per file\n"
               "  ./cli.py add_job ./sweep.sh --lr ::: 0.1 0.01 ::: 32 64   # 4 tasks\n"
               "  ./cli.py add_job --array 1-1000%50 ./task.sh   # TASK_ID 1..1000, 50 at once\n"
               "  ./cli.py add_job --each-line urls.txt ./fetch.sh   # the line in TASK_ARG\n"
               "  ./cli.py add_job --args-file params.txt ./sweep.sh\n"
               "  ./cli.py add_job --after 7 ./merge.sh      # after every task of array 7\n"
               "  ./cli.py add_job --retries 3 --timeout 2h ./simulate.sh run-7\n"
               "  ./cli.py add_job --after 12-20 --priority 5 ./collect.sh\n"
               "  ./cli.py add_job --slots 8 --on gpu1,gpu2 --at 22:00 ./train.sh\n"
               "  ./cli.py add_job --slots 40 --split ./mpi.sh   # 40 slots over one or more "
               "workers;\n"
               "                                               # each part: mpirun -H "
               "$SPLIT_HOSTS ...\n"
               "  # in a job's script: children, killed when the script ends\n"
               "  ./cli.py add_job ./step.sh part-1; ./cli.py add_job --nohup ./report.sh\n"
               "  # when it has ended (see README, Completion hooks):\n"
               "  ./cli.py add_job --on-end 'notify-send \"job ended\"' ./train.sh\n"
               "  ./cli.py add_job --on-end ./collect.sh ./sweep.sh ::: 1 2 3   # each task\n"
               "  # GPUs and other resources (see README): its own devices in "
               "CUDA_VISIBLE_DEVICES\n"
               "  ./cli.py add_job --gpus 2 --mem 32G --slots 8 ./train.sh\n"
               "  ./cli.py add_job --gpus 0.5 ./infer.sh ::: shard-*   # two per GPU\n"
               "  ./cli.py add_job --resource licence=1 --estimate 20m ./solve.sh",
    "remove_job": "./cli.py remove_job 12 13\n  ./cli.py remove_job ./job.sh input-1.dat\n"
                  "  ./cli.py remove_job 7     # the tasks of array 7 still waiting",
    "load_status": "./cli.py status --json > state.json\n  ./cli.py load_status state.json",
    "kill": "./cli.py kill 12\n  ./cli.py kill --grace 1m 12-20 31\n"
            "  ./cli.py kill 7          # every task of array 7 still waiting or running\n"
            "  ./cli.py kill 7.15       # task 15 of array 7\n"
            "  ./cli.py kill 40        # job 40 and its family (the jobs it added, theirs...)",
    "add_service": "./cli.py add_service web --replicas 4 --port 8000 -- ./serve.sh --workers 2\n"
                   "  ./cli.py add_service agent --replicas 8 --on 'node[1-8]' -- ./agent.sh",
    "scale": "./cli.py scale web 8\n  ./cli.py scale web 0        # none running, the spec kept",
    "stop_service": "./cli.py stop_service web\n  ./cli.py stop_service --grace 1m web",
    "start_service": "./cli.py start_service web",
    "remove_service": "./cli.py remove_service web\n  ./cli.py remove_service --grace 0 web",
    "services": "./cli.py services\n  ./cli.py services web\n  ./cli.py services --json",
    "add_schedule": "./cli.py add_schedule backup --daily 02:30 -- ./backup.sh /srv/data\n"
                    "  ./cli.py add_schedule poll --every 10m --timeout 5m -- ./poll.sh\n"
                    "  ./cli.py add_schedule report --cron '0 8 * * mon-fri' -- ./report.sh\n"
                    "  ./cli.py add_schedule publish --after-schedule report -- ./publish.sh\n"
                    "  ./cli.py add_schedule sweep --daily 22:00 --days mon-fri --skip-missed "
                    "--retries 2 -- ./sweep.sh",
    "schedules": "./cli.py schedules\n  ./cli.py schedules backup --json",
    "top": "./cli.py top\n  ./cli.py --server_data_dir /srv/queue/.data top",
    "dashboard": "./cli.py dashboard                 # prints http://127.0.0.1:8750/?token=...\n"
                 "  ssh -L 8750:127.0.0.1:8750 server   # on your laptop: then open that URL\n"
                 "  ./cli.py dashboard --listen 127.0.0.1:9000   # another port\n"
                 "  ./cli.py dashboard --listen 0.0.0.0:8750     # every network (warns)\n"
                 "  ./cli.py dashboard --metrics-open   # /metrics without the token\n"
                 "  curl -H \"Authorization: Bearer $(cat .data/dashboard.token)\" "
                 "http://127.0.0.1:8750/metrics\n"
                 "  ./cli.py dashboard --stop           # off, and the token deleted",
    "pause_schedule": "./cli.py pause_schedule backup",
    "resume_schedule": "./cli.py resume_schedule backup",
    "remove_schedule": "./cli.py remove_schedule backup",
    "run_schedule": "./cli.py run_schedule backup\n  ./cli.py wait $(./cli.py run_schedule backup)",
    "load_services": "./cli.py services --json > services.json   # edit it, then:\n"
                     "  ./cli.py load_services services.json\n"
                     "  ./cli.py load_services --grace 1m - < services.json\n"
                     "  # services.json, by hand (only name and script are required):\n"
                     "  # [{\"name\": \"web\", \"script\": \"./serve.sh\", \"replicas\": 4, "
                     "\"port\": 8000,\n"
                     "  #   \"envs\": {\"MODE\": \"prod\"}, \"on\": [\"node1\", \"node2\"], "
                     "\"health\": {\"tcp\": true}},\n"
                     "  #  {\"name\": \"agent\", \"script\": \"/opt/agent.sh\", "
                     "\"args\": [\"--quiet\"], \"replicas\": 8}]",
    "retry": "./cli.py retry 42\n  ./cli.py retry --failed          # every failed or timed-out job\n"
             "  ./cli.py retry --failed 100-199  # those of 100-199 that failed\n"
             "  ./cli.py retry 7                 # the tasks of array 7 that did not succeed\n"
             "  ./cli.py retry --state killed --script render.sh",
    "priority": "./cli.py priority 10 42          # job 42 goes before the default-0 ones\n"
                "  ./cli.py priority -5 100-199   # these go last\n"
                "  ./cli.py priority 5 7          # the waiting tasks of array 7",
    "jobs": "./cli.py jobs --last 20\n  ./cli.py jobs --state failed --worker node3\n"
            "  ./cli.py jobs 42\n  ./cli.py jobs --json > history.json\n"
            "  ./cli.py jobs --array 7 --state failed   # the failed tasks of array 7\n"
            "  ./cli.py jobs 7.15                       # task 15 of array 7\n"
            "  ./cli.py jobs --tree            # jobs added from inside jobs, under them\n"
            "  ./cli.py jobs --tree 42         # the family of job 42",
    "logs": "./cli.py logs 42\n  ./cli.py logs -f 42 && echo 'job 42 succeeded'\n"
            "  ./cli.py logs 7.15        # task 15 of array 7\n"
            "  ./cli.py logs 7           # every task of array 7 that ran",
    "purge": "./cli.py purge                    # finished more than 7 days ago\n"
             "  ./cli.py purge --older-than 12h\n"
             "  ./cli.py purge --older-than 0      # every finished job",
    "wait": "./cli.py wait && ./collect-results.sh\n  ./cli.py wait 12-20 31\n"
            "  array=$(./cli.py add_job ./job.sh ::: a b c) && ./cli.py wait --quiet $array\n"
            "  # in a job's script: add children, then wait for them all\n"
            "  ./cli.py add_job ./part.sh ::: 1 2 3 && ./cli.py wait --children",
    "pause": "./cli.py pause              # the whole queue\n  ./cli.py pause node3        "
             "# drain node3 without removing it",
    "resume": "./cli.py resume\n  ./cli.py resume node3        # also takes back a worker set aside",
    "edit_slave": "./cli.py edit_slave node1 --slots 8\n"
                  "  ./cli.py edit_slave node1 -e SCRATCH=/fast --unset OLD_VAR\n"
                  "  ./cli.py edit_slave node1 --down-after 0     # never set it aside\n"
                  "  ./cli.py edit_slave 'node[01-16]' --slots 4\n"
                  "  ./cli.py edit_slave gpu1 --gpus 0,1,3      # device 2 is out of service\n"
                  "  ./cli.py edit_slave gpu1 --mem 512G --resource licence=0",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, sized without importing shutil (2 ms at every start: argparse makes a
    formatter for each add_argument, to check its metavar), as shutil would size it."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            columns = os.environ.get("COLUMNS", "")
            width = int(columns) if columns.isdigit() else 0
            if not width:
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
                except (AttributeError, ValueError, OSError):
                    width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with mistakes reported like every other user error: one line, exit 1."""

    def __init__(self, *args, formatter_class=None, **kwargs):
        super().__init__(*args, formatter_class=formatter_class or HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(1, f"Error: {message} (see {self.prog} --help)\n")


class _NotBuilt:
    """Stands in for the parser of a command that this run does not need."""

    def add_argument(self, *args, **kwargs):
        return None

    def add_argument_group(self, *args, **kwargs):
        return self

    def add_mutually_exclusive_group(self, *args, **kwargs):
        return self

    def set_defaults(self, **kwargs):
        return None


def placement_arguments(where, what):
    """--slots, --on, --prefer, --exclude and --no-ssh-reuse, of add_job and add_service
    (WHAT: a job, or a replica)."""
    where.add_argument("--slots", type=positive_int, default=1, metavar="K",
                       help=f"Take K slots of one worker (a {what} that uses K cores); SLOTS "
                            "lists them. It waits for a worker with K free slots, which "
                            "is kept for it meanwhile.")
    where.add_argument("--on", action="append", metavar="HOSTS",
                       help="Run only on these workers (comma-separated, ranges such as "
                            "node[1-4] allowed; repeatable).")
    where.add_argument("--prefer", action="append", metavar="HOSTS",
                       help="Prefer these workers when they have a free slot; may still "
                            "run elsewhere.")
    where.add_argument("--exclude", action="append", metavar="HOSTS",
                       help="Never run on these workers.")
    where.add_argument("--no-ssh-reuse", dest="ssh_reuse", action="store_false",
                       help=f"The {what}'s ssh, scp and rsync calls each open a new "
                            "connection instead of sharing one per host.")
    where.add_argument("--gpus", metavar="N",
                       help=f"Take N GPUs of one worker (see add_slave --gpus); the {what} "
                            "gets their device ids in CUDA_VISIBLE_DEVICES and GPU_IDS, and "
                            "keeps them while it runs. A fraction shares one device: two "
                            "--gpus 0.5 see the same id. With --split: per slot.")
    where.add_argument("--mem", metavar="SIZE",
                       help="Take SIZE of a worker's declared memory, like 16G (in MEM, "
                            "bytes). Accounting only: nothing enforces it on the worker.")
    where.add_argument("--resource", action="append", default=[], metavar="NAME=COUNT",
                       help="Take COUNT of a worker's named resource NAME, like licence=1 "
                            "(in RESOURCE_NAME); repeatable.")


def attempt_arguments(where):
    """--retries, --retry-delay, --timeout and --estimate, of add_job and add_schedule."""
    where.add_argument("--retries", type=retry_count, default=0, metavar="N",
                       help="Run a failed job (non-zero exit, timed out, or its supervisor "
                            "lost) up to N more times, on a worker it has not failed on "
                            "while one is up. Killed jobs are not retried. The script sees "
                            "JOB_ATTEMPT (1, 2, ...).")
    where.add_argument("--retry-delay", metavar="DURATION",
                       help="Wait this long before each retry, like 30s or 5m "
                            "(default: none).")
    where.add_argument("--timeout", metavar="DURATION",
                       help="Kill an attempt that runs longer than this, like 30m or 2h, "
                            f"as kill does (SIGTERM, SIGKILL {DEFAULT_KILL_GRACE:g}s later); "
                            "it ends as timed_out, and is retried if --retries allows.")
    where.add_argument("--estimate", metavar="DURATION",
                       help="How long it is expected to run, like 20m: then it may start "
                            "on a worker kept for a bigger job, if it ends before that job "
                            "could start there (backfill). Outliving it kills nothing "
                            "(that is --timeout); the bigger job just waits for it.")


def on_end_argument(where):
    """--on-end, of add_job and add_schedule."""
    where.add_argument("--on-end", metavar="'PROGRAM [ARGS...]'",
                       help="Once the job has ended for good (after its retries; also "
                            "killed or skipped before it ran), run PROGRAM on this machine, "
                            "without a shell, in the job's directory, with the job's "
                            "environment plus JOB_ID, JOB_RESULT, JOB_EXIT_CODE, JOB_SIGNAL, "
                            "JOB_LOG, JOB_WORKER, JOB_ATTEMPTS and JOB_ARGS (JSON). One word: "
                            "quote it; it is split as a shell would split it, and PROGRAM is "
                            "looked up now (a path, or a command on PATH). Its output goes to "
                            "server.log; jobs ID shows how it went. It runs at least once: "
                            "again if the server stopped or died while it ran.")


def split_argument(where):
    where.add_argument("--split", action="store_true",
                       help="Let the --slots K come from several workers (an MPI-style "
                            "job): the script runs once per worker, each run with SLOTS its "
                            "share, SPLIT_HOSTS every part as host:slots,... and SPLIT_PART "
                            "its place in that list (from 0). One worker that holds all K "
                            "is preferred, else the fewest workers, most room first. It "
                            "starts only when all K are free at once, succeeds when every "
                            "part does, and a part that fails ends the others.")


def build_parser(only=None):
    """The whole command line; with ONLY, just that command (what most runs need).

    Building the parsers of all the commands costs a client a few milliseconds
    for nothing: only one of them can be on the command line.  Long on purpose:
    all of argparse in one place, one block per command, as git-filter-repo does.
    """
    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--server_data_dir", dest="data_dir", metavar="DIR", default=argparse.SUPPRESS,
        help=f"The server's data directory (default: ${DATA_DIR_VARIABLE}, "
             f"else {DEFAULT_DATA_DIR}). Relative paths are taken from the current directory.")
    parser = ArgumentParser(
        prog="cli.py", parents=[common],
        description="A persistent SSH job queue: a background server runs your job script "
                    "for each queued job on a free worker (the commands call workers slaves, "
                    "as the tool this one grew out of did).",
        epilog="examples:\n  " + "\n  ".join(
            ["./cli.py start", "./cli.py add_slave --slots 4 node1 node2",
             "./cli.py add_job ./job.sh input-1.dat", "./cli.py status", "./cli.py stop"]))
    parser.add_argument("--version", action="version", version=VERSION_LINE)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, **kwargs):
        if only is not None and name != only:
            return _NotBuilt()
        # The docstring's body is indented like the code; the help should not be.
        lines = COMMANDS[name].__doc__.strip().splitlines()
        description = "\n".join(line[4:] if line.startswith("    ") else line for line in lines)
        return commands.add_parser(
            name, parents=[common], help=lines[0], description=description,
            epilog="examples:\n  " + EXAMPLES[name], **kwargs)

    quickstart = add("quickstart")
    quickstart.add_argument("--port", type=port_number, default=22,
                            help="The port of this machine's SSH server (default: 22). "
                                 "quickstart starts sshd only for port 22.")
    # Set when quickstart runs itself again under .venv/bin/python: the steps up to
    # the Python packages are done.
    quickstart.add_argument("--venv-ready", action="store_true", help=argparse.SUPPRESS)

    start = add("start")
    start.add_argument("data_dir_positional", nargs="?", metavar="DATA_DIR",
                       help="The data directory (same as --server_data_dir).")
    start.add_argument("log_dir_positional", nargs="?", metavar="LOG_DIR",
                       help="The job log directory (same as --log_dir).")
    start.add_argument("--log_dir", metavar="DIR",
                       help=f"Where job logs (job_ID.txt) and server.log go (default: "
                            f"{DEFAULT_LOG_DIR}).")
    start.add_argument("--foreground", action="store_true",
                       help="Run in the foreground and log to stderr too (for systemd, "
                            "screen or tmux).")
    start.add_argument("--check-interval", default=f"{DEFAULT_CHECK_INTERVAL:g}s",
                       metavar="DURATION",
                       help="How often the server checks each worker that was added with the "
                            "SSH check, like 30s or 2m; 0 turns the checks off (default: "
                            f"{DEFAULT_CHECK_INTERVAL:g}s). A worker that fails is marked "
                            "down and takes no job until a check passes again.")
    start.add_argument("--down-after", type=down_after_count, metavar="K",
                       help="Set a worker aside (no new jobs) once K attempts in a row there "
                            "fail to reach it (ssh's exit status 255, or a non-zero exit within "
                            f"{QUICK_FAILURE:g}s) while jobs work on another worker; it is "
                            "health-checked until a check passes. "
                            "Jobs that failed there with 255 are retried elsewhere without "
                            "spending their --retries. 0 turns it off. Remembered across "
                            f"restarts (default: {DEFAULT_DOWN_AFTER}); add_slave and "
                            "edit_slave set it per worker.")
    start.add_argument("--ssh-config", metavar="FILE",
                       help="The ssh config of this queue, for everything it does over SSH: "
                            "add_slave's check, the health checks, and the jobs' own ssh, "
                            "scp and rsync (as `ssh -F FILE`). Remembered across restarts; "
                            "'default' goes back to ~/.ssh/config and /etc/ssh/ssh_config, "
                            "'none' reads no config. Default: the one the queue has, or "
                            f"${SSH_CONFIG_VARIABLE} if set.")
    start.add_argument("--placement", choices=PLACEMENTS,
                       help="Where jobs go among the workers with room: 'spread' (the one "
                            "with the most free slots, so load spreads across machines) or "
                            "'pack' (the one with the fewest free slots that still holds "
                            "the job, so large workers stay free for large jobs). Remembered "
                            f"across restarts (default: {PLACEMENTS[0]}).")
    hooks = start.add_argument_group("completion hooks (see add_job --on-end)")
    hooks.add_argument("--on-end", metavar="'PROGRAM [ARGS...]'",
                       help="Run PROGRAM on this machine each time any job ends for good (as "
                            "add_job --on-end does; a job's own --on-end runs too). One word: "
                            "quote it; it is split as a shell would split it, and PROGRAM is "
                            "looked up now (a path, or a command on PATH). Remembered across "
                            "restarts: a start without --on-end keeps it.")
    hooks.add_argument("--no-on-end", action="store_true",
                       help="Clear the --on-end that the queue has (jobs' own stay).")
    hooks.add_argument("--hook-timeout", metavar="DURATION",
                       help="End a hook that runs longer than this, like 30s or 5m "
                            "(SIGTERM to its process group, SIGKILL "
                            f"{HOOK_KILL_GRACE:g}s later); it is recorded as timed out. "
                            f"Remembered across restarts (default: {DEFAULT_HOOK_TIMEOUT:g}s).")
    start.add_argument("--notify", action="store_true", help=argparse.SUPPRESS)

    add("stop")
    status = add("status")
    status.add_argument("--json", action="store_true",
                        help="Print the whole state as JSON (the form load_status reads).")

    add_slave = add("add_slave")
    add_slave.add_argument("hosts", nargs="*", metavar="HOST",
                           help="A host name, IP address, user@host, host:port, an IPv6 "
                                "address ([::1] or [::1]:2222) or an alias of the ssh config; "
                                "node[01-16] and gpu[1-4,7] name ranges of hosts (quote "
                                "them for the shell).")
    add_slave.add_argument("--hosts-file", metavar="FILE",
                           help="Also the hosts in FILE (- for stdin): one host or range "
                                "per line, # for comments; SLOTS/HOST (as GNU parallel's "
                                "--sshloginfile writes it, e.g. 8/node1) gives that host "
                                "its own slots.")
    add_slave.add_argument("--slots", type=positive_int, default=1, metavar="N",
                           help="How many jobs may run on each of these workers at once "
                                "(default: 1).")
    add_slave.add_argument("-e", dest="env", action="append", default=[],
                           metavar="NAME=VALUE",
                           help="A variable for every job on these workers; repeatable.")
    add_slave.add_argument("--skip_ssh_auth_check", action="store_true",
                           help="Add the hosts without trying an SSH login first.")
    add_slave.add_argument("--no-ssh-reuse", dest="ssh_reuse", action="store_false",
                           help="Jobs on these workers open a new SSH connection for each "
                                "ssh/scp/rsync call, instead of sharing one per host "
                                "(see README: SSH connection reuse).")
    add_slave.add_argument("--down-after", type=down_after_count, metavar="K",
                           help="Set these workers aside after K failures in a row (see start "
                                "--down-after; 0: never; default: the server's).")
    worker_resource_arguments(add_slave, edit=False)
    add_slave.add_argument("--timeout", default=f"{DEFAULT_SSH_TIMEOUT:g}", metavar="SECONDS",
                           help=f"How long the SSH check waits for each host (default: "
                                f"{DEFAULT_SSH_TIMEOUT:g}).")

    remove_slave = add("remove_slave")
    remove_slave.add_argument("hosts", nargs="+", metavar="HOST",
                              help="A registered worker, or a range such as 'node[01-16]'.")
    remove_slave.add_argument("--wait", action="store_true",
                              help="If busy: take no new jobs, and remove it when its jobs end.")
    remove_slave.add_argument("--kill", action="store_true",
                              help="If busy: end its jobs (SIGTERM to each job's process "
                                   f"group, SIGKILL after {DEFAULT_KILL_GRACE:g}s), record them "
                                   "as killed, and remove it.")

    add_job = add("add_job")
    # In topics, so that --help reads as what to run, where, when and how often.
    what = add_job.add_argument_group("what to run")
    what.add_argument("-e", dest="env", action="append", default=[], metavar="NAME=VALUE",
                      help="A variable for this job; repeatable. JOB_ID, SLAVE_IP, "
                           "SLAVE_HOST, SLAVE_PORT, SLAVE_USER, SLOT, SLOTS, JOB_ATTEMPT, "
                           "SPLIT_HOSTS and SPLIT_PART are reserved (and ARRAY_ID, TASK_ID, "
                           "TASK_ARG in arrays).")
    what.add_argument("--array", metavar="SPEC",
                      help="An array: one task per index of SPEC, in Slurm's syntax: 1-1000, "
                           "0-99:5 (a step), 1,4,9-12; %%K at the end runs at most K at "
                           "once (1-1000%%50), and %%K alone limits the tasks of ::: or a "
                           "file. Each task gets ARRAY_ID and TASK_ID (its index).")
    what.add_argument("--args-file", metavar="FILE",
                      help="An array: one task per line of FILE (- for stdin), split into "
                           "arguments as a POSIX shell would, without running anything; "
                           "they follow ARGS. Like -e, it goes before SCRIPT.")
    what.add_argument("--each-line", metavar="FILE",
                      help="An array: one task per line of FILE (- for stdin) that is not "
                           "blank, the line in TASK_ARG, TASK_ID counting from 1.")
    what.add_argument("script", metavar="SCRIPT",
                      help="An executable job script (a path, or a command on PATH).")
    what.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                      help="Arguments passed to the script verbatim, even ones that look "
                           "like options.")
    where = add_job.add_argument_group("where it runs")
    placement_arguments(where, "job")
    split_argument(where)
    when = add_job.add_argument_group("when it starts")
    when.add_argument("--priority", type=int, default=0, metavar="N",
                      help="Higher starts first; jobs of equal priority start in "
                           "submission order (default: 0; may be negative).")
    when.add_argument("--after", action="append", metavar="IDS",
                      help="Run only after all these jobs succeeded (ids like 12,13 or "
                           "12-20; repeatable). If one of them fails for good, is killed "
                           "or removed, this job is skipped.")
    when.add_argument("--after-any", action="append", metavar="IDS",
                      help="Run once any one of these jobs succeeded; skipped if none "
                           "can any more.")
    when.add_argument("--at", metavar="TIME",
                      help="Start no earlier than TIME: '2026-12-01 16:45' (local time), "
                           "'16:45' (the next time the clock shows it), or ISO 8601 with "
                           "a zone.")
    when.add_argument("--delay", metavar="DURATION",
                      help="Start no earlier than DURATION from now, like 10m or 2h.")
    family = add_job.add_argument_group("inside a job")
    family.add_argument("--nohup", action="store_true",
                        help="Added from inside a running job, the new jobs are its children "
                             "and are killed when it ends; with --nohup they run on (they "
                             "are still its family: a kill of it kills them too).")
    attempt_arguments(add_job.add_argument_group("how often it runs"))
    on_end_argument(add_job.add_argument_group("when it ends"))

    remove_job = add("remove_job")
    remove_job.add_argument("first", metavar="ID | SCRIPT",
                            help="A job id or range, an array id (its waiting tasks) or a "
                                 "task like 7.3, or the script of the jobs to remove.")
    remove_job.add_argument("rest", nargs=argparse.REMAINDER, metavar="ID | ARGS",
                            help="More ids, or the script's exact arguments.")

    load_status = add("load_status")
    load_status.add_argument("file", metavar="FILE", help="A file written by status --json.")

    kill = add("kill")
    kill.add_argument("ids", nargs="+", metavar="ID",
                      help="Job ids, ranges like 12-20, array ids (every task) or tasks "
                           "like 7.3.")
    kill.add_argument("--grace", default=f"{DEFAULT_KILL_GRACE:g}s", metavar="DURATION",
                      help="Time between SIGTERM and SIGKILL, like 10s or 1m "
                           f"(default: {DEFAULT_KILL_GRACE:g}s).")

    add_service = add("add_service")
    add_service.add_argument("name", metavar="NAME",
                             help="The service's name: letters, digits, '.', '_' and '-'.")
    what = add_service.add_argument_group("what to run")
    what.add_argument("--replicas", type=replica_count, default=1, metavar="N",
                      help="How many replicas to keep running (default: 1).")
    what.add_argument("--port", type=port_number, metavar="P",
                      help="Give each replica PORT=P+REPLICA, so that two replicas on one "
                           "worker do not collide.")
    what.add_argument("-e", dest="env", action="append", default=[], metavar="NAME=VALUE",
                      help="A variable for every replica; repeatable. SERVICE, REPLICA (and "
                           "PORT with --port) are set by the service.")
    what.add_argument("script", metavar="SCRIPT",
                      help="An executable script (a path, or a command on PATH); put -- "
                           "before it.")
    what.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                      help="Arguments passed to the script verbatim.")
    placement_arguments(add_service.add_argument_group("where it runs"), "replica")
    health = add_service.add_argument_group("health checks")
    probe = health.add_mutually_exclusive_group()
    probe.add_argument("--health-tcp", action="store_true",
                       help="Probe each replica by connecting to SLAVE_HOST:PORT from this "
                            "machine (needs --port).")
    probe.add_argument("--health-cmd", metavar="CMD",
                       help="Probe each replica by running CMD on this machine, with the "
                            "replica's environment (PORT, SLAVE_IP, ...); exit 0 means "
                            "healthy. CMD is split into words as a shell would, but no "
                            "shell runs it: use a script to expand variables.")
    health.add_argument("--health-interval", metavar="DURATION",
                        default=f"{DEFAULT_HEALTH_INTERVAL:g}s",
                        help="Time between probes, and before the first "
                             f"(default: {DEFAULT_HEALTH_INTERVAL:g}s).")
    health.add_argument("--health-failures", type=positive_int, metavar="K",
                        default=DEFAULT_HEALTH_FAILURES,
                        help="Failed probes in a row that restart a replica "
                             f"(default: {DEFAULT_HEALTH_FAILURES}).")

    scale = add("scale")
    scale.add_argument("name", metavar="NAME", help="The service.")
    scale.add_argument("replicas", type=replica_count, metavar="N",
                       help="How many replicas to keep running from now on (0 or more).")
    scale.add_argument("--grace", default=f"{DEFAULT_KILL_GRACE:g}s", metavar="DURATION",
                       help="Time between SIGTERM and SIGKILL for the replicas stopped "
                            f"(default: {DEFAULT_KILL_GRACE:g}s).")

    stop_service = add("stop_service")
    stop_service.add_argument("name", metavar="NAME", help="The service.")
    stop_service.add_argument("--grace", default=f"{DEFAULT_KILL_GRACE:g}s",
                              metavar="DURATION",
                              help="Time between SIGTERM and SIGKILL "
                                   f"(default: {DEFAULT_KILL_GRACE:g}s).")

    start_service = add("start_service")
    start_service.add_argument("name", metavar="NAME", help="The service.")

    remove_service = add("remove_service")
    remove_service.add_argument("name", metavar="NAME", help="The service.")
    remove_service.add_argument("--grace", default=f"{DEFAULT_KILL_GRACE:g}s",
                                metavar="DURATION",
                                help="Time between SIGTERM and SIGKILL "
                                     f"(default: {DEFAULT_KILL_GRACE:g}s).")

    add_schedule = add("add_schedule")
    add_schedule.add_argument("name", metavar="NAME",
                              help="The schedule's name: letters, digits, '.', '_' and '-'.")
    rule = add_schedule.add_argument_group("when it fires (one of these)")
    rule.add_argument("--every", metavar="DURATION",
                      help="Every DURATION (at least 1s), like 90s, 10m, 6h or 1d, counted "
                           "from the previous firing.")
    rule.add_argument("--daily", metavar="HH:MM[,HH:MM...]",
                      help="At these local times of day, like 02:30 or 08:00,12:00,18:00.")
    rule.add_argument("--days", metavar="DAYS",
                      help="With --daily: only on these days of the week, like mon-fri or "
                           "sat,sun (default: every day).")
    rule.add_argument("--cron", metavar="'M H DOM MON DOW'",
                      help="A cron line's five fields (minute, hour, day of month, month, "
                           "day of week) with *, lists, ranges, steps and names, like "
                           "'*/15 8-18 * * mon-fri'. When both day fields are restricted, "
                           "either matches, as in cron.")
    rule.add_argument("--after-schedule", metavar="NAME",
                      help="After each run of schedule NAME that succeeds (SCHEDULED_FOR is "
                           "when it ended); once for several successes it did not follow.")
    how = add_schedule.add_argument_group("how it fires")
    how.add_argument("--overlap", action="store_true",
                     help="Fire even while the previous run still waits or runs (default: "
                          "skip that time, and count it).")
    how.add_argument("--skip-missed", action="store_true",
                     help="Let times missed while the server was stopped or the machine "
                          "slept go (default: run once when it is back).")
    what = add_schedule.add_argument_group("what each run is (as add_job)")
    what.add_argument("-e", dest="env", action="append", default=[], metavar="NAME=VALUE",
                      help="A variable for every run; repeatable. SCHEDULE and SCHEDULED_FOR "
                           "are set by the schedule.")
    what.add_argument("script", metavar="SCRIPT",
                      help="An executable script (a path, or a command on PATH); put -- "
                           "before it.")
    what.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                      help="Arguments passed to the script verbatim.")
    where = add_schedule.add_argument_group("where each run goes")
    placement_arguments(where, "job")
    split_argument(where)
    when = add_schedule.add_argument_group("each run")
    when.add_argument("--priority", type=int, default=0, metavar="N",
                      help="Higher starts first (default: 0; may be negative).")
    attempt_arguments(when)
    on_end_argument(when)
    # job_policy reads these of add_job: a run starts when it is due, after nothing.
    add_schedule.set_defaults(at=None, delay=None, after=None, after_any=None)

    add("top")

    dashboard = add("dashboard")
    dashboard.add_argument("--listen", type=listen_argument, metavar="HOST:PORT",
                           help=f"Where the web server listens (default: "
                                f"{DEFAULT_DASHBOARD_LISTEN}, this machine only). HOST is an "
                                "IP address: 0.0.0.0 or [::] for every network, which prints "
                                "a warning. Port 0 takes any free port.")
    dashboard.add_argument("--metrics-open", action="store_true",
                           help="Serve /metrics without the token, for a Prometheus server on "
                                "a trusted network; every other page still needs it.")
    dashboard.add_argument("--stop", action="store_true",
                           help="Turn the dashboard off and delete its token (the next "
                                "dashboard makes a new one).")

    schedules = add("schedules")
    schedules.add_argument("name", nargs="?", metavar="NAME", help="Show this schedule only.")
    schedules.add_argument("--json", action="store_true", help="Print JSON.")
    for name in ("pause_schedule", "resume_schedule", "remove_schedule", "run_schedule"):
        add(name).add_argument("name", metavar="NAME", help="The schedule's name.")

    services = add("services")
    services.add_argument("name", nargs="?", metavar="NAME",
                          help="Show this one service in full, with each replica.")
    services.add_argument("--json", action="store_true", help="Print JSON.")

    load_services = add("load_services")
    load_services.add_argument("file", metavar="FILE",
                               help="A JSON document of every service, as services --json "
                                    "prints it (- for stdin).")
    load_services.add_argument("--grace", default=f"{DEFAULT_KILL_GRACE:g}s",
                               metavar="DURATION",
                               help="Time between SIGTERM and SIGKILL for the replicas "
                                    f"stopped or restarted (default: {DEFAULT_KILL_GRACE:g}s).")

    retry = add("retry")
    retry.add_argument("ids", nargs="*", metavar="ID",
                       help="Ended jobs: ids, ranges like 12-20, tasks like 7.3, or array "
                            "ids (their tasks that did not succeed); with a filter: only "
                            "those of them that match.")
    retry.add_argument("--failed", action="store_true",
                       help="Only jobs that failed or timed out.")
    retry.add_argument("--state", metavar="S",
                       help="Only jobs that ended this way: done (any), " +
                            ", ".join(result.value for result in JobResult) + ".")
    retry.add_argument("--script", metavar="P",
                       help="Only jobs of this script: a path, or a bare name matching any "
                            "script of that name.")

    priority = add("priority")
    priority.add_argument("priority", type=int, metavar="N",
                          help=f"The new priority, a whole number from {-MAX_PRIORITY} to "
                               f"{MAX_PRIORITY}; higher starts first.")
    priority.add_argument("ids", nargs="+", metavar="ID",
                          help="Waiting jobs: ids, ranges like 12-20, tasks like 7.3, or "
                               "array ids (their waiting tasks).")

    jobs = add("jobs")
    jobs.add_argument("id", nargs="?", type=one_job_id, metavar="ID",
                      help="Show this one job in full (ARRAY.TASK: one task of an array); "
                           "an array's id lists its tasks.")
    jobs.add_argument("--array", type=array_id, metavar="ID",
                      help="Only the tasks of this array (the id add_job printed).")
    jobs.add_argument("--state", metavar="S",
                      help="Only jobs in this state: waiting, running or done, or ended this "
                           "way: " + ", ".join(result.value for result in JobResult) + ".")
    jobs.add_argument("--worker", metavar="HOST", help="Only jobs that ran on this worker.")
    jobs.add_argument("--schedule", metavar="NAME",
                      help="Only the runs of this schedule (see add_schedule).")
    jobs.add_argument("--script", metavar="P",
                      help="Only jobs of this script: a path, or a bare name matching any "
                           "script of that name.")
    jobs.add_argument("--last", type=positive_int, metavar="N",
                      help="Only the N most recent jobs.")
    jobs.add_argument("--json", action="store_true",
                      help="Print a JSON list (every matching job unless --last is given).")
    jobs.add_argument("--tree", action="store_true",
                      help="Show families as trees: jobs added from inside other jobs under "
                           "them; with an ID, only its family.")

    logs = add("logs")
    logs.add_argument("id", type=one_job_id, metavar="ID",
                      help="The job, or ARRAY.TASK; an array's id prints the logs of all "
                           "its tasks that ran, one after another.")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="Follow the output until the job ends, then exit with its status.")

    purge = add("purge")
    purge.add_argument("--older-than", metavar="DURATION", default="7d",
                       help="Only jobs that ended longer ago than this, like 12h or 30d "
                            "(default: 7d; 0 for every finished job).")

    wait = add("wait")
    wait.add_argument("ids", nargs="*", metavar="ID",
                      help="Job ids, ranges like 12-20, array ids (every task) or tasks "
                           "like 7.3 (default: every job waiting or running now).")
    wait.add_argument("--quiet", "-q", action="store_true",
                      help="No progress line, only the result.")
    wait.add_argument("--children", action="store_true",
                      help="From inside a job: wait for the jobs it added (its children); "
                           "exit 1 if one did not succeed.")

    for name in ("pause", "resume"):
        add(name).add_argument("hosts", nargs="*", metavar="HOST",
                               help="Only these workers, or ranges such as 'node[1-4]' "
                                    "(default: the whole queue).")

    edit_slave = add("edit_slave")
    edit_slave.add_argument("hosts", nargs="+", metavar="HOST",
                            help="A registered worker, or a range such as 'node[01-16]': "
                                 "all of them are changed, or none.")
    edit_slave.add_argument("--slots", type=positive_int, metavar="N",
                            help="The new number of slots.")
    edit_slave.add_argument("-e", dest="env", action="append", default=[],
                            metavar="NAME=VALUE", help="Set a variable; repeatable.")
    edit_slave.add_argument("--unset", action="append", default=[], metavar="NAME",
                            help="Remove a variable; repeatable.")
    edit_slave.add_argument("--down-after", metavar="K",
                            help="Set it aside after K failures in a row (see start "
                                 "--down-after; 0: never; 'default': the server's).")
    edit_slave.add_argument("--ssh-reuse", action=argparse.BooleanOptionalAction, default=None,
                            help="Whether jobs started here from now on share SSH "
                                 "connections (turning it off stops the shared ones).")
    worker_resource_arguments(edit_slave, edit=True)
    return parser


def worker_resource_arguments(parser, edit):
    """--gpus, --mem and --resource of add_slave and edit_slave (EDIT: 0 takes away)."""
    resources = parser.add_argument_group("resources beyond slots (see README: GPUs and "
                                          "other resources)")
    resources.add_argument("--gpus", metavar="N | IDS",
                           help="Its GPUs: a count (4: devices 0-3) or device ids (0,2,5). "
                                "Jobs with --gpus get their own devices in "
                                "CUDA_VISIBLE_DEVICES." + (" 0: none any more; jobs holding "
                                                           "one keep it until they end."
                                                           if edit else ""))
    resources.add_argument("--mem", metavar="SIZE",
                           help="Memory jobs may ask for with --mem, like 256G (accounting "
                                "only: nothing enforces it)." + (" 0: none." if edit else ""))
    resources.add_argument("--resource", action="append", default=[], metavar="NAME=COUNT",
                           help="A named countable resource, like licence=2 or scratch=4; "
                                "repeatable." + (" NAME=0 takes it away." if edit else ""))


def command_named(argv):
    """The command ARGV runs, if it plainly names one before any other option."""
    words = iter(argv)
    for word in words:
        if word == "--server_data_dir":
            next(words, None)
        elif word.startswith("--server_data_dir="):
            continue
        elif word in COMMANDS:
            return word
        else:
            return None   # --help, --version, a typo: the whole parser answers
    return None


def parse_arguments(argv):
    if argv == ["--version"]:   # (not worth building every command's parser for)
        print(VERSION_LINE)
        raise SystemExit(0)
    parser = build_parser(only=command_named(argv))
    options = parser.parse_args(argv)
    check_conflicts(options)
    options.data_dir = resolve_dir(getattr(options, "data_dir", None) or
                                   getattr(options, "data_dir_positional", None) or
                                   os.environ.get(DATA_DIR_VARIABLE) or DEFAULT_DATA_DIR)
    return options


def check_conflicts(options):
    """Every pair of flags that cannot go together, checked once, right after parsing."""
    def differ(first, second):
        return first and second and resolve_dir(first) != resolve_dir(second)
    command = options.command
    if differ(getattr(options, "data_dir", None), getattr(options, "data_dir_positional", None)):
        raise UserError("two different data dirs given: use either DATA_DIR or "
                        "--server_data_dir")
    if command == "start" and differ(options.log_dir, options.log_dir_positional):
        raise UserError("two different log dirs given: use either LOG_DIR or --log_dir")
    if command == "remove_slave" and options.wait and options.kill:
        raise UserError("--wait and --kill exclude each other: choose one")
    if command == "add_job" and options.at is not None and options.delay is not None:
        raise UserError("--at and --delay both give a start time: choose one")
    if command in ("add_job", "add_schedule") and options.split and options.slots < 2:
        raise UserError("--split needs --slots K of 2 or more (the slots to split across "
                        "workers)")
    if command in ("add_job", "add_schedule") and options.retry_delay is not None and \
            not options.retries:
        raise UserError("--retry-delay needs --retries N (how many more attempts)")
    if command == "dashboard" and options.stop and (options.listen or options.metrics_open):
        raise UserError("dashboard --stop takes no --listen or --metrics-open: it turns the "
                        "dashboard off")
    if command == "edit_slave":
        both = {text.partition("=")[0] for text in options.env} & set(options.unset)
        if both:
            raise UserError(f"{min(both)} is both set (-e) and unset (--unset): choose one")


###############################################################################
# main #########################################################################
###############################################################################

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):
        # Arguments that are not UTF-8 come back from the server as Python read them
        # from argv (surrogate escapes): print them as the bytes they were, in any
        # locale, rather than fail on them.
        sys.stdout.reconfigure(errors="surrogateescape")
    if argv == [PROBER]:
        prober_main()
        return 0
    if argv == [HEALTH_CHECKER]:
        health_checker_main()
        return 0
    if argv == [DASHBOARD]:
        dashboard_main()
        return 0
    try:
        options = parse_arguments(argv)
        return COMMANDS[options.command](options)
    except UserError as error:
        sys.stdout.flush()   # what was done before it, above it, even through a pipe
        print(f"Error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (status | head): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
