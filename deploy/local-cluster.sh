#!/usr/bin/env bash
# deploy/compose.yaml's topology on this one machine (as processes, or as the image's containers), and its check:
#
#   a private PostgreSQL cluster      the store's metadata (MUNET_DATABASE_URL)
#   a Ray head and a Ray worker       candidates train as Ray tasks, on the worker (the head has 0 CPUs)
#   two `munet serve` replicas        one MUNET_HOME (module and example files) and one database
#
# then: register a task on replica a, load both replicas with Predict calls while the evolution
# leader runs generations on Ray until one promotes, check that both replicas serve the promoted
# version and that no request failed, kill the leader (SIGKILL) and check that the other replica
# takes the evolution lease, keeps serving without a failure and evolves on Ray itself.
#
#   deploy/local-cluster.sh [check]   start, check, stop; exit 0 when every check passes (default)
#   deploy/local-cluster.sh up        start and keep running until Ctrl-C; prints the addresses
#   deploy/local-cluster.sh infra     start PostgreSQL and Ray only, check them, stop
#
# CLUSTER_IMAGE=munet-serve:cpu (make docker) runs the Ray nodes and the replicas as containers of that
# image instead, as deploy/compose.yaml does (the replicas join Ray as 0-CPU nodes, then `munet serve`;
# the store's files on one volume), with host networking; PostgreSQL stays a local cluster.
#
# Settings (environment): MUNET_VENV (the venv with munet-serve and ray; default .venv), PG_BIN
# (PostgreSQL's bin folder; default the newest /usr/lib/postgresql/*/bin), RAY_WORKER_CPUS (2),
# CANDIDATES (2), BUDGET_S (4), GENERATIONS (4: at most this many until one promotes), LEASE_S (5),
# KEEP=1 (keep the temporary folder with every log). Everything listens on loopback addresses only:
# PostgreSQL and the replicas on 127.0.0.1, Ray's head on 127.0.0.2 and its worker on 127.0.0.3 (the
# replicas' own Ray nodes, with CLUSTER_IMAGE, on 127.0.0.4 and .5): Ray replaces 127.0.0.1 by the
# machine's external address; other loopback addresses it keeps.
# Everything started here is stopped on exit (trap), by process id; nothing else is touched.
set -euo pipefail

mode=${1:-check}
case "$mode" in check|up|infra) ;; *) sed -n '2,30p' "$0" >&2; exit 2 ;; esac

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${MUNET_VENV:-$repo/.venv}
py=$venv/bin/python
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
ray_worker_cpus=${RAY_WORKER_CPUS:-2}
lease_s=${LEASE_S:-5}
head_ip=127.0.0.2
worker_ip=127.0.0.3
image=${CLUSTER_IMAGE:-}

say() { printf '%s local-cluster: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[ -x "$py" ] || die "no venv at $venv (make setup, or MUNET_VENV=...)"
[ -x "$pg_bin/initdb" ] || die "no PostgreSQL server binaries (PG_BIN=$pg_bin; apt-get install postgresql)"
if [ -n "$image" ]; then
  docker image inspect "$image" >/dev/null 2>&1 || die "no image $image (make docker; and a running Docker daemon)"
else
  [ -x "$venv/bin/ray" ] || die "Ray is not installed in $venv (its ray command is missing)"
fi

tmp=$(mktemp -d /tmp/munet-cluster.XXXXXX)
chmod 755 "$tmp"  # PostgreSQL's own user must reach its folder inside
mkdir -p "$tmp/logs" "$tmp/home" "$tmp/store"
pids=()  # every long-running process started here, in start order
containers=()  # with CLUSTER_IMAGE: every container started here
cprefix=$(basename "$tmp")
volume=$cprefix-data

# every process started here carries this variable, so the cleanup finds what they spawned too
export MUNET_LOCAL_CLUSTER="$tmp"
# Ray's state, and anything else that writes under ~, stays in the temporary folder
export HOME="$tmp/home"
export RAY_USAGE_STATS_ENABLED=0

# ---- PostgreSQL -----------------------------------------------------------------------------------
# initdb refuses to run as root: as root, the cluster belongs to the postgres user (nobody without it)
if [ "$(id -u)" = 0 ]; then
  pg_os_user=$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)
  as_pg() { runuser -u "$pg_os_user" -- "$@"; }
else
  pg_os_user=$(id -un)
  as_pg() { "$@"; }
fi
pg_dir="$tmp/pg"

free_ports() {  # N distinct free TCP ports on 127.0.0.1
  "$py" -c "
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in socks))" "$1"
}
read -r pg_port ray_port a_http a_grpc b_http b_grpc <<<"$(free_ports 6)"

pg_password=$("$py" -c "import secrets; print(secrets.token_hex(16))")
export MUNET_ADMIN_TOKEN=$("$py" -c "import secrets; print(secrets.token_hex(16))")
# Ray's token authentication, as in deploy/compose.yaml: one secret for every node and driver
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$("$py" -c "import secrets; print(secrets.token_hex(32))")
database_url="postgresql://munet:$pg_password@127.0.0.1:$pg_port/munet"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  say "stopping"
  local i pid
  # last started first: replicas, then the Ray worker and head (SIGTERM: `ray start --block` stops its node)
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ ${#containers[@]} -gt 0 ]; then
    docker rm -f -v "${containers[@]}" >/dev/null 2>&1 || true
  fi
  if [ -n "$image" ]; then docker volume rm "$volume" >/dev/null 2>&1 || true; fi
  if [ -f "$pg_dir/data/postmaster.pid" ]; then
    as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  # whatever those processes spawned and left behind: found by this run's marker, ended by id
  local left=""
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [ "$pid" = $$ ] && continue
    if grep -qxzF "MUNET_LOCAL_CLUSTER=$tmp" "$env" 2>/dev/null; then left="$left $pid"; fi
  done
  if [ -n "$left" ]; then
    say "ending leftover processes:$left"
    kill -KILL $left 2>/dev/null || true
  fi
  # Ctrl-C or SIGTERM is how `up` ends: not a failure
  if [ "$mode" = up ] && { [ "$rc" = 130 ] || [ "$rc" = 143 ]; }; then rc=0; fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then say "logs kept in $tmp"; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # start NAME CMD...: a long-running process in its own session, logging to logs/NAME.log
  local name=$1; shift
  setsid "$@" >"$tmp/logs/$name.log" 2>&1 </dev/null &
  pids+=($!)
  disown $!  # its end (the check kills one replica) is ours to report, not the shell's
  eval "${name//-/_}_pid=$!"
}

container() {  # container NAME DOCKER-RUN-ARGS...: a container of the image (host network), like start
  local name=$1; shift
  docker run -d --name "$cprefix-$name" --network host --shm-size 1g -e RAY_AUTH_MODE -e RAY_AUTH_TOKEN \
    -e RAY_USAGE_STATS_ENABLED "$@" >/dev/null
  containers+=("$cprefix-$name")
  docker logs -f "$cprefix-$name" >"$tmp/logs/$name.log" 2>&1 &
  disown $!
  eval "${name//-/_}_pid=$(docker inspect -f '{{.State.Pid}}' "$cprefix-$name")"  # its init, on this host
}

ray_cli() {  # Ray's command line, where the cluster's nodes run
  if [ -n "$image" ]; then docker exec "$cprefix-ray-head" ray "$@"; else "$venv/bin/ray" "$@"; fi
}

wait_for() {  # wait_for WHAT SECONDS CMD...: until CMD succeeds
  local what=$1 seconds=$2; shift 2
  local end=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what not ready after ${seconds}s (logs: $tmp/logs)"
    sleep 1
  done
}

say "PostgreSQL ($pg_bin) as $pg_os_user on 127.0.0.1:$pg_port"
mkdir -p "$pg_dir"
printf '%s\n' "$pg_password" >"$pg_dir/pwfile"
chown -R "$pg_os_user" "$pg_dir"
as_pg "$pg_bin/initdb" -D "$pg_dir/data" -U munet --pwfile="$pg_dir/pwfile" --auth-local=trust \
  --auth-host=scram-sha-256 --encoding=UTF8 --no-locale >"$tmp/logs/initdb.log" 2>&1 || die "initdb (see $tmp/logs/initdb.log)"
as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
  -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1" start >/dev/null || die "PostgreSQL did not start ($pg_dir/server.log)"
as_pg "$pg_bin/createdb" -h "$pg_dir" -p "$pg_port" -U munet munet
"$pg_bin/psql" "$database_url" -Atc "select 'PostgreSQL ' || current_setting('server_version') || ' answers as ' || current_user" >&2

# ---- Ray --------------------------------------------------------------------------------------------
say "Ray head on $head_ip:$ray_port (0 CPUs), worker on $worker_ip ($ray_worker_cpus CPUs)"
head_args=(start --head --block --node-ip-address=$head_ip --port="$ray_port" --num-cpus=0 --include-dashboard=false
  --disable-usage-stats)
worker_args=(start --block --address="$head_ip:$ray_port" --node-ip-address=$worker_ip --num-cpus="$ray_worker_cpus"
  --disable-usage-stats)
if [ -n "$image" ]; then
  say "(as containers of $image)"
  container ray-head --entrypoint ray "$image" "${head_args[@]}"
  wait_for "the Ray head" 90 ray_cli health-check --address "$head_ip:$ray_port"
  container ray-worker --entrypoint ray "$image" "${worker_args[@]}"
else
  start ray-head "$venv/bin/ray" "${head_args[@]}" --temp-dir="$tmp/ray"
  wait_for "the Ray head" 90 ray_cli health-check --address "$head_ip:$ray_port"
  start ray-worker "$venv/bin/ray" "${worker_args[@]}"
fi
ray_python() {  # a Python that has Ray, where the cluster's nodes run
  if [ -n "$image" ]; then docker exec -i "$cprefix-ray-worker" python "$@"; else "$py" "$@"; fi
}
ray_nodes() {  # the cluster's live nodes and their CPUs, as one JSON line; fails until both nodes are up
  ray_python - "$head_ip:$ray_port" "$ray_worker_cpus" <<'EOF'
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
nodes = sorted((n["NodeManagerAddress"], n["Resources"].get("CPU", 0), n["NodeID"][:12]) for n in ray.nodes()
               if n["Alive"])
ray.shutdown()
print(json.dumps(nodes))
sys.exit(0 if len(nodes) >= 2 and nodes[1][1] == float(sys.argv[2]) else 1)
EOF
}
wait_for "the Ray worker" 90 ray_nodes
nodes=$(ray_nodes 2>/dev/null)
say "Ray nodes (address, CPUs, id): $nodes"
worker_node=$("$py" -c "import json, sys; print(json.loads(sys.argv[1])[1][2])" "$nodes")

if [ "$mode" = infra ]; then
  say "PASSED: PostgreSQL and Ray (head + worker) started and answered; stopping them"
  exit 0
fi

# ---- two replicas -------------------------------------------------------------------------------
replica_env=(
  MUNET_HOME="$tmp/store" MUNET_DATABASE_URL="$database_url"
  MUNET_EVOLUTION_BACKEND=ray MUNET_RAY_ADDRESS="$head_ip:$ray_port" MUNET_LEADER_LEASE_S="$lease_s"
  MUNET_ROOT=vit_tiny MUNET_DEMO_TASK=0
  # generations only when the check asks for them; any better candidate is promoted (small budgets)
  MUNET_EVOLVE_INTERVAL_S=3600 MUNET_PROMOTION_MARGIN_SE=0 MUNET_PROMOTION_MIN_MARGIN=0
)
replica() {  # replica NAME HTTP-PORT GRPC-PORT RAY-NODE-IP
  say "replica $1: HTTP 127.0.0.1:$2, gRPC 127.0.0.1:$3"
  if [ -n "$image" ]; then
    local e=() kv
    for kv in "${replica_env[@]}"; do e+=(-e "$kv"); done
    # compose.yaml's replica: join Ray as a node with no CPUs (a driver needs one beside it), then serve
    container "munet-$1" -v "$volume:/data" "${e[@]}" -e MUNET_HOME=/data -e MUNET_HOST=127.0.0.1 \
      -e MUNET_HTTP_PORT="$2" -e MUNET_GRPC_PORT="$3" -e MUNET_ADMIN_TOKEN --entrypoint /usr/bin/tini "$image" -- \
      /bin/sh -c "ray start --address=$head_ip:$ray_port --node-ip-address=$4 --num-cpus=0 --disable-usage-stats && exec munet serve"
  else
    start "munet-$1" env "${replica_env[@]}" "$venv/bin/munet" serve --http-port "$2" --grpc-port "$3"
  fi
  wait_for "replica $1" 240 "$venv/bin/munet" --target "127.0.0.1:$3" --timeout 5 health
}
replica a "$a_http" "$a_grpc" 127.0.0.4
# b after a, so that the first start of an empty store happens once (as compose.yaml orders them)
replica b "$b_http" "$b_grpc" 127.0.0.5

if [ "$mode" = up ]; then
  cat >&2 <<EOF

  munet-serve cluster up (Ctrl-C stops it and removes $tmp):
    export MUNET_TOKEN=$MUNET_ADMIN_TOKEN
    $venv/bin/munet --target 127.0.0.1:$a_grpc tasks list          # replica a (HTTP :$a_http)
    $venv/bin/munet --target 127.0.0.1:$b_grpc tasks list          # replica b (HTTP :$b_http)
    PostgreSQL: $database_url
    Ray: $head_ip:$ray_port (RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN)
    logs: $tmp/logs

EOF
  while :; do sleep 3600 & wait $!; done  # (wait, unlike a foreground sleep, lets the traps run at once)
fi

# ---- the check ----------------------------------------------------------------------------------
say "checking: register, evolve on Ray under load, both replicas serve the promotion, leader failover"
A_GRPC=127.0.0.1:$a_grpc B_GRPC=127.0.0.1:$b_grpc A_PID=$munet_a_pid B_PID=$munet_b_pid \
A_LOG=$tmp/logs/munet-a.log B_LOG=$tmp/logs/munet-b.log LEASE_S=$lease_s WORKER_NODE=$worker_node SAMPLE=$repo/docs/samples/digit-3-96px.jpg \
CANDIDATES=${CANDIDATES:-2} BUDGET_S=${BUDGET_S:-4} GENERATIONS=${GENERATIONS:-4} RESULT=$tmp/result.json \
  "$py" - <<'EOF'
import collections, json, os, re, signal, sys, threading, time

from munet.client import MunetClient, MunetClientError

env = os.environ
TOKEN, TASK, LEASE_S = env["MUNET_ADMIN_TOKEN"], "cluster-digits", float(env["LEASE_S"])
REPLICAS = {"a": (env["A_GRPC"], int(env["A_PID"]), env["A_LOG"]), "b": (env["B_GRPC"], int(env["B_PID"]), env["B_LOG"])}
IMAGE = open(env["SAMPLE"], "rb").read()
T0 = time.monotonic()
result = {"checks": {}}


def say(msg):
    print(f"{time.strftime('%H:%M:%S')} check [{time.monotonic() - T0:6.1f}s]: {msg}", file=sys.stderr, flush=True)


def check(name, ok, detail):
    result["checks"][name] = {"ok": bool(ok), "detail": detail}
    say(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        finish()


def finish():
    failed = [k for k, v in result["checks"].items() if not v["ok"]]
    result["passed"] = not failed
    json.dump(result, open(env["RESULT"], "w"), indent=2)
    print(json.dumps(result, indent=2))
    sys.exit(1 if failed else 0)


def client(name):
    return MunetClient(REPLICAS[name][0], token=TOKEN, timeout=30)


def until(what, seconds, f):
    end = time.monotonic() + seconds
    while True:
        try:
            value = f()
            if value:
                return value
        except MunetClientError:
            pass
        if time.monotonic() > end:
            return None
        time.sleep(0.2)


class Load:
    """Predict calls to some replicas, one thread each, until stopped (at most MAX_S seconds and
    MAX_CALLS calls per replica): counts answers, failures and the path versions that answered."""

    MAX_S, MAX_CALLS = 900.0, 100_000

    def __init__(self, names):
        self.stop_event = threading.Event()
        self.stats = {n: {"ok": 0, "failed": 0, "versions": collections.Counter(), "errors": []} for n in names}
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in names]
        for t in self.threads:
            t.start()

    def _run(self, name):
        s, c, end = self.stats[name], client(name), time.monotonic() + self.MAX_S
        while not self.stop_event.is_set() and time.monotonic() < end and s["ok"] + s["failed"] < self.MAX_CALLS:
            try:
                s["versions"][c.predict(TASK, IMAGE).version] += 1
                s["ok"] += 1
            except MunetClientError as e:
                s["failed"] += 1
                if len(s["errors"]) < 5:
                    s["errors"].append(f"{e.code}: {e}")
            time.sleep(0.02)

    def seen(self, name, version):
        return self.stats[name]["versions"][version] > 0

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join()
        return {n: {**s, "versions": dict(s["versions"])} for n, s in self.stats.items()}


def leader():
    """The replica that holds the evolution lease, by what each says of itself."""
    leading = []
    for name in REPLICAS:
        try:
            if client(name).evolution_status().leading:
                leading.append(name)
        except MunetClientError:
            pass
    return leading[0] if len(leading) == 1 else None


# 1. a task, registered on a, served by b (b follows the store)
a, b = client("a"), client("b")
t = a.register_task(TASK, builtin="uci_digits", root="vit_tiny")
v0 = t.current_version
served_b = until("b serves the task", 60, lambda: b.predict(TASK, IMAGE).version == v0)
check("registered and served by both replicas", served_b, f"{TASK} v{v0} registered on a; b answers with v{v0}")

# 2. evolution on Ray, under load on both replicas, until a generation promotes
lead = until("a leader", 3 * LEASE_S, leader)
check("one leader", lead, f"replica {lead} holds the evolution lease")
load = Load(["a", "b"])
promoted, reports = 0, []
for g in range(int(env["GENERATIONS"])):
    st = client(lead).trigger_evolution(TASK, int(env["CANDIDATES"]), float(env["BUDGET_S"]), wait=True)
    rep = st.triggered
    reports.append({"generation": rep.generation, "best": rep.best_score, "incumbent": rep.incumbent_score,
                    "promoted": rep.promoted, "version": rep.promoted_version, "error": rep.error,
                    "seconds": round(rep.seconds, 1)})
    say(f"generation {rep.generation}: best {rep.best_score:.4f} vs incumbent {rep.incumbent_score:.4f}, "
        f"promoted {rep.promoted} (v{rep.promoted_version}) {rep.error or ''}")
    if rep.promoted:
        promoted = rep.promoted_version
        break
result["generations"] = reports
check("a generation promoted", promoted, f"v{v0} -> v{promoted} after {len(reports)} generation(s)")

log = open(REPLICAS[lead][2], errors="replace").read()
on_ray = re.findall(r"ray pid \d+ on node (\w+)", log)
check("candidates trained on Ray", on_ray and set(on_ray) == {env["WORKER_NODE"]} and "evolution trains on Ray at" in log,
      f"{len(on_ray)} candidate(s) trained as Ray tasks, on node(s) {sorted(set(on_ray))} "
      f"(the worker: {env['WORKER_NODE']})")

both = until("both serve the promotion", 60,
             lambda: all(client(n).get_task(TASK).current_version == promoted and load.seen(n, promoted)
                         for n in ("a", "b")))
stats = load.stop()
result["load_during_evolution"] = stats
check("both replicas serve the promotion", both,
      ", ".join(f"{n}: versions answered {s['versions']}" for n, s in stats.items()))
failed = sum(s["failed"] for s in stats.values())
check("no failed request during evolution", failed == 0,
      f"{sum(s['ok'] for s in stats.values())} Predict calls answered, {failed} failed "
      f"{[e for s in stats.values() for e in s['errors']]}")

# 3. kill the leader; the other replica takes the lease, keeps serving, and evolves on Ray
other = "b" if lead == "a" else "a"
load = Load([other])


def process_tree(root):
    """root and all its descendants (BentoML's workers, the evolution worker), from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [p for p, pp in parent.items() if pp == pid]
    return out


# the whole replica dies at once, as with a lost machine: stopped first, so that none of its processes
# sees the others go (and lets go of the lease politely), then killed; the lease has to run out
doomed = process_tree(REPLICAS[lead][1])
for pid in doomed:
    os.kill(pid, signal.SIGSTOP)
for pid in doomed:
    os.kill(pid, signal.SIGKILL)
killed_at = time.monotonic()
say(f"killed the leader, replica {lead}: processes {doomed} (SIGSTOP, then SIGKILL)")
took = until("the lease moves", 3 * LEASE_S + 10, lambda: client(other).evolution_status().leading)
moved_after = time.monotonic() - killed_at
check("leadership moved", took, f"replica {other} leads {moved_after:.1f} s after the kill (lease {LEASE_S:g} s)")
st = client(other).trigger_evolution(TASK, 1, float(env["BUDGET_S"]), wait=True)
rep = st.triggered
check("the new leader evolves", rep is not None and not rep.error,
      f"generation {rep.generation} on replica {other}: best {rep.best_score:.4f}, promoted {rep.promoted}")
stats = load.stop()
result["load_during_failover"] = stats
failed = sum(s["failed"] for s in stats.values())
check("no failed request on the survivor", failed == 0 and stats[other]["ok"] > 0,
      f"{stats[other]['ok']} Predict calls answered by {other}, {failed} failed {stats[other]['errors']}")
finish()
EOF
