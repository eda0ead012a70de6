#!/usr/bin/env bash
# The shared scenario vectors through the C API on the fleet store: each vector on a new
# database of the PostgreSQL server AEX_TEST_POSTGRES names (an admin URL).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
admin=${AEX_TEST_POSTGRES:?an admin URL of a PostgreSQL server}
cargo build -p aex-ffi --locked --quiet
lib="$root/target/debug"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cc -std=c11 -Wall -Wextra -Werror -pedantic -I "$root/include" tests/c/vectors.c -L "$lib" -laex -lcjson -lpthread -o "$out/vectors"
vectors=("$root"/tests/vectors/*.json)
psql=$(ls /usr/lib/postgresql/*/bin/psql | sort -V | tail -1)
dbs=()
for i in "${!vectors[@]}"; do
  name="aex_c_$$_$i"
  "$psql" "$admin" -qc "CREATE DATABASE $name"
  dbs+=("${admin%/*}/$name")
done
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" AEX_TEST_POSTGRES_DBS="${dbs[*]}" "$out/vectors" "${vectors[@]}"
