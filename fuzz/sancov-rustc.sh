#!/usr/bin/env bash
# RUSTC_WRAPPER for fuzz/run.sh: SanitizerCoverage (what cargo-fuzz passes: inline 8-bit
# counters, PC table, comparison tracing) only for the crates whose code the harnesses
# explore — the product's and the parsers it calls — so libFuzzer's feedback is about them,
# and the rest of the tree compiles as usual (and faster). Only code for the --target that
# run.sh names: host code (build scripts, proc macros) must load without libFuzzer.
rustc=$1
shift
name=
target=
prev=
for a in "$@"; do
  [ "$prev" = --crate-name ] && name=$a
  [ "$prev" = --target ] && target=$a
  prev=$a
done
[ -n "$target" ] || exec "$rustc" "$@"
case "$name" in
  ambient_fuzz | ambient_cni | ambient_net | ztunnel | waypoint | serde_json | serde_yaml_ng | \
    unsafe_libyaml | serde_path_to_error | http | ipnet)
    exec "$rustc" "$@" -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares
    ;;
  *) exec "$rustc" "$@" ;;
esac
