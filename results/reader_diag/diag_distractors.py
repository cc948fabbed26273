"""Where does the demo reader fail? Held-out exact match with the gold passage plus 0/1/3/7
distractors of three kinds: other-kind passages, same-kind passages with unrelated ids, and
same-kind passages with near-identical ids (what retrieval returns: City_10 / City_1010 for City_101).
Usage: python results/reader_diag/diag_distractors.py DECODER [N_QUESTIONS]"""
import json, random, re, sys
sys.path.insert(0, ".")
import torch
import refrag as R

dec_dir = sys.argv[1]
n_q = int(sys.argv[2]) if len(sys.argv) > 2 else 150
torch.set_grad_enabled(False)
tok = R.load_tokenizer(dec_dir)
dec = R.load_decoder(dec_dir, torch.device("cpu"), torch.float32).eval()
passages = R.read_corpus("data/corpus_small.txt")
by_name = {p.split(" ", 1)[0]: p for p in passages}
held = [r for r in R.read_rag("data/rag_eval.jsonl", "--eval_json") if r["entity"] in by_name]
random.Random(0).shuffle(held)
held = held[:n_q]


def near(a: str, b: str) -> bool:
    (ka, na), (kb, nb) = a.split("_"), b.split("_")
    return ka == kb and a != b and (na.startswith(nb) or nb.startswith(na) or abs(int(na) - int(nb)) < 10)


res = {}
for kind_d in ("other_kind", "same_kind", "near_name"):
    for n in (1, 2, 4, 8):
        if n == 1 and kind_d != "other_kind":
            continue
        rng = random.Random(n)
        hits = wrong = 0
        for r in held:
            g = r["entity"]
            kind = g.split("_")[0]
            if kind_d == "other_kind":
                pool = [x for x in by_name if x.split("_")[0] != kind]
            elif kind_d == "same_kind":
                pool = [x for x in by_name if x.split("_")[0] == kind and x != g and not near(x, g)]
            else:
                pool = sorted([x for x in by_name if near(x, g)], key=lambda x: abs(int(x.split("_")[1]) - int(g.split("_")[1])))
                pool += [x for x in by_name if x.split("_")[0] == kind and x != g and x not in pool]
            d = pool[:n - 1] if kind_d == "near_name" else rng.sample(pool, n - 1)
            names = [g] + d
            rng.shuffle(names)
            ids, mask = R.qa_example(tok, [by_name[x] for x in names], r["question"], r["answers"][0])
            pred = R.greedy_answer(dec, tok, ids[:mask.index(1)], torch.device("cpu"), 16)
            hits += R.exact_match(pred, r["answers"])
            wrong += any(R.normalize_answer(pred) and R.normalize_answer(pred) in R.normalize_answer(by_name[x]) for x in d) and not R.exact_match(pred, r["answers"])
        key = f"{kind_d} n={n}"
        res[key] = {"em": hits / len(held), "answer_from_distractor": wrong / len(held)}
        print(f"{key:20s} EM {hits / len(held):.3f}  answer from a distractor {wrong / len(held):.3f}", flush=True)
print(json.dumps({"decoder": dec_dir, "n_questions": len(held), "results": res}))
