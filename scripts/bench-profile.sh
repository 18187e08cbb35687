# Sourced by scripts/bench when BENCH_PROFILE is set: CPU profiles of the router and of HAProxy
# under the same unary load (FindDefaultBranchName, one connection, one call in flight), with
# the same pinning as the unary phase.
#
# For each proxy it prints the CPU per call split into user and kernel time (from /proc, the
# profiler off), then records `perf record --call-graph dwarf` during a second run of the same
# load and writes, under target/bench/profile/:
#   NAME.folded      the folded stacks (inferno-collapse-perf --all: kernel frames end in _[k])
#   NAME.svg         the flame graph (inferno-flamegraph)
#   NAME.crates.txt  the share of samples by the crate (or library) of the innermost frame
# Needs perf (Debian: linux-perf) and inferno (cargo install inferno).
#
# Expects from scripts/bench: bin, state, pin_proxy, unary_h2load_args.

# profile_unary NAME PID PORT TOKEN STORAGE RELATIVE_PATH
profile_unary() {
  local name=$1 pid=$2 port=$3 auth=$4 storage=$5 path=$6
  local seconds="${BENCH_PROFILE:-10}" out="$state/profile" request args
  local before_user before_sys after_user after_sys calls
  mkdir -p "$out"
  request="$out/request-$name.bin"
  "$bin/gitaly-bench" --plain "tcp://127.0.0.1:$port" "$auth" "$storage" "$path" 1 0 >/dev/null
  unary_h2load_args "$request" 1 "$port" "$auth" "$storage" "$path"
  args=("${h2load_args[@]}")
  "${pin_proxy[@]}" h2load -n 2000 "${args[@]}" >/dev/null # warm-up
  read -r before_user before_sys < <(awk '{print $14, $15}' "/proc/$pid/stat")
  calls=$("${pin_proxy[@]}" h2load -D "$seconds" "${args[@]}" |
    awk '/^requests:/ { print $8 }')
  read -r after_user after_sys < <(awk '{print $14, $15}' "/proc/$pid/stat")
  # Clock ticks (1/100 s) to microseconds per call.
  awk -v n="$name" -v c="$calls" -v u=$((after_user - before_user)) -v s=$((after_sys - before_sys)) \
    'BEGIN { printf "%-8s %8d calls  CPU %6.1f us/call  user %6.1f  kernel %6.1f\n",
      n, c, (u + s) * 10000 / c, u * 10000 / c, s * 10000 / c }'
  perf record -q -F 999 --call-graph dwarf,16384 -p "$pid" -o "$out/$name.perf" \
    -- sleep "$seconds" >/dev/null 2>&1 &
  local perf_pid=$!
  sleep 0.5
  "${pin_proxy[@]}" h2load -D "$((seconds - 1))" "${args[@]}" >/dev/null
  wait "$perf_pid" || true
  perf script -i "$out/$name.perf" 2>/dev/null | inferno-collapse-perf --all > "$out/$name.folded"
  inferno-flamegraph --title "$name: FindDefaultBranchName, 1 call in flight" \
    < "$out/$name.folded" > "$out/$name.svg"
  crate_shares "$out/$name.folded" > "$out/$name.crates.txt"
  head -8 "$out/$name.crates.txt" | sed "s/^/  $name  /"
}

# crate_shares FOLDED: percent of samples by the crate of the innermost frame ("kernel" for
# kernel frames, the frame itself for C functions such as memmove).
crate_shares() {
  awk '{
      count = $NF; stack = substr($0, 1, length($0) - length(count) - 1)
      n = split(stack, frames, ";"); leaf = frames[n]
      if (leaf ~ /_\[k\]$/) crate = "kernel"
      else {
        sub(/^[<&]+/, "", leaf); crate = leaf
        if (match(leaf, /::/)) crate = substr(leaf, 1, RSTART - 1)
      }
      by[crate] += count; total += count
    }
    END { for (c in by) printf "%6.2f%%  %s\n", 100 * by[c] / total, c }' "$1" | sort -rn
}
