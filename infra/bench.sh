#!/usr/bin/env bash
# Runs Loom's benchmarks in release mode: ./infra/bench.sh [codec|log|gateway|kafka|projector|archive] [args…]
# With no argument: codec, log, gateway and archive (kafka needs a broker, projector a Postgres:
# ./infra/test.sh starts both). Installs the load generator (oha) once into $LOOM_CACHE_DIR, and
# nginx (the reverse-proxy baseline) from Debian's packages when it can.
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
cd "$(dirname "$here")"
cargo build --release --workspace --quiet
loom="$CARGO_TARGET_DIR/release/loom"
if [ $# -eq 0 ]; then
  for what in codec log gateway archive; do "$loom" bench "$what"; echo; done
else
  "$loom" bench "$@"
fi
