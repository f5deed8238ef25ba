#!/usr/bin/env bash
# Writes tests/fixtures/upgrade/NAME.tar.gz: a data directory left by an earlier build of Loom, for
# tests/upgrade.rs (which upgrades it with this build). Builds COMMIT's `loom` and `loom-mock` (in
# a worktree, with a target directory of their own under ~/.cache/loom), runs `loom serve` on a
# fresh data directory (embedded log, SQLite read models, archive, generated master key), creates
# a tenant and a key, sends a few requests of every kind through it, stops it with SIGTERM, and
# folds the same log into Postgres read models with that build's `loom replay` (dumped as
# `read-models-postgres.sql`), and packs the data directory with `fixture.json` (the commit, the
# tenant, its key, the trace ids).
#
#   infra/upgrade-fixture.sh COMMIT NAME      e.g. infra/upgrade-fixture.sh 5949397 2026-12-04
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: infra/upgrade-fixture.sh COMMIT NAME   (see the comment at the top)" >&2
    exit 2
fi
commit=$1
name=$2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    git -C "$root" worktree remove --force "$work/src" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

git -C "$root" worktree add --detach "$work/src" "$commit" >/dev/null
export CARGO_TARGET_DIR="$HOME/.cache/loom/upgrade-target"
cargo build --manifest-path "$work/src/Cargo.toml" --workspace --bins
bin="$CARGO_TARGET_DIR/debug"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() {
    for _ in $(seq 1 200); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "error: $1 did not answer" >&2
    return 1
}

mock_port=$(free_port)
"$bin/loom-mock" --listen "127.0.0.1:$mock_port" 2>"$work/mock.log" &
pids+=($!)
cat >"$work/loom.toml" <<EOF
[upstreams.mock]
provider = "openai_compatible"
base_url = "http://127.0.0.1:$mock_port/v1"

[models.fast]
deployments = [{ upstream = "mock", model = "m" }]
EOF

port=$(free_port)
base="http://127.0.0.1:$port"
admin=upgrade-fixture-admin
LOOM_ADMIN_TOKEN=$admin "$bin/loom" serve --data-dir "$work/data" --config "$work/loom.toml" \
    --listen "127.0.0.1:$port" 2>"$work/serve.log" &
server=$!
pids+=("$server")
wait_for "$base/health"

tenant=$(curl -fsS "$base/admin/tenants" -H "authorization: Bearer $admin" \
    -H 'content-type: application/json' -d '{"name":"acme"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tenant_id"])')
key=$(curl -fsS "$base/admin/keys" -H "authorization: Bearer $admin" \
    -H 'content-type: application/json' -d "{\"tenant_id\":\"$tenant\",\"name\":\"before the upgrade\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')

send() { # path, trace id, body
    curl -fsS "$base$1" -H "authorization: Bearer $key" -H "x-request-id: $2" \
        -H 'content-type: application/json' -d "$3" >/dev/null
}
chat='{"model":"fast","messages":[{"role":"user","content":"the heron flies at dawn"}]}'
send /v1/chat/completions upgrade-chat-1 "$chat"
send /v1/chat/completions upgrade-chat-2 "$chat"
send /v1/chat/completions upgrade-stream \
    '{"model":"fast","stream":true,"messages":[{"role":"user","content":"the heron flies at dawn"}]}'
send /v1/chat/completions upgrade-tools \
    '{"model":"fast","messages":[{"role":"user","content":"weather?"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{}}}}]}'
send /v1/embeddings upgrade-embedding '{"model":"fast","input":"the heron flies at dawn"}'
send /v1/messages upgrade-messages \
    '{"model":"fast","max_tokens":64,"messages":[{"role":"user","content":"the heron flies at dawn"}]}'

kill -TERM "$server"
wait "$server"

# The same log folded into Postgres read models by that build, as SQL (needs the Postgres that
# ./infra/test.sh starts: LOOM_TEST_DATABASE_URL, an admin URL).
admin_url=${LOOM_TEST_DATABASE_URL:?run with the variables ./infra/test.sh exports}
database=loom_upgrade_fixture_$$
psql -q "$admin_url" -c "CREATE DATABASE $database"
pg_url="${admin_url%/*}/$database"
"$bin/loom" replay --data-dir "$work/data" --read-models "$pg_url" >"$work/replay.log" 2>&1 ||
    { cat "$work/replay.log" >&2; exit 1; }
pg_dump --no-owner --no-privileges "$pg_url" >"$work/data/read-models-postgres.sql"
psql -q "$admin_url" -c "DROP DATABASE $database"

cat >"$work/data/fixture.json" <<EOF
{
  "commit": "$(git -C "$root" rev-parse "$commit")",
  "tenant_id": "$tenant",
  "key": "$key",
  "traces": ["upgrade-chat-1", "upgrade-chat-2", "upgrade-stream", "upgrade-tools", "upgrade-embedding", "upgrade-messages"],
  "prompt": "the heron flies at dawn"
}
EOF
mkdir -p "$root/tests/fixtures/upgrade"
tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner -czf \
    "$root/tests/fixtures/upgrade/$name.tar.gz" data
echo "wrote tests/fixtures/upgrade/$name.tar.gz ($(du -h "$root/tests/fixtures/upgrade/$name.tar.gz" | cut -f1))"
