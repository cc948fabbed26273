#!/usr/bin/env bash
# Issue 34, conversations with compressed history: every measurement of results/conversations, in order.
# Needs the quickstart's runs (bash refrag_quickstart_auto_accel.sh -> runs/quickstart). Run alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/conversations}
Q=runs/quickstart
# 20 held-out conversations (6 turns, two entities, follow-ups that name nothing), every turn scored, top 4:
# REFRAG (p = 0) with its earlier turns compressed, raw or dropped; full context (fine-tuned baseline) raw or dropped
python refrag.py evaluate --eval_json data/conv_eval.jsonl --index_dir $Q/index_sft --load_dir $Q/sft --modes refrag \
    --p 0 --topk 4 --limit 20 --max_new 16 --out $OUT/refrag
python refrag.py evaluate --eval_json data/conv_eval.jsonl --index_dir $Q/index --dec $Q/sft_full/decoder --modes full \
    --topk 4 --limit 20 --max_new 16 --out $OUT/full
# the same with retrieval on the question and the two user messages before it (--query_turns 3: a follow-up's
# query then holds the question that named the entity)
python refrag.py evaluate --eval_json data/conv_eval.jsonl --index_dir $Q/index_sft --load_dir $Q/sft --modes refrag \
    --p 0 --topk 4 --limit 20 --max_new 16 --history compressed,drop --query_turns 3 --out $OUT/refrag_q3
python refrag.py evaluate --eval_json data/conv_eval.jsonl --index_dir $Q/index --dec $Q/sft_full/decoder --modes full \
    --topk 4 --limit 20 --max_new 16 --history raw,drop --query_turns 3 --out $OUT/full_q3
