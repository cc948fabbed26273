#!/bin/bash
# TTFT of `generate` on a quickstart checkpoint with two checkouts of refrag.py, interleaved (2 rounds, 3 warm-ups each):
#   git worktree add /tmp/base 72901ce
#   bash results/quickstart_30/ttft_ab.sh /tmp/base . runs/quickstart
OLD=$1 NEW=$2 RUN=$(realpath "$3")
PY=$PWD/.venv/bin/python
Q="Which prize did Person_2336 receive?"
for round in 1 2; do
  for tree in "$OLD" "$NEW"; do
    for mode in full refrag; do
      (cd "$tree" && HF_HUB_OFFLINE=1 "$PY" refrag.py generate --index_dir "$RUN/index_sft" --load_dir "$RUN/sft" \
        --question "$Q" --mode $mode --p 0 --max_new 8 --warmup 3 --json 2>/dev/null | tail -1) |
        python3 -c "import json,sys; r=json.load(sys.stdin); print('$tree', '$mode', 'TTFT %.1f ms' % (r['ttft_s'] * 1000))"
    done
  done
done
