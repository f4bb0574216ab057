# CPU accounting shared by the bench scripts (sourced, not run). Everything is in
# clock ticks (`getconf CLK_TCK` a second), read from /proc. Also: reading a
# field of a bench's JSON report.

# A process's user + system time; 0 once it is gone.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Context switches of all a process's threads: each is a hand-off between threads
# (or a wait for the network), and on a virtual machine each costs microseconds.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'; }

# The whole machine's busy time, and its busy plus idle time.
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
elapsed() { awk '/^cpu / {print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }

# PostgreSQL's processes: the server's own and the backends serving the runs. A
# backend that exits takes its time with it, so sample while they run.
database() { local sum=0; for pid in $(pgrep -u postgres); do sum=$((sum + $(ticks "$pid"))); done; echo $sum; }

# RabbitMQ's Erlang VM, or 0 when none runs.
find_broker() { pgrep -o beam.smp || echo 0; }

# CPU µs per request from a tick count: per_request TICKS REQUESTS.
per_request() { echo $(( $1 * 1000000 / $(getconf CLK_TCK) / $2 )); }

# One figure of a JSON report, as a Python expression over it (`r`):
#   field report.json "int(r['throughput_per_sec'])"
field() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$1" "$2"; }
