"""Does the demo reader bind a question to its entity's passage? Exact match on two-passage
contexts where both passages state the asked fact (ReaderData.sample(same_fact=True)), so that
only the entity's name tells which value answers: 0.5 is what a reader that ignores the name gets.
Two distributions: training entities renamed to fresh near-identical ids with fresh values (what
the binding batches train on), and held-out questions with an unrenamed training entity as the
distractor (the decoder may know that distractor's value by heart).
Usage: python results/reader_diag/diag_binding.py DECODER [DECODER ...]"""
import json, random, sys
sys.path.insert(0, ".")
import torch
import refrag as R

torch.set_grad_enabled(False)
P = R.read_corpus("data/corpus_small.txt")
tr = R.read_rag("data/rag_train.jsonl", "--rag_json")
out = []
for dec_dir in sys.argv[1:]:
    tok = R.load_tokenizer(dec_dir)
    dec = R.load_decoder(dec_dir, torch.device("cpu"), torch.float32).eval()
    train = R.ReaderData(P, tr, tok, 8, random.Random(0))
    for held_out in (False, True):
        if held_out:
            data, recs = R.heldout_monitor(P, "data/rag_eval.jsonl", train, 120)
            data.by_fact = {}
            for r in tr + recs:
                data.by_fact.setdefault((r["entity"].split("_")[0], r["fact"]), []).append(r["entity"])
        else:
            data, recs = R.ReaderData(P, tr, tok, 8, random.Random(5)), random.Random(1).sample(tr, 120)
        for n_sent in (1, 3):
            data.rng = random.Random(7)
            hits = 0
            for r in recs:
                ids, mask = data.sample(r, n_ctx=2, n_questions=1, same_fact=True, n_sent=n_sent)
                gold = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True).strip()
                hits += R.exact_match(R.greedy_answer(dec, tok, ids[:mask.index(1)], torch.device("cpu"), 16), [gold])
            rec = {"decoder": dec_dir, "contexts": "held-out question, training distractor" if held_out
                   else "training entities renamed, fresh values", "sentences_per_passage": n_sent,
                   "n": len(recs), "em": hits / len(recs)}
            out.append(rec)
            print(json.dumps(rec), flush=True)
