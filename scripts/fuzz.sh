#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/, libFuzzer through cargo-fuzz, stable toolchain) one after the
# other, each until it has executed RUNS inputs or MAX_TIME seconds have passed, growing
# fuzz/corpus/<target> from fuzz/seeds/<target>; then minimizes each corpus (what is committed)
# and prints one table row per target for docs/RELIABILITY.md. A crash stops the script with the
# failing input in fuzz/artifacts/<target>/ and its log in target/fuzz-logs/<target>.log.
#
#   scripts/fuzz.sh                        # every target, 10 M executions each
#   scripts/fuzz.sh --runs 100000 oauth_answer scrub_stream
#   scripts/fuzz.sh --time 600             # at most 10 minutes each
#
# The test suite does not run this (it takes hours on 2 cores); it replays the committed corpora
# through the same checks instead (tests/fuzz_replay.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=10000000
max_time=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --time) max_time="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --version 0.13.2
fi

known=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^ephyr-fuzz$')
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets <<<"$known"
fi
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$known" || { echo "fuzz.sh: no target $t (known: $(echo $known))" >&2; exit 2; }
done

mkdir -p target/fuzz-logs
# Built once; the binaries are run directly so that a change to the tree during a long
# campaign does not rebuild (and so change) what is being fuzzed.
(cd fuzz && cargo fuzz build --sanitizer none)
bin_dir="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

echo "| target | runs | time (s) | execs/s | coverage (cov / ft) | corpus (minimized) |"
echo "|---|---|---|---|---|---|"
for t in "${targets[@]}"; do
    log="target/fuzz-logs/$t.log"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    start=$(date +%s)
    if ! "$bin_dir/$t" -artifact_prefix="fuzz/artifacts/$t/" -runs="$runs" -max_total_time="$max_time" \
        -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 "fuzz/corpus/$t" "fuzz/seeds/$t" >"$log" 2>&1; then
        echo "fuzz.sh: $t FAILED; see $log and fuzz/artifacts/$t/" >&2
        tail -30 "$log" >&2
        exit 1
    fi
    secs=$(( $(date +%s) - start ))
    done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -ao 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 | awk '{print $2 " / " $4}')
    # Minimize: merge into a fresh directory, then replace the corpus with it.
    rm -rf "fuzz/corpus/$t.min" && mkdir -p "fuzz/corpus/$t.min"
    "$bin_dir/$t" -merge=1 "fuzz/corpus/$t.min" "fuzz/corpus/$t" >"target/fuzz-logs/$t.cmin.log" 2>&1
    rm -rf "fuzz/corpus/$t" && mv "fuzz/corpus/$t.min" "fuzz/corpus/$t"
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    printf '| `%s` | %s | %s | %s | %s | %s |\n' "$t" "$done_runs" "$secs" "$rate" "$cov" "$corpus"
done
