#!/usr/bin/env bash
# Issue 34, drafting from the retrieved text (--draft lookup): every measurement of results/drafting, in order.
# Needs the quickstart's runs (bash refrag_quickstart_auto_accel.sh -> runs/quickstart). Run alone on the machine.
# (the fixed against adaptive draft length comparison, results/drafting/adapt_ab.py, ran once at commit d409146)
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/drafting}
Q=runs/quickstart
# held-out questions (short answers): REFRAG p = 0 with its checkpoint, full context with the fine-tuned baseline
python refrag.py evaluate --index_dir $Q/index_sft --load_dir $Q/sft --modes refrag --p 0 --limit 100 --max_new 24 \
    --draft none,lookup --out $OUT/qa_refrag
python refrag.py evaluate --index_dir $Q/index --dec $Q/sft_full/decoder --modes full --limit 100 --max_new 24 \
    --draft none,lookup --out $OUT/qa_full
# the longer-answer task: "Tell me everything the context says about X." answered from the passages (top 4), read by
# the untrained instruct reader (full context) and by the quickstart's REFRAG checkpoint (p = 0)
python refrag.py evaluate --eval_json data/describe_eval.jsonl --index_dir $Q/index --modes full --topk 4 --limit 30 \
    --max_new 128 --draft none,lookup --out $OUT/describe_full
python refrag.py evaluate --eval_json data/describe_eval.jsonl --index_dir $Q/index_sft --load_dir $Q/sft --modes refrag \
    --p 0 --topk 4 --limit 30 --max_new 128 --draft none,lookup --out $OUT/describe_refrag
# the same long answers in fp32 (10 questions): the matrix kernels differ in the last bits between one row and several
python refrag.py evaluate --eval_json data/describe_eval.jsonl --index_dir $Q/index --modes full --topk 4 --limit 10 \
    --max_new 128 --draft none,lookup --dtype fp32 --out $OUT/describe_full_fp32
# longer contexts (random tokens; drafts from a context holding the answer, and from the context alone)
python refrag.py bench --ctx 512,2048,4096 --k 16 --o 64 --repeats 2 --draft lookup --out $OUT/bench
# one-position against nine-position decoder passes: SDPA and eager batched, SDPA row by row (drafted passes)
PYTHONPATH=. python results/drafting/sdpa_probe.py | tee $OUT/sdpa_probe.txt
