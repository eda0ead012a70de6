#!/usr/bin/env bash
# Builds libaex and runs the C and C++ hosts: dynamically and statically linked, under
# AddressSanitizer + UndefinedBehaviorSanitizer, and under valgrind when it is installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build -p aex-ffi --locked --quiet
lib="$root/target/debug"
static=$(scripts/staticlib)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -I "$root/include")
vectors=("$root"/tests/vectors/*.json)

cc "${cflags[@]}" tests/c/host.c -L "$lib" -laex -lpthread -o "$out/host-dynamic"
cc "${cflags[@]}" tests/c/host.c "$static" -lpthread -ldl -lm -o "$out/host-static"
cc "${cflags[@]}" -g -fsanitize=address,undefined -fno-omit-frame-pointer tests/c/host.c -L "$lib" -laex -lpthread -o "$out/host-asan"
cc "${cflags[@]}" tests/c/vectors.c -L "$lib" -laex -lcjson -lpthread -o "$out/vectors"
cc "${cflags[@]}" tests/c/dispatch.c -L "$lib" -laex -lpthread -o "$out/dispatch"
cc "${cflags[@]}" tests/c/edges.c -L "$lib" -laex -lpthread -o "$out/edges-dynamic"
cc "${cflags[@]}" tests/c/edges.c "$static" -lpthread -ldl -lm -o "$out/edges-static"
cc "${cflags[@]}" -g -fsanitize=address,undefined -fno-omit-frame-pointer tests/c/edges.c -L "$lib" -laex -lpthread -o "$out/edges-asan"
# The header in the oldest dialects a host may use, with -fshort-enums (no struct may change).
cc -std=c89 -pedantic -Wall -Wextra -Werror -fshort-enums -I "$root/include" tests/c/c89.c -L "$lib" -laex -lpthread -o "$out/c89"
c++ -x c++ -std=c++98 -pedantic -Wall -Wextra -Werror -fshort-enums -I "$root/include" tests/c/c89.c -L "$lib" -laex -lpthread -o "$out/cpp98"
# Hosts with SQLite of their own beside libaex: the system's shared library, and its static one
# (which does not link at all if libaex.a exports SQLite's symbols).
cc "${cflags[@]}" tests/c/two_sqlites.c -L "$lib" -laex -lsqlite3 -lpthread -o "$out/two-sqlites-dynamic"
cc "${cflags[@]}" tests/c/two_sqlites.c "$static" -l:libsqlite3.a -lpthread -ldl -lm -o "$out/two-sqlites-static"
c++ -std=c++17 -Wall -Wextra -Werror -pedantic -I "$root/include" tests/cpp/raii.cpp -L "$lib" -laex -lpthread -o "$out/raii"

export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$out/host-dynamic" "$(mktemp -d -p "$out")"
"$out/host-static" "$(mktemp -d -p "$out")"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$out/host-asan" "$(mktemp -d -p "$out")" | sed 's/^c-host:/c-host-asan:/'
"$out/vectors" "${vectors[@]}"
"$out/raii"
"$out/c89"
"$out/cpp98"

leaked=$(nm -g --defined-only "$static" | awk 'NF == 3 && $3 !~ /^aex_/ { n++ } END { print n + 0 }')
if [ "$leaked" -ne 0 ]; then
  nm -g --defined-only "$static" | awk 'NF == 3 && $3 !~ /^aex_/' | head >&2
  echo "c-staticlib: 0 passed, 1 failed"
  exit 1
fi
echo "c-staticlib: 1 passed, 0 failed"
for variant in dynamic static; do
  dir=$(mktemp -d -p "$out")
  # The workload ends by killing itself (SIGKILL, status 137) once aex acknowledged every write.
  set +e; "$out/two-sqlites-$variant" work "$dir"; rc=$?; set -e
  if [ "$rc" -ne 137 ]; then echo "two-sqlites-$variant: workload ended with status $rc" >&2; exit 1; fi
  "$out/two-sqlites-$variant" check "$dir" | sed "s/^two-sqlites:/two-sqlites-$variant:/"
done
# The control: with SQLite's classic locks the same workload does lose acknowledged writes, so
# the runs above would have seen it.
dir=$(mktemp -d -p "$out")
set +e
AEX_UNSAFE_CLASSIC_LOCKS=1 "$out/two-sqlites-dynamic" work "$dir"
"$out/two-sqlites-dynamic" check "$dir" 2>/dev/null
rc=$?
set -e
if [ "$rc" -eq 0 ]; then
  echo "two-sqlites-control: 0 passed, 1 failed"
  echo "two-sqlites-control: classic locks lost nothing, so this test cannot see the hazard" >&2
  exit 1
fi
echo "two-sqlites-control: 1 passed, 0 failed"

# Governed provider calls, against the tests' OpenAI-compatible server on 127.0.0.1.
python3 tests/python/provider.py > "$out/provider.url" 2>/dev/null &
provider=$!
trap 'kill "$provider" 2>/dev/null; rm -rf "$out"' EXIT
for _ in $(seq 100); do [ -s "$out/provider.url" ] && break; sleep 0.1; done
"$out/dispatch" "$(head -n 1 "$out/provider.url")"
# Governed calls at their edges (cut, stalled, refused; close, free and nested calls from
# callbacks and other threads; fork), against a loopback provider of the test's own. Timing
# checks make it unfit for valgrind; ASan covers its memory.
"$out/edges-dynamic" "$(mktemp -d -p "$out")"
"$out/edges-static" "$(mktemp -d -p "$out")" | sed 's/^c-edges:/c-edges-static:/'
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$out/edges-asan" "$(mktemp -d -p "$out")" | sed 's/^c-edges:/c-edges-asan:/'

if command -v valgrind >/dev/null 2>&1; then
  valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    "$out/host-dynamic" "$(mktemp -d -p "$out")" | sed 's/^c-host:/c-host-valgrind:/'
  valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    "$out/vectors" "${vectors[@]}" | sed 's/^c-vectors:/c-vectors-valgrind:/'
else
  echo "valgrind not installed: skipped the valgrind runs" >&2
fi
