# Continued pretraining of the demo decoder (runs/demo_decoder: the 1,800-step recipe, held-out monitor 0.33),
# 2-core CPU machine, torch 2.13.0+cpu, fp32. Run one after another on an idle machine unless noted.

# A. more multi-passage steps only (stopped at step 750 of 3,000 when (B) replaced it; monitor 0.35 / 0.26 at 300 / 600)
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 300 --init_from runs/demo_decoder --copy_warmup 0 --single_steps 0 --ctx_ramp 0 --min_passages 4 --lr 5e-4 --steps 3000 --out_dir runs/demo_decoder_long

# A's decoder at its step-600 check (pretrain saves one at every --eval_every), copied before it was replaced,
# scored by a 1-step cpt_recon (its raw-tokens column: how well the decoder repeats a text it has read)
cp -r runs/demo_decoder_long runs/dl_ck600
python refrag.py cpt_recon --train_json data/cpt_train.jsonl --dec runs/dl_ck600 --k 8 --steps 1 --max_chunks 8 --log_every 1 --out_dir runs/ceil_ck600

# B. the same with 20% copy batches, 70% of whose sequences repeat passage text (--copy_text)
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 300 --init_from runs/demo_decoder --copy_warmup 0 --single_steps 0 --ctx_ramp 0 --min_passages 4 --copy_frac 0.2 --copy_text 0.7 --lr 5e-4 --steps 2400 --out_dir runs/demo_decoder_ct

# what the decoders predict when a text repeats (examples and copy accuracy quoted in README)
python results/copy_text/diag_copy_predictions.py runs/demo_decoder
python results/copy_text/diag_copy_predictions.py runs/demo_decoder_ct

# held-out QA, top 8 raw passages, both decoders; runs/chain/index is the index stage of the chain rerun
# (`python refrag.py chain --dec runs/demo_decoder --k 8 --out_dir runs/chain`, README "Expanding the best-ranked passages") (the index's passages and retrieval do not depend on the decoder)
python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir runs/chain/index --dec runs/demo_decoder --modes full --topk 8 --out runs/eval_dec_base
python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir runs/chain/index --dec runs/demo_decoder_ct --modes full --topk 8 --out runs/eval_dec_ct
# reconstruction with the copy-trained decoder frozen: k = 8 as in the chain, and k = 1
python refrag.py cpt_recon --train_json data/cpt_train.jsonl --eval_json data/cpt_eval.jsonl --dec runs/demo_decoder_ct --k 8 --steps 600 --lr 2e-4 --max_chunks 8 --log_every 50 --out_dir runs/recon_ct_k8
python refrag.py cpt_recon --train_json data/cpt_train.jsonl --eval_json data/cpt_eval.jsonl --dec runs/demo_decoder_ct --k 1 --steps 400 --lr 2e-4 --max_chunks 16 --log_every 50 --out_dir runs/recon_ct_k1

# the whole training chain (paper recipe: random expansion) from the copy-trained decoder
python refrag.py chain --dec runs/demo_decoder_ct --k 8 --out_dir runs/chain_ct

# diagnostics of the k = 1 reconstruction (see README); the second ran beside the chain above
python results/copy_text/diag_nearest_token.py runs/recon_ct_k1
python results/copy_text/diag_recon_rms.py cpt_recon --train_json data/cpt_train.jsonl --eval_json data/cpt_eval.jsonl --dec runs/demo_decoder_ct --k 1 --steps 400 --lr 2e-4 --max_chunks 16 --log_every 100 --out_dir runs/recon_ct_k1_norm
python results/copy_text/diag_nearest_token.py runs/recon_ct_k1_norm --rms
python refrag.py cpt_recon --train_json data/cpt_train.jsonl --eval_json data/cpt_eval.jsonl --dec runs/demo_decoder_ct --k 1 --steps 1200 --lr 2e-4 --max_chunks 16 --log_every 100 --out_dir runs/recon_ct_k1_1200
python results/copy_text/diag_nearest_token.py runs/recon_ct_k1_1200
