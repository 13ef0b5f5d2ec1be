#!/bin/bash
# `make fuzz`: seeds each target's corpus from the test fixtures (once), then runs every target
# for FUZZ_SECONDS with libFuzzer (cargo-fuzz, nightly toolchain; no sanitizer: the code under
# test is safe Rust, and what a run looks for is panics, aborts, hangs and memory blow-ups).
# Crashes land in tests/fuzz/artifacts/<target>/; each one found becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-600}
TARGETS=${FUZZ_TARGETS:-request gguf safetensors config tokenizer stop}
CORPUS=.cache/fuzz-corpus
seed() { mkdir -p "$CORPUS/$1"; cp "${@:2}" "$CORPUS/$1/" 2>/dev/null || true; }
FIX=crates/model/tests/fixtures
seed config $FIX/tiny-gqa-tied/config.json $FIX/tiny-mha-untied/config.json .cache/models/smollm2-15x2-r0/config.json
seed safetensors $FIX/tiny-gqa-tied/model.safetensors $FIX/tiny-mha-untied/model.safetensors
seed tokenizer .cache/models/smollm2-15x2-r0/tokenizer.json
mkdir -p "$CORPUS/gguf" "$CORPUS/stop" "$CORPUS/request"
# The bundled GGUF's header and metadata (its first MiB; the tensors are not needed).
[ -f .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf ] &&
  head -c 1048576 .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf > "$CORPUS/gguf/smollm2-head"
printf '\x01STOP\xffHello ST\xffOP world' > "$CORPUS/stop/split"
printf '\x02</s>\xff\n\nUser:\xffanswer</\xffs> more' > "$CORPUS/stop/two"
# A GenerateRequest: prompt "hi", max_new_tokens 8, stop ["x"] (protobuf wire format).
printf '\x12\x02hi\x20\x08\x32\x01x' > "$CORPUS/request/basic"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
failed=0
summary=""
for t in $TARGETS; do
  echo "== $t: ${SECONDS_EACH}s"
  log=$(mktemp)
  set +e
  cargo +nightly fuzz run --fuzz-dir tests/fuzz -s none "$t" "$CORPUS/$t" -- \
    -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done|==|SUMMARY|.*panicked)" "$log" || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  corpus=$(ls "$CORPUS/$t" | wc -l)
  if [ $rc -eq 0 ]; then result=clean; else result="FAILED (rc $rc; see tests/fuzz/artifacts/$t)"; failed=1; tail -30 "$log"; fi
  summary+=$(printf '%-12s %8ss %12s %8s %10s  %s' "$t" "$SECONDS_EACH" "${execs:-?}" "${rss:-?}" "$corpus" "$result")$'\n'
  rm -f "$log"
done
printf '\n%-12s %9s %12s %8s %10s  %s\n' target time executions "rss MB" corpus result
printf '%s' "$summary"
exit $failed
