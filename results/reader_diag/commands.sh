# Why the demo reader fails with several passages: does it bind the question to its entity's passage?
# 2-core CPU machine, torch 2.13.0+cpu, fp32; run one after another on an idle machine unless noted.
# Decoders: runs/demo_decoder is the README's pretrain command; runs/demo_decoder_ct is B of
# results/copy_text/commands.sh; runs/chain/index is the index stage of
# `python refrag.py chain --dec runs/demo_decoder --k 8 --out_dir runs/chain` (retrieval does not depend on the decoder).

# exact match with the gold passage + 0/1/3/7 distractors of three kinds (other kind, same kind, near-identical id)
python results/reader_diag/diag_distractors.py runs/demo_decoder 150      > results/reader_diag/distractors_demo_decoder.txt
python results/reader_diag/diag_distractors.py runs/demo_decoder_ct 150   > results/reader_diag/distractors_demo_decoder_ct.txt
# two passages that both state the asked fact: 0.5 = the name is ignored
python results/reader_diag/diag_binding.py runs/demo_decoder runs/demo_decoder_ct runs/bind_cont runs/bind_micro runs/demo_decoder_bind > results/reader_diag/binding.jsonl
# which river name the decoder prefers, whatever is asked
python results/reader_diag/probe_value_prior.py runs/demo_decoder_ct > results/reader_diag/probe_value_prior_demo_decoder_ct.txt

# 1. binding batches added to the continued training of the copy-trained decoder B (runs/demo_decoder_ct, results/copy_text)
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 150 --init_from runs/demo_decoder_ct --copy_warmup 0 --single_steps 0 --ctx_ramp 0 --min_passages 2 --copy_frac 0.1 --copy_text 0.7 --bind_frac 0.5 --lr 5e-4 --steps 600 --out_dir runs/bind_cont
# 2. binding batches only: two one-sentence passages, 32 per batch
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --init_from runs/demo_decoder_ct --copy_warmup 0 --single_steps 0 --ctx_ramp 0 --max_passages 2 --min_passages 2 --copy_frac 0 --bind_frac 1 --bind_sentences 1 --batch_size 32 --lr 5e-4 --steps 400 --log_every 25 --out_dir runs/bind_micro
# 3. the default recipe from scratch with half of the QA batches binding batches from the copy warm-up's end
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 150 --steps 1800 --bind_frac 0.5 --bind_sentences 2 --out_dir runs/demo_decoder_bind
python results/reader_diag/diag_distractors.py runs/demo_decoder_bind 150 > results/reader_diag/distractors_demo_decoder_bind.txt
python results/reader_diag/retrieved_same_kind.py runs/chain/index > results/reader_diag/retrieved_same_kind.json  # ran beside run 4 below
# 4. binding batches only, longer and at a higher LR: two or three one-sentence passages, 32 per batch, 10% copy batches
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 400 --init_from runs/demo_decoder_ct --copy_warmup 0 --single_steps 0 --ctx_ramp 0 --max_passages 3 --min_passages 2 --copy_frac 0.1 --copy_text 0.7 --bind_frac 1 --bind_sentences 1 --batch_size 32 --lr 1e-3 --steps 1200 --log_every 50 --out_dir runs/bind_long
python results/reader_diag/diag_binding.py runs/bind_long >> results/reader_diag/binding.jsonl
python results/reader_diag/diag_distractors.py runs/bind_long 150 > results/reader_diag/distractors_bind_long.txt
# 5. depth: the default recipe with preset tiny-deep (8 layers), 1,000 steps (what fitted in the session)
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 250 --steps 1000 --dec_config tiny-deep --out_dir runs/demo_decoder_deep
python results/reader_diag/diag_binding.py runs/demo_decoder_deep >> results/reader_diag/binding.jsonl
python results/reader_diag/diag_distractors.py runs/demo_decoder_deep 150 > results/reader_diag/distractors_demo_decoder_deep.txt
# 6. binding alone, from scratch (session of 2026-11-22): a fresh `tiny` decoder trained only on binding contexts
#    (2-4 one-sentence same-fact passages, one question each), scored on fixed 2- and 4-passage binding contexts
python results/reader_diag/bind_from_scratch.py --steps 1500 --eval_every 100 > results/reader_diag/bind_from_scratch_default.jsonl
#    the same with the question also put before the context (query-aware layout)
python results/reader_diag/bind_from_scratch.py --steps 1500 --eval_every 100 --q_first > results/reader_diag/bind_from_scratch_qfirst.jsonl
#    the same with every digit its own token (Llama's convention), 1,200 steps (what the session allowed)
python results/reader_diag/make_digit_tokenizer.py runs/demo_decoder_ct runs/tok_digits
python results/reader_diag/bind_from_scratch.py --tok runs/tok_digits --steps 1200 --eval_every 100 > results/reader_diag/bind_from_scratch_digits.jsonl
# 7. (session of 2026-11-22, second) the digit tokenizer for 3,000 steps, to see where binding levels off
#    (--save failed at the end of this run: save_hf_model needed its directory, fixed since; the scores are in the log)
python results/reader_diag/bind_from_scratch.py --tok runs/tok_digits --steps 3000 --eval_every 200 --save runs/bind_digits_3000 > results/reader_diag/bind_from_scratch_digits_3000.jsonl
#    the same 1,200 steps as run 6's digit run, with near-identical ids that are never prefixes of each other
#    (n + 1..9 of the same length; X
python results/reader_diag/bind_from_scratch.py --tok runs/tok_digits --steps 1200 --eval_every 100 --threads 1 --near same_length --save runs/bind_digits_samelen > results/reader_diag/bind_from_scratch_digits_samelen.jsonl
# 8. (session of 2026-12-02; runs/tok_digits remade by make_digit_tokenizer.py from data/tokenizer.json saved
#    with save_pretrained into runs/tok_base: the same 2,190 tokens; its tokenizer.json is, as JSON, identical to
#    data/tokenizer_digits.json, which data/make_corpus.py now writes) a wider decoder on the same task: d = 512 (14.8M parameters), bf16 autocast (AMX)
#    (stopped after step 1,000: no faster than `tiny` so far)
python results/reader_diag/bind_from_scratch.py --tok runs/tok_digits --steps 3000 --eval_every 200 --hidden 512 --bf16 --save runs/bind_digits_d512 > results/reader_diag/bind_from_scratch_digits_d512.jsonl
#    `tiny` (bf16) with pretrain's 150-step copy warm-up and short ids first (the largest fresh id grows from 9 to 4,299 over half the steps)
python results/reader_diag/bind_from_scratch.py --tok runs/tok_digits --steps 3000 --eval_every 200 --bf16 --copy_warmup 150 --id_ramp 0.5 --save runs/bind_digits_ramp > results/reader_diag/bind_from_scratch_digits_ramp.jsonl
# 9. (session of 2026-12-02) the default demo-decoder recipe with the digit tokenizer and the id curriculum, bf16
#    (runs/tok_digits/tokenizer.json is data/tokenizer_digits.json), then its retrieval and reading tests
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 150 --steps 1800 --tokenizer runs/tok_digits/tokenizer.json --id_ramp 0.5 --dtype bf16 --out_dir runs/demo_decoder_digits_ramp
python refrag.py index --corpus data/corpus_small.txt --index_dir runs/index_digits --dec runs/demo_decoder_digits_ramp --k 8
python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir runs/index_digits --dec runs/demo_decoder_digits_ramp --modes full,none --topk 8 --ctx_max 1400 --out runs/eval_digits_ramp
python results/reader_diag/diag_distractors.py runs/demo_decoder_digits_ramp 150 > results/reader_diag/distractors_demo_decoder_digits_ramp.txt
python results/reader_diag/diag_binding.py runs/demo_decoder_digits_ramp > results/reader_diag/binding_demo_decoder_digits_ramp.jsonl
# 10. binding first: run 8's binding decoder (runs/bind_digits_ramp) taught to read whole passages, 30% binding batches
python refrag.py pretrain --corpus data/corpus_small.txt --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 100 --eval_every 150 --init_from runs/bind_digits_ramp --tokenizer data/tokenizer_digits.json --copy_warmup 0 --single_steps 150 --ctx_ramp 0.3 --bind_frac 0.3 --steps 1200 --dtype bf16 --out_dir runs/demo_decoder_bind_first
python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir runs/index_digits --dec runs/demo_decoder_bind_first --modes full,none --topk 8 --ctx_max 1400 --out runs/eval_bind_first
python results/reader_diag/diag_binding.py runs/demo_decoder_bind_first > results/reader_diag/binding_demo_decoder_bind_first.jsonl
python results/reader_diag/diag_distractors.py runs/demo_decoder_bind_first 150 > results/reader_diag/distractors_demo_decoder_bind_first.txt
