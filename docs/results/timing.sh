#!/usr/bin/env bash
# Steps per second of each objective on this machine, written to
# docs/results/timing.md. Run it on an otherwise idle machine:
#   bash docs/results/timing.sh
# Each objective trains a few hundred to a few thousand steps on the bundled WordNet task with
# the settings of docs/results/estimators/compare.toml (no evaluation during
# training); the figure is the run's own steps / training seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --release -p negcache-host
bin=target/release/negcache
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
LOAD=$(cut -d" " -f1-3 /proc/loadavg)
base=(--eval-every 0 --eval-queries 200)
rows=()
run() {
  local name=$1 steps=$2; shift 2
  # Shared-token towers unless the run names its tying.
  local tying=(--tying shared-tokens)
  if [[ " $* " == *" --tying "* ]]; then tying=(); fi
  "$bin" train "${tying[@]}" "${base[@]}" --steps "$steps" --out "$out/$name" "$@" >/dev/null 2>&1
  rows+=("$(python3 - "$out/$name/summary.json" "$name" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
print(f"| {sys.argv[2]} | {s['steps']} | {s['train_seconds']:.1f} | {s['steps'] / s['train_seconds']:.1f} | {s['tower_evals_per_step']:.0f} |")
PY
)")
}
run in-batch 2000 --objective in-batch
run cache 1000 --objective cache --negatives 1 --control-variate false
run cache-cv 1000 --objective cache --negatives 1 --control-variate true
run ABC-2neg 500 --objective cache-in-batch --negatives 2 --control-variate true --sampler exp-jump
run ABC-4neg 500 --objective cache-in-batch --negatives 4 --control-variate true --sampler exp-jump
run ABC-2neg-indep 1000 --objective cache-in-batch --negatives 2 --control-variate true --sampler independent
run ABC-4neg-indep 1000 --objective cache-in-batch --negatives 4 --control-variate true --sampler independent
run ABC-2neg-indep-r16 1000 --objective cache-in-batch --negatives 2 --control-variate true --sampler independent --refresh-per-step 16
run D-fresh 1000 --objective cache-shared --negatives 1 --control-variate false --fresh-scores true
run D-fresh-r48 1000 --objective cache-shared --negatives 1 --control-variate false --fresh-scores true --refresh-per-step 48
run D-4draws 1000 --objective cache-shared --negatives 4 --sampler independent --control-variate false --fresh-scores true
run D-4draws-corpus 1000 --objective cache-shared --negatives 4 --sampler independent --control-variate false --fresh-scores true --corpus-cache true --cache-capacity 20480
# Longer runs for the two rows the equal-time comparison divides: at 2,000
# steps their ratio moved between 4.3 and 5.6 from one run to the next.
run siamese-default 6000 --tying siamese
run siamese-in-batch 24000 --tying siamese --objective in-batch
run siamese-ABC-4neg-indep 2000 --tying siamese --objective cache-in-batch --negatives 4 --control-variate true --sampler independent
run sampled-8k 100 --objective sampled --sampled-negatives 8192 --negatives 1 --control-variate false
run full 20 --objective full --cache-capacity 20480 --negatives 1 --control-variate false
{
  echo "# Training speed per objective"
  echo
  echo "\`bash docs/results/timing.sh\` on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(date -u +%Y-%m-%d); load average before the runs: $LOAD."
  echo "Shared-token towers unless the name says siamese (the default's tying), batch 32, cache of 8,192 items; the scoring pass is split over both cores at tiles of 16 queries, the other work runs on one (evaluation is not timed)."
  echo
  echo "| objective | steps | seconds | steps/s | tower evaluations per step |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > docs/results/timing.md
cat docs/results/timing.md
