#!/usr/bin/env bash
# Fine-tuning variants after the quickstart (bash refrag_quickstart_auto_accel.sh): the quickstart's
# REFRAG finetune (100 steps at top 8, lr 1e-4, batch 2) started from cpt_recon instead of cpt_next, or
# with more chunks expanded during training; each scored on the first 50 held-out questions.
# Usage: bash results/ft_variants/run.sh [OUT, default runs]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
Q=runs/quickstart
OUT=${1:-runs}
common=(--eval_json data/rag_eval.jsonl --limit 50 --max_new 16)
variant() {  # name, load_dir, finetune flags...
  local o="$OUT/$1" from="$2"; shift 2
  "$PY" refrag.py finetune --log_every 50 --index_dir "$Q/index" --load_dir "$from" --steps 100 --lr 0.0001 \
    --batch_size 2 "$@" --out_dir "$o"
  "$PY" refrag.py index --dec "$o/decoder" --enc "$o" --index_dir "$o/index" --corpus data/corpus_small.txt
  "$PY" refrag.py evaluate "${common[@]}" --index_dir "$o/index" --load_dir "$o" --modes refrag --k 16 --p 0 \
    --topk 8 --out "$o/eval_refrag"
  "$PY" refrag.py evaluate "${common[@]}" --index_dir "$o/index" --load_dir "$o" --modes full --topk 1 \
    --out "$o/eval_full_top1"
  "$PY" refrag.py evaluate "${common[@]}" --index_dir "$o/index" --load_dir "$o" --modes refrag --k 16 --p 0.15 \
    --heuristic rank --topk 8 --out "$o/eval_rank"
}
variant ft_from_recon "$Q/cpt_recon"
variant ft_p05 "$Q/cpt_next" --p 0.5
variant ft_rank015 "$Q/cpt_next" --p 0.15 --expand_by rank
