#!/usr/bin/env bash
# Issue 32, step 6: one resumable command for the ablation around the quickstart's recipe, and the trend of
# p = 0 EM with training minutes for REFRAG and for the full-context baseline. Run from the repository root
# with the .venv active, after results/quick_variants/run.sh (its runs/q_mlr chain gives the REFRAG rows
# their cpt_recon + cpt_next checkpoint, 5.6 min of training; runs/q_dec8/sft_full is the baseline's 100-step
# point). Each row writes runs/abl/<row>/ (train_s, its checkpoint, eval/) and is skipped once its eval exists;
# then results/ablation/table.py gathers every row (earlier scripts' rows included) into table.md, rows.json
# and em_vs_minutes.png. One factor per row against the quickstart's finetune (100 steps, batch 2, lr 1e-4,
# p = 0.1 random chunks expanded, k = 16, top 8); 50 held-out questions, greedy, 16 answer tokens.
set -euo pipefail
mkdir -p runs/abl
base=runs/q_mlr
# one rate 1e-4 for every module unless a row says otherwise (finetune's default before per-module rates)
ft=(--rag_json data/rag_train.jsonl --index_dir $base/index --k 16 --topk 8 --ctx_max 1024 --lr 1e-4
    --lr_enc 1e-4 --lr_proj 1e-4 --batch_size 2 --log_every 50)
ev=(--eval_json data/rag_eval.jsonl --max_new 16 --limit 50 --ctx_max 1024)
timed() {  # timed DIR cmd...: run, and record the seconds it took in DIR/train_s
  local dir=$1; shift; local t0=$SECONDS; "$@"; echo $((SECONDS - t0)) > "$dir/train_s"; }
refrag_row() {  # refrag_row NAME STEPS [finetune flags...]
  local name=$1 steps=$2; shift 2; local o=runs/abl/$name; mkdir -p $o
  [ -f $o/eval/results.json ] && return 0
  { [ -f $o/sft/config.json ] || timed $o python refrag.py finetune "${ft[@]}" --load_dir $base/cpt_next \
        --p 0.1 --steps "$steps" "$@" --out_dir $o/sft
    [ -f $o/index_sft/meta.json ] || python refrag.py index --corpus data/corpus_small.txt --index_dir $o/index_sft \
        --enc $o/sft --dec $o/sft/decoder --k 16
    python refrag.py evaluate "${ev[@]}" --index_dir $o/index_sft --load_dir $o/sft --modes refrag --k 16 \
        --p 0,0.25 --heuristic ppl_desc --topk 8 --out $o/eval; } > runs/abl/$name.log 2>&1; }
full_row() {  # full_row NAME STEPS: the baseline fine-tuned STEPS steps at top 4, scored at top 1, 4 and 8
  local name=$1 steps=$2; local o=runs/abl/$name; mkdir -p $o
  [ -f $o/eval_top8/results.json ] && return 0
  { [ -f $o/sft_full/config.json ] || timed $o python refrag.py finetune "${ft[@]}" --dec smollm2 --mode full \
        --topk 4 --steps "$steps" --out_dir $o/sft_full
    for t in 1 4 8; do [ -f $o/eval_top$t/results.json ] || python refrag.py evaluate "${ev[@]}" --index_dir \
        $base/index --dec $o/sft_full/decoder --modes full --topk $t --out $o/eval_top$t; done; } > runs/abl/$name.log 2>&1; }

raw_row() {  # raw_row NAME SFT: how a REFRAG-trained decoder reads raw passages (full mode, top 1)
  local o=runs/abl/$1; mkdir -p $o
  [ -f $o/eval_raw1/results.json ] || python refrag.py evaluate "${ev[@]}" --index_dir $base/index --load_dir "$2" \
      --modes full --topk 1 --out $o/eval_raw1 > runs/abl/$1_raw1.log 2>&1; }

# factors (100 steps each, the quickstart's finetune budget)
refrag_row ft100_mlr 100 --lr_enc 2.5e-5 --lr_proj 2.5e-3   # per-module rates in finetune too (encoder 0.25x, projector 25x)
refrag_row ft100_p0only 100 --p0_share 1.0                  # every sample read at p = 0, the condition it is judged on
refrag_row ft100_lora 100 --lora 16                         # the decoder through LoRA adapters (rank 16, peft)
refrag_row ft100_recon20 100 --recon_share 0.2 --train_json data/cpt_train.jsonl  # 20% reconstruction samples
raw_row ft100_lora runs/abl/ft100_lora/sft                  # LoRA against full fine-tuning: reading raw text
raw_row quick_mlr $base/sft
# the trend with minutes
full_row full25 25
full_row full50 50
refrag_row ft50 50
refrag_row ft200_mlr 200 --lr_enc 2.5e-5 --lr_proj 2.5e-3
refrag_row ft200 200
refrag_row ft400 400
# LoRA at a rate suited to adapters (ten times the full fine-tuning rate)
refrag_row ft100_lora_lr1e-3 100 --lora 16 --lr_dec 1e-3
raw_row ft100_lora_lr1e-3 runs/abl/ft100_lora_lr1e-3/sft
python results/ablation/table.py
