# Sourced by scripts/bench when BENCH_INSTRUCTIONS is set: the instructions each proxy
# executes per unary call (FindDefaultBranchName, one connection, one call in flight, or
# BENCH_INSTRUCTIONS_INFLIGHT), counted by valgrind's callgrind. With many in flight, the
# proxy under valgrind runs far slower than the load, so it reads more calls per wake-up than
# it would natively: the per-connection work looks cheaper than it is, the per-call work (the
# router's own) does not.
#
# Why: CPU time per call on a shared VM swings by 2-3x between runs (steal time, kernel time
# that follows the neighbours), and this machine has no hardware counters for perf. An
# instruction count is the same from run to run within a fraction of a percent, so a change
# that saves 2% shows as 2% here, where the CPU-time columns cannot tell it from noise. It does
# not see cache misses or system calls: it complements the CPU-time table, it does not replace
# it.
#
# For each proxy a second copy is started under callgrind on a spare port (the router with the
# same configuration but its own listen address), warmed up, then counted over
# BENCH_INSTRUCTIONS calls. The copy's background work (health checks, the cache listener) is
# counted over an idle stretch of the same length and subtracted. Writes under
# target/bench/instructions/:
#   NAME.callgrind   the raw profile (callgrind_annotate / kcachegrind can open it)
#   NAME.top.txt     functions by inclusive instructions, per call
# Needs valgrind (Debian: valgrind).
#
# Expects from scripts/bench: bin, state, pin_proxy, wait_port, unary_h2load_args, pids, and the
# configurations it wrote ($state/praefect.toml, $state/haproxy/haproxy.cfg).

instructions_dir="$state/instructions"

# count_instructions NAME PORT TOKEN STORAGE RELATIVE_PATH -- COMMAND...: starts COMMAND (which
# listens on PORT) under callgrind and prints the instructions per call.
count_instructions() {
  local name=$1 port=$2 auth=$3 storage=$4 path=$5
  shift 6
  local calls="${BENCH_INSTRUCTIONS:-2000}" out="$instructions_dir/$name.callgrind"
  local request="$instructions_dir/request-$name.bin" args result pid started seconds loaded idle
  rm -f "$out" "$out".*
  "${pin_proxy[@]}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$@" > "$instructions_dir/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  if ! wait_port "$port" "$pid" 120; then
    echo "bench: $name did not start under valgrind:" >&2
    tail -20 "$instructions_dir/$name.log" >&2
    return 1
  fi
  unary_h2load_args "$request" "${BENCH_INSTRUCTIONS_INFLIGHT:-1}" "$port" "$auth" "$storage" "$path"
  args=("${h2load_args[@]}")
  "${pin_proxy[@]}" h2load -n 300 "${args[@]}" >/dev/null # warm-up (and lazy set-up)
  callgrind_control -i on "$pid" >/dev/null
  started=$EPOCHREALTIME
  result=$("${pin_proxy[@]}" h2load -n "$calls" "${args[@]}")
  grep -q ' 0 failed, 0 errored, 0 timeout' <<<"$result" ||
    echo "bench: $name: some calls failed" >&2
  seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
  callgrind_control -d "$pid" >/dev/null
  # The same stretch without calls: what the process does on its own meanwhile.
  sleep "$seconds"
  callgrind_control -d "$pid" >/dev/null
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
  loaded=$(awk '/^totals:/ { print $2 }' "$out.1")
  idle=$(awk '/^totals:/ { print $2 }' "$out.2")
  mv "$out.1" "$out"
  callgrind_annotate --inclusive=yes "$out" 2>/dev/null |
    awk -v n="$calls" '/^ *[0-9,]+ \(/ && shown < 60 { v = $1; gsub(",", "", v)
      sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, ""); printf "%9.0f  %s\n", v / n, $0; shown++ }' \
      > "$instructions_dir/$name.top.txt"
  awk -v n="$name" -v c="$calls" -v l="$loaded" -v i="$idle" -v s="$seconds" \
    'BEGIN { printf "%-8s %9.0f instructions/call  (%d calls in %.1f s; %.0f/call of background work subtracted)\n",
      n, (l - i) / c, c, s, i / c }'
  echo "$name $(awk -v c="$calls" -v l="$loaded" -v i="$idle" 'BEGIN { printf "%.0f", (l - i) / c }')" \
    >> "$instructions_dir/summary"
}

run_instruction_counts() {
  local relay_spare=$((relay_port + 10)) haproxy_spare=$((haproxy_port + 10))
  local router_spare=$((router_port + 10))
  command -v callgrind_control >/dev/null 2>&1 ||
    { echo "bench: valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
  mkdir -p "$instructions_dir"
  : > "$instructions_dir/summary"
  echo "== instructions per call: FindDefaultBranchName, ${BENCH_INSTRUCTIONS_INFLIGHT:-1} in flight, ${BENCH_INSTRUCTIONS} calls counted by callgrind"
  sed "s/127.0.0.1:$router_port/127.0.0.1:$router_spare/" "$state/praefect.toml" \
    > "$instructions_dir/praefect.toml"
  count_instructions router "$router_spare" "$token" default bench.git -- \
    "$bin/praefect" -config "$instructions_dir/praefect.toml"
  if [ -n "$haproxy_pid" ]; then
    sed "s/127.0.0.1:$haproxy_port/127.0.0.1:$haproxy_spare/" "$state/haproxy/haproxy.cfg" \
      > "$instructions_dir/haproxy.cfg"
    count_instructions haproxy "$haproxy_spare" "$node_token" gitaly-1 "$replica" -- \
      "$haproxy_bin" -db -f "$instructions_dir/haproxy.cfg"
  fi
  if [ -n "$relay_pid" ]; then
    count_instructions h2relay "$relay_spare" "$node_token" gitaly-1 "$replica" -- \
      "$bin/h2-relay" "127.0.0.1:$relay_spare" "127.0.0.1:$node_port"
  fi
  awk '{ v[$1] = $2 }
    END {
      if (v["haproxy"] > 0) printf "router/HAProxy instructions per call: %.2f\n", v["router"] / v["haproxy"]
      if (v["h2relay"] > 0) printf "router/h2-relay instructions per call: %.2f\n", v["router"] / v["h2relay"]
      if (v["haproxy"] > 0 && v["h2relay"] > 0) printf "h2-relay/HAProxy instructions per call: %.2f\n", v["h2relay"] / v["haproxy"]
    }' "$instructions_dir/summary"
  echo "profiles and top functions in $instructions_dir"
}
