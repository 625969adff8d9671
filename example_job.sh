#!/usr/bin/env bash
# example_job.sh INPUT_FILE [RESULT_DIR]
#
# A job script for cli.py.  The server runs it on this machine with
#   JOB_ID    the job's id (unique within the data dir)
#   SLAVE_IP  the worker to use in ssh, rsync and scp (a host name, IP,
#             user@host or ssh alias; cli.py maps host:port and IPv6 names
#             to one that all three take)
# in its environment, in the directory `add_job` was called from.
#
# It copies INPUT_FILE to the worker, does the work there over ssh, copies the
# result back to RESULT_DIR (default: results/) and cleans up.  Anything that
# fails ends the job with a non-zero status and a message in its log
# (LOG_DIR/job_$JOB_ID.txt).
#
# Cancelling the job (remove_slave --kill, or kill) sends SIGTERM to this
# script and everything it started.  `ssh -t -t` gives the remote command a
# terminal, so when the local ssh ends, the remote side gets SIGHUP and the work
# stops there too; the trap below then removes the remote scratch directory.
#
# Queue one job per input:
#   for f in data/*.txt; do ./cli.py add_job ./example_job.sh "$f"; done
set -euo pipefail

input=${1:?usage: example_job.sh INPUT_FILE [RESULT_DIR]}
result_dir=${2:-results}
: "${JOB_ID:?JOB_ID is not set: run this script through ./cli.py add_job}"
: "${SLAVE_IP:?SLAVE_IP is not set: run this script through ./cli.py add_job}"

# BatchMode: fail instead of prompting for a password nobody can type.
ssh_options=(-o BatchMode=yes -o ConnectTimeout=20)
remote_dir="/tmp/cli-py-job-$JOB_ID"
name=$(basename -- "$input")

fail() { echo "job $JOB_ID on $SLAVE_IP: $*" >&2; exit 1; }
cleanup_remote() { ssh "${ssh_options[@]}" "$SLAVE_IP" rm -rf -- "$remote_dir" || true; }
on_term() {
    echo "job $JOB_ID on $SLAVE_IP: cancelled, cleaning up" >&2
    trap '' TERM      # the rest of the process group (ssh, rsync) got it already
    cleanup_remote
    exit 143
}
trap on_term TERM INT

[[ -r $input ]] || fail "cannot read input file $input"
mkdir -p -- "$result_dir"

echo "job $JOB_ID: copying $input to $SLAVE_IP:$remote_dir"
ssh "${ssh_options[@]}" "$SLAVE_IP" mkdir -p -- "$remote_dir" || fail "cannot create $remote_dir"
rsync -a -e "ssh ${ssh_options[*]}" -- "$input" "$SLAVE_IP:$remote_dir/$name" \
    || fail "rsync to the worker failed"

# The work itself: replace this line with your program.  It runs in the
# background and we `wait` for it, so the TERM trap can run while it works.
# ssh joins its arguments into one command line for the remote shell, so quote
# anything that comes from a file name with printf %q.
echo "job $JOB_ID: working on $SLAVE_IP"
work=$(printf 'cd %q && tr "[:lower:]" "[:upper:]" < %q > %q' "$remote_dir" "$name" "$name.out")
ssh -t -t "${ssh_options[@]}" "$SLAVE_IP" "$work" </dev/null &
wait $! || fail "the work failed on the worker (exit status $?)"

echo "job $JOB_ID: copying the result back to $result_dir/"
rsync -a -e "ssh ${ssh_options[*]}" -- "$SLAVE_IP:$remote_dir/$name.out" "$result_dir/" \
    || fail "rsync from the worker failed"
cleanup_remote
echo "job $JOB_ID: done: $result_dir/$name.out"
