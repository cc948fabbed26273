#!/usr/bin/env bash
# Equal latency, after the quickstart (bash refrag_quickstart_auto_accel.sh): the fine-tuned full-context
# baseline with 1, 2, 4 and 8 passages against REFRAG (k = 16, p = 0) at top 8 and top 16, the same 50
# held-out questions, greedy, 16 answer tokens. Usage: bash results/eqlat/run.sh [OUT, default runs/eqlat]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
Q=runs/quickstart
OUT=${1:-runs/eqlat}
common=(--eval_json data/rag_eval.jsonl --limit 50 --max_new 16)
for n in 1 2 4 8; do
  "$PY" refrag.py evaluate "${common[@]}" --index_dir "$Q/index" --dec "$Q/sft_full/decoder" --modes full \
    --topk "$n" --out "$OUT/full_top$n"
done
"$PY" refrag.py evaluate "${common[@]}" --index_dir "$Q/index_sft" --load_dir "$Q/sft" --modes refrag --k 16 --p 0 \
  --topk 8 --out "$OUT/refrag_top8"
"$PY" refrag.py evaluate "${common[@]}" --index_dir "$Q/index_sft" --load_dir "$Q/sft" --modes refrag --k 16 --p 0 \
  --topk 16 --ctx_max 2048 --out "$OUT/refrag_top16"
# REFRAG with the best-ranked chunks expanded (about the first passage at p = 0.15, two at 0.3), and the
# REFRAG-trained decoder reading raw passages (full mode) at top 1 and top 8
"$PY" refrag.py evaluate "${common[@]}" --index_dir "$Q/index_sft" --load_dir "$Q/sft" --modes refrag --k 16 \
  --p 0.15,0.3 --heuristic rank --topk 8 --out "$OUT/refrag_top8_rank"
for n in 1 8; do
  "$PY" refrag.py evaluate "${common[@]}" --index_dir "$Q/index_sft" --load_dir "$Q/sft" --modes full --topk "$n" \
    --out "$OUT/sft_full_top$n"
done
