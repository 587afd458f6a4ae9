#!/usr/bin/env bash
# Builds the fuzz harnesses and runs each for <seconds>; exits non-zero on the first crash
# (the input is kept in fuzz/artifacts/<harness>/, the log in fuzz/work/<harness>.log).
#   fuzz/run.sh <seconds> [harness ...]      default: every harness, one after the other
#   FUZZ_PROFILE=release fuzz/run.sh 600     optimised build (long runs); default: ci
#   FUZZ_JOBS=2 fuzz/run.sh 600              run two harnesses at a time
# Plain cargo and libFuzzer (libfuzzer-sys) with SanitizerCoverage: the stable toolchain as
# it is, nothing to install but a C++ compiler (libfuzzer-sys builds libFuzzer). Seeds are
# corpus/<harness>/ (read only); what a run finds goes to work/<harness>/, so later runs
# start from it.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?usage: fuzz/run.sh <seconds> [harness ...]}
shift
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(cni_input agent_request ztunnel_config waypoint_config hbone_connect)
profile=${FUZZ_PROFILE:-ci}
jobs=${FUZZ_JOBS:-1}
# An explicit --target keeps host code (build scripts, proc macros) apart from the
# instrumented target code.
triple=$(rustc -vV | sed -n 's/^host: //p')

# Coverage instrumentation for the product's crates and its parsers only (sancov-rustc.sh).
export RUSTC_WRAPPER="$PWD/sancov-rustc.sh"
unset RUSTFLAGS
export CARGO_TARGET_DIR="$PWD/target"
t0=$(date +%s)
bins=()
for h in "${harnesses[@]}"; do bins+=(--bin "$h"); done
cargo build --profile "$profile" --target "$triple" "${bins[@]}"
echo "fuzz: built ${#harnesses[@]} harness(es) ($profile) in $(( $(date +%s) - t0 )) s" >&2

run_one() {
  local h=$1 log=work/$1.log
  mkdir -p "work/$h" "artifacts/$h"
  if "target/$triple/$profile/$h" -max_total_time="$secs" -max_len=16384 -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$h/" \
      "work/$h" "corpus/$h" >"$log" 2>&1; then
    local execs corp
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    corp=$(ls "work/$h" | wc -l)
    echo "fuzz: $h: ${secs} s, ${execs:-?} execs, 0 crashes ($corp inputs in fuzz/work/$h)"
  else
    echo "fuzz: $h: CRASH (exit $?); input in fuzz/artifacts/$h/, log fuzz/$log:" >&2
    grep -E -A12 "panicked|ERROR: libFuzzer|deadly signal" "$log" | head -40 >&2
    return 1
  fi
}

fail=0
pids=()
for h in "${harnesses[@]}"; do
  run_one "$h" & pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then wait "${pids[0]}" || fail=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
exit $fail
