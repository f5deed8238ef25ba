#!/usr/bin/env bash
# Runs Loom's benchmarks in release mode:
#   ./infra/bench.sh [codec|log|gateway|quota|policy|kafka|projector|archive|query|ui] [args…]
# With no argument: codec, log, gateway, policy and archive (kafka needs a broker, projector a Postgres:
# ./infra/test.sh starts both; query takes a while: 10M events). Installs the load generator
# (oha) once into $LOOM_CACHE_DIR, nginx (the reverse-proxy baseline) from Debian's packages
# when it can, and DuckDB (the query baseline, PyPI) into a Python venv of its own.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${LOOM_CACHE_DIR:-$HOME/.cache/loom}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
OHA_VERSION=1.16.0
if ! "$cache/tools/bin/oha" --version 2>/dev/null | grep -q "$OHA_VERSION"; then
  echo "==> building oha $OHA_VERSION (once)" >&2
  cargo install oha --version "$OHA_VERSION" --locked --root "$cache/tools" >&2
fi
export LOOM_OHA="$cache/tools/bin/oha"
# nginx, the plain reverse proxy `bench gateway` compares with (Debian's package).
if ! command -v nginx >/dev/null && [ -x /usr/sbin/nginx ]; then export PATH="$PATH:/usr/sbin"; fi
if ! command -v nginx >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing nginx (once)" >&2
  apt-get install -y --no-install-recommends nginx-light >&2 || apt-get install -y --no-install-recommends nginx >&2
  # The package starts a server on port 80; the benchmark runs its own on loopback.
  nginx -s stop 2>/dev/null || pkill -x nginx || true
fi
# DuckDB, the plain alternative `bench query` compares with (PyPI).
if [ "${1:-}" = query ]; then
  venv="$cache/bench-venv"
  if ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
    echo "==> installing duckdb into $venv (once)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check duckdb >&2
  fi
  export LOOM_BENCH_PYTHON="$venv/bin/python"
fi
# The quota bench's burst runs gateways on a Kafka-protocol broker with a Postgres key store: the
# ones ./infra/test.sh starts (reused when running).
if [ "${1:-}" = quota ]; then
  # shellcheck source=infra/test.sh
  source "$here/test.sh"
  setup_postgres
  setup_broker
  export LOOM_KAFKA_BROKERS="$LOOM_TEST_KAFKA_BROKERS" LOOM_KEY_STORE_URL="$LOOM_TEST_DATABASE_URL"
fi
cd "$(dirname "$here")"
cargo build --release --workspace --quiet
loom="$CARGO_TARGET_DIR/release/loom"
if [ $# -eq 0 ]; then
  for what in codec log gateway policy archive; do "$loom" bench "$what"; echo; done
else
  "$loom" bench "$@"
fi
