#!/usr/bin/env bash
# Runs Loom's whole test suite against real dependencies, started here on 127.0.0.1:
#   - Postgres             (the machine's on :5432 if reachable, else a private cluster on :55432)
#   - a Kafka-protocol broker (nisshi, the Tansu broker, on :19092, in-memory storage)
#   - an S3-compatible server (s3s-fs on :19000)
# a Python virtualenv with the packages in infra/requirements-test.txt, and for the dashboard's
# browser tests Debian's chromium driven by the npm package playwright-core (no browser download).
# Missing tools are installed once into $LOOM_CACHE_DIR (default ~/.cache/loom) and reused;
# running services are reused. Their addresses are exported as LOOM_TEST_* for the tests.
#
# Environment:
#   LOOM_CACHE_DIR           tool binaries, build output, service data (default ~/.cache/loom)
#   CARGO_TARGET_DIR         build output (default $LOOM_CACHE_DIR/target)
#   LOOM_TEST_DATABASE_URL   use this Postgres (an admin URL: tests create databases) instead
#   LOOM_TEST_CHROMIUM       the Chromium binary for the browser tests (default /usr/bin/chromium)
#   LOOM_TEST_SKIP_LINT=1    skip cargo fmt --check and clippy
# Arguments are passed to the test runner (e.g. ./infra/test.sh -E 'test(serve)').
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${LOOM_CACHE_DIR:-$HOME/.cache/loom}"
tools="$cache/tools"
run="$cache/run"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
export PATH="$tools/bin:$HOME/.cargo/bin:$PATH"
mkdir -p "$tools" "$run"

NISSHI_VERSION=0.8.1
S3S_FS_VERSION=0.14.1
BROKER_PORT=19092
S3_PORT=19000
PG_PRIVATE_PORT=55432

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 name=$2 logfile=$3
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  tail -n 40 "$logfile" >&2 || true
  die "$name did not start listening on 127.0.0.1:$port (log: $logfile)"
}

# Starts a command detached from this shell, so that it outlives the script and is reused. It runs
# in the cache directory, not in this checkout: a server whose working directory is deleted (a
# removed worktree) fails requests (s3s-fs resolves paths against it).
start_detached() {
  local logfile=$1; shift
  (cd "$cache" && nohup setsid "$@" >"$logfile" 2>&1 < /dev/null &)
}

apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: no apt-get on this machine"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing $* (apt)"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# ---- Postgres ----------------------------------------------------------------------------------
postgres_url_works() { psql "$1" -Atqc 'select 1' >/dev/null 2>&1; }

start_private_postgres() {
  local bin pgdir="${LOOM_PG_DIR:-/var/tmp/loom-test-pg}"
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    apt_install postgresql
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  fi
  command -v psql >/dev/null || export PATH="$bin:$PATH"
  # initdb refuses to run as root: run the cluster as the postgres user then.
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    as=(runuser -u postgres --)
  fi
  if [ ! -f "$pgdir/PG_VERSION" ]; then
    log "creating a private Postgres cluster in $pgdir"
    mkdir -p "$pgdir"
    [ ${#as[@]} -eq 0 ] || chown postgres "$pgdir"
    "${as[@]}" "$bin/initdb" -D "$pgdir" -U postgres --auth=trust >/dev/null
  fi
  log "starting the private Postgres on 127.0.0.1:$PG_PRIVATE_PORT"
  "${as[@]}" "$bin/pg_ctl" -D "$pgdir" -l "$pgdir/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PRIVATE_PORT -k $pgdir -c max_connections=200" start >/dev/null
}

setup_postgres() {
  if [ -n "${LOOM_TEST_DATABASE_URL:-}" ]; then
    postgres_url_works "$LOOM_TEST_DATABASE_URL" || die "LOOM_TEST_DATABASE_URL does not answer"
    return
  fi
  command -v psql >/dev/null || apt_install postgresql-client
  local machine="postgres://postgres@127.0.0.1:5432/postgres"
  local private="postgres://postgres@127.0.0.1:$PG_PRIVATE_PORT/postgres"
  if postgres_url_works "$machine"; then
    export LOOM_TEST_DATABASE_URL="$machine"
  else
    postgres_url_works "$private" || start_private_postgres
    postgres_url_works "$private" || die "the private Postgres does not answer on :$PG_PRIVATE_PORT"
    export LOOM_TEST_DATABASE_URL="$private"
  fi
  log "Postgres: $LOOM_TEST_DATABASE_URL"
  # Databases left behind by an interrupted earlier run (tests drop their own when they pass).
  psql "$LOOM_TEST_DATABASE_URL" -Atqc "select datname from pg_database where datname like 'loom\_test\_%'" |
    while read -r db; do
      psql "$LOOM_TEST_DATABASE_URL" -qc "drop database if exists \"$db\" with (force)" >/dev/null
    done
}

# ---- tools built from crates.io ------------------------------------------------------------------
install_tool() {
  local bin=$1 version=$2; shift 2
  if [ -x "$tools/bin/$bin" ] && "$tools/bin/$bin" --version 2>/dev/null | grep -q "$version"; then
    return
  fi
  log "building $bin $version (once; cached in $tools)"
  cargo "$@" --version "$version" --locked --root "$tools" >"$run/install-$bin.log" 2>&1 \
    || { tail -n 30 "$run/install-$bin.log" >&2; die "could not install $bin"; }
}

setup_broker() {
  # nisshi needs a newer rustc than stable here; the machine's nightly toolchain has it. The spool
  # tests start brokers of their own from this binary (LOOM_TEST_NISSHI).
  install_tool nisshi "$NISSHI_VERSION" +nightly install nisshi
  export LOOM_TEST_NISSHI="$tools/bin/nisshi"
  if ! port_open "$BROKER_PORT"; then
    log "starting the Kafka-protocol broker (nisshi) on 127.0.0.1:$BROKER_PORT"
    start_detached "$run/nisshi.log" "$tools/bin/nisshi" broker \
      --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
      --storage-engine memory://nisshi/ \
      --group-initial-rebalance-delay 0s
    wait_for_port "$BROKER_PORT" nisshi "$run/nisshi.log"
  fi
  export LOOM_TEST_KAFKA_BROKERS="127.0.0.1:$BROKER_PORT"
  log "Kafka-protocol broker: $LOOM_TEST_KAFKA_BROKERS"
}

setup_s3() {
  export LOOM_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
  export LOOM_TEST_S3_BUCKET=loom-test
  export LOOM_TEST_S3_REGION=us-east-1
  export LOOM_TEST_S3_ACCESS_KEY_ID=loomtest
  export LOOM_TEST_S3_SECRET_ACCESS_KEY=loomtestsecret
  # The archive's outage test starts an S3 server of its own from this binary (LOOM_TEST_S3S_FS).
  install_tool s3s-fs "$S3S_FS_VERSION" install s3s-fs --features binary
  export LOOM_TEST_S3S_FS="$tools/bin/s3s-fs"
  if ! port_open "$S3_PORT"; then
    mkdir -p "$run/s3/$LOOM_TEST_S3_BUCKET"
    log "starting the S3-compatible server (s3s-fs) on 127.0.0.1:$S3_PORT"
    start_detached "$run/s3s-fs.log" "$tools/bin/s3s-fs" --host 127.0.0.1 --port "$S3_PORT" \
      --access-key "$LOOM_TEST_S3_ACCESS_KEY_ID" --secret-key "$LOOM_TEST_S3_SECRET_ACCESS_KEY" "$run/s3"
    wait_for_port "$S3_PORT" s3s-fs "$run/s3s-fs.log"
  fi
  # An unsigned request must be refused: the port is an S3 server that checks signatures.
  local status
  status="$(curl -s -o /dev/null -w '%{http_code}' "$LOOM_TEST_S3_ENDPOINT/$LOOM_TEST_S3_BUCKET/" || true)"
  case "$status" in
    403) ;;
    *) die "127.0.0.1:$S3_PORT answered $status to an unsigned request; expected an S3 server's 403" ;;
  esac
  log "S3-compatible server: $LOOM_TEST_S3_ENDPOINT (bucket $LOOM_TEST_S3_BUCKET)"
}

# ---- Python (an independent Avro reader; the SDK clients later) ------------------------------------
setup_python() {
  local venv="$cache/venv" requirements="$repo/infra/requirements-test.txt" stamp
  stamp="$(sha256sum "$requirements" | cut -d' ' -f1)"
  if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$stamp" ]; then
    log "installing the test's Python packages into $venv"
    command -v python3 >/dev/null || apt_install python3 python3-venv
    python3 -m venv "$venv" || { apt_install python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
    echo "$stamp" > "$venv/.requirements"
  fi
  export LOOM_TEST_PYTHON="$venv/bin/python"
  log "Python: $LOOM_TEST_PYTHON"
}

# ---- a browser for the dashboard's tests, and node tools ------------------------------------------
# playwright-core drives Debian's chromium (it downloads no browser); dclint checks the compose
# file against the Compose specification (tests/deploy.rs).
NODE_PACKAGES="playwright-core@1.65 dclint@3.1.0"
setup_browser() {
  local chromium="${LOOM_TEST_CHROMIUM:-/usr/bin/chromium}" modules="$cache/node"
  [ -x "$chromium" ] || { apt_install chromium; chromium=/usr/bin/chromium; }
  command -v node >/dev/null || apt_install nodejs npm
  if [ "$(cat "$modules/.packages" 2>/dev/null)" != "$NODE_PACKAGES" ]; then
    log "installing $NODE_PACKAGES (npm)"
    mkdir -p "$modules"
    # shellcheck disable=SC2086 # one word per package
    (cd "$modules" && npm install --silent --no-audit --no-fund $NODE_PACKAGES >/dev/null)
    echo "$NODE_PACKAGES" > "$modules/.packages"
  fi
  export LOOM_TEST_CHROMIUM="$chromium" LOOM_TEST_NODE_PATH="$modules/node_modules"
  log "browser: $("$chromium" --version 2>/dev/null | head -1); node packages: $NODE_PACKAGES"
}

# ---- build prerequisites -----------------------------------------------------------------------
setup_build() {
  # librdkafka is built with TLS (and so SASL PLAIN/SCRAM) against the system OpenSSL.
  if ! pkg-config --exists openssl 2>/dev/null; then
    apt_install pkg-config libssl-dev
  fi
}

# ---- run ----------------------------------------------------------------------------------------
main() {
  cd "$repo"
  local started=$SECONDS
  setup_build
  setup_postgres
  setup_broker
  setup_s3
  setup_python
  setup_browser
  log "dependencies ready in $((SECONDS - started))s; building with CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

  if [ "${LOOM_TEST_SKIP_LINT:-0}" != 1 ]; then
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --quiet -- -D warnings
  fi

  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
  else
    cargo test --workspace --no-fail-fast "$@"
  fi
  log "test suite finished in $((SECONDS - started))s"
}

# Sourcing this file (to reuse its setup functions) runs nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
