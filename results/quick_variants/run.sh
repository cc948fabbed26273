#!/usr/bin/env bash
# Issue 32, the quickstart's recipe (chain --preset quick: cpt_recon 100, cpt_next 40, finetune 100 steps; the
# baseline fine-tuned 100 steps at top 4 and scored at top 1, 2, 4, 8; 50 held-out questions), one factor per row.
# Run from the repository root with the .venv active. Rows:
#   dec8     chain --preset quick --enc decoder:8           (also trains and scores the fair baseline)
#   dec8_kd  dec8's cpt_next, then finetune distilling dec8's baseline, half the samples at p = 0
#   mlr      chain --preset quick (MiniLM encoder, per-module rates), no baseline of its own (dec8's is the same)
set -euo pipefail
python refrag.py chain --preset quick --enc decoder:8 --out_dir runs/q_dec8 --resume > runs/q_dec8.log 2>&1
o=runs/q_dec8_kd
[ -f $o/sft/config.json ] || python refrag.py finetune --rag_json data/rag_train.jsonl --index_dir runs/q_dec8/index \
  --load_dir runs/q_dec8/cpt_next --k 16 --p 0.1 --topk 8 --ctx_max 1024 --steps 100 --lr 1e-4 --batch_size 2 \
  --log_every 50 --teacher runs/q_dec8/sft_full/decoder --p0_share 0.5 --out_dir $o/sft > runs/q_dec8_kd.log 2>&1
[ -f $o/index_sft/meta.json ] || python refrag.py index --corpus data/corpus_small.txt --index_dir $o/index_sft \
  --enc $o/sft --dec $o/sft/decoder --k 16 >> runs/q_dec8_kd.log 2>&1
python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir $o/index_sft --load_dir $o/sft --modes refrag \
  --k 16 --p 0 --topk 8 --ctx_max 1024 --max_new 16 --limit 50 --out $o/eval >> runs/q_dec8_kd.log 2>&1
python refrag.py chain --preset quick --no_baseline --out_dir runs/q_mlr --resume > runs/q_mlr.log 2>&1
