#!/usr/bin/env bash
# Builds libaex and runs the C and C++ hosts: dynamically and statically linked, under
# AddressSanitizer + UndefinedBehaviorSanitizer, and under valgrind when it is installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build -p aex-ffi --locked --quiet
lib="$root/target/debug"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -I "$root/include")
vectors=("$root"/tests/vectors/*.json)

cc "${cflags[@]}" tests/c/host.c -L "$lib" -laex -lpthread -o "$out/host-dynamic"
cc "${cflags[@]}" tests/c/host.c "$lib/libaex.a" -lpthread -ldl -lm -o "$out/host-static"
cc "${cflags[@]}" -g -fsanitize=address,undefined -fno-omit-frame-pointer tests/c/host.c -L "$lib" -laex -lpthread -o "$out/host-asan"
cc "${cflags[@]}" tests/c/vectors.c -L "$lib" -laex -lcjson -lpthread -o "$out/vectors"
cc "${cflags[@]}" tests/c/dispatch.c -L "$lib" -laex -lpthread -o "$out/dispatch"
c++ -std=c++17 -Wall -Wextra -Werror -pedantic -I "$root/include" tests/cpp/raii.cpp -L "$lib" -laex -lpthread -o "$out/raii"

export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$out/host-dynamic" "$(mktemp -d -p "$out")"
"$out/host-static" "$(mktemp -d -p "$out")"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$out/host-asan" "$(mktemp -d -p "$out")" | sed 's/^c-host:/c-host-asan:/'
"$out/vectors" "${vectors[@]}"
"$out/raii"

# Governed provider calls, against the tests' OpenAI-compatible server on 127.0.0.1.
python3 tests/python/provider.py > "$out/provider.url" 2>/dev/null &
provider=$!
trap 'kill "$provider" 2>/dev/null; rm -rf "$out"' EXIT
for _ in $(seq 100); do [ -s "$out/provider.url" ] && break; sleep 0.1; done
"$out/dispatch" "$(head -n 1 "$out/provider.url")"

if command -v valgrind >/dev/null 2>&1; then
  valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    "$out/host-dynamic" "$(mktemp -d -p "$out")" | sed 's/^c-host:/c-host-valgrind:/'
  valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    "$out/vectors" "${vectors[@]}" | sed 's/^c-vectors:/c-vectors-valgrind:/'
else
  echo "valgrind not installed: skipped the valgrind runs" >&2
fi
