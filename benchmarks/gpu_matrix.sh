#!/usr/bin/env bash
# The v2 ground truth (issue 14) on a lent GPU in one command: P shard processes of
# transfer_matrix.py share the device; seed 0 over the whole pool, then the
# pre-registered seed-1 subset. Rows and ESM exports go to $OUT, starting from the
# committed ones (so done cells are skipped and a source half run elsewhere is only
# continued with the same build: see transfer_matrix.same_build); kept source models
# stay in $WORK on the device. Every process stops at $LIMIT_S seconds; a cell cut
# short leaves at most a torn last line, which the next run redoes.
#
#   OUT=/path [P=8] [LIMIT_S=540] [DEVICE=cuda] [PY=.venv/bin/python] \
#       [SRC_RESULTS=benchmarks/results/transfer_matrix_v2.jsonl] [SEED1_TASKS=a,b,...] \
#       benchmarks/gpu_matrix.sh [more transfer_matrix.py run options]
#
# (tests/test_benchmarks_smoke.py runs it on the CPU with a tiny model and toy tasks.)
#
# Afterwards, on the development machine: copy $OUT/transfer_matrix_v2.jsonl over
# benchmarks/results/ (it holds the committed rows plus the new ones) and
# $OUT/matrix_esms_<key>/ into benchmarks/results/matrix_esms_<key>/.
set -euo pipefail
OUT=${OUT:?set OUT to the folder the rows go to}
P=${P:-8}
LIMIT_S=${LIMIT_S:-540}
DEVICE=${DEVICE:-cuda}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/stepstone-matrix-work}
SEED1_TASKS=${SEED1_TASKS:-sms_spam,trec6,tweet_sentiment,movie_polarity,bbc_news,banking77,reuters_r8,election_tweets,health_news_source,word_valence}
SRC_RESULTS=${SRC_RESULTS:-benchmarks/results/transfer_matrix_v2.jsonl}
RESULTS="$OUT/transfer_matrix_v2.jsonl"

mkdir -p "$OUT" "$WORK"
if [ -f "$SRC_RESULTS" ]; then
  cp "$SRC_RESULTS" "$RESULTS"
  cp -r "$(dirname "$SRC_RESULTS")"/matrix_esms_* "$OUT/" 2>/dev/null || true
fi
end=$(( $(date +%s) + LIMIT_S ))
for i in $(seq 0 $((P - 1))); do
  (
    left() { echo $(( end - $(date +%s) )); }
    run() {
      [ "$(left)" -gt 5 ] || return 0
      timeout "$(left)" "$PY" benchmarks/transfer_matrix.py run --protocol v2 \
        --shard "$i/$P" --device "$DEVICE" --threads 1 --quiet --results "$RESULTS" \
        --work "$WORK" "$@" || true
    }
    run --seeds 0 "$@"
    run --seeds 1 "$@" --tasks "$SEED1_TASKS"
  ) > "$OUT/shard-$i.log" 2>&1 &
done
wait
"$PY" benchmarks/transfer_matrix.py status --protocol v2 --results "$RESULTS" --seeds 0 \
  > "$OUT/status.json" 2>/dev/null || true
echo "rows: $(wc -l < "$RESULTS"); status in $OUT/status.json; logs in $OUT/shard-*.log"
