#!/usr/bin/env bash
# Issue 32: the cpu preset's cpt_recon stage (250 steps, batch 8, --lr 2e-4, up to 4 chunks of 16), one factor
# changed per row, each scored with the held-out fact-value / entity-id reconstruction metric.
# Run from the repository root with the .venv active; each row writes runs/m_recon_<row>/ and its log.
set -euo pipefail
common=(--train_json data/cpt_train.jsonl --eval_json data/cpt_eval.jsonl --steps 250 --lr 2e-4 --max_chunks 4
        --k 16 --log_every 50 --batch_size 8)
row() { name=$1; shift; [ -f "runs/m_recon_$name/eval.json" ] || python refrag.py cpt_recon "${common[@]}" "$@" \
          --out_dir "runs/m_recon_$name" > "runs/m_recon_$name.log" 2>&1; }
# one shared rate (the code before per-module rates): the checkpoint is scored afterwards by score_checkpoint.py
row base --lr_enc 2e-4 --lr_proj 2e-4
row mlr                                   # per-module defaults: encoder 5e-5, projector 5e-3
row dec8 --enc decoder:8                  # the decoder's first 8 layers, bidirectional, mean pooled
# more training text: the shipped 480 texts plus 2,400 about 2,000 fresh entities (data/make_corpus.py --extra)
[ -f runs/extra/extra_cpt_train.jsonl ] || python data/make_corpus.py --extra 2000 --out_dir runs/extra
cat data/cpt_train.jsonl runs/extra/extra_cpt_train.jsonl > runs/extra/cpt_train_plus.jsonl
row extra --train_json runs/extra/cpt_train_plus.jsonl
# the trend with training minutes: the per-module defaults for 1,000 steps
row mlr1000 --steps 1000
