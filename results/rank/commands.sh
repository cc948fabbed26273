set -e
t0=$(date +%s)
python refrag.py index --corpus data/corpus_small.txt --index_dir runs/chain/index_sft --enc runs/chain/sft --dec runs/chain/sft/decoder --k 8 --ppl
t1=$(date +%s); echo "TIME index_ppl $((t1-t0))"
python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir runs/chain/index_sft --load_dir runs/chain/sft --modes refrag --k 8 --p 0.1,0.25 --heuristic random,ppl_desc,rank --out runs/eval_rank
t2=$(date +%s); echo "TIME eval_rank $((t2-t1))"
python refrag.py finetune --rag_json data/rag_train.jsonl --index_dir runs/chain/index --load_dir runs/chain/cpt_next --k 8 --p 0.1 --expand_by rank --topk 8 --steps 100 --batch_size 8 --lr 1e-4 --log_every 50 --out_dir runs/sft_rank
t3=$(date +%s); echo "TIME finetune_rank $((t3-t2))"
python refrag.py index --corpus data/corpus_small.txt --index_dir runs/index_sft_rank --enc runs/sft_rank --dec runs/sft_rank/decoder --k 8
python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir runs/index_sft_rank --load_dir runs/sft_rank --modes refrag --k 8 --p 0,0.1,0.25 --heuristic rank,random --out runs/eval_sft_rank
t4=$(date +%s); echo "TIME index_eval_sft_rank $((t4-t3))"
