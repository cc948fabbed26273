"""What the retriever's top 8 hold for the held-out questions: is the gold passage there, and how
many other passages state the asked fact (same kind of entity, same fact sentence)? A reader that
finds the fact's sentence but ignores the name picks among those.
Usage: python results/reader_diag/retrieved_same_kind.py INDEX_DIR"""
import json, re, sys
sys.path.insert(0, ".")
import numpy as np
import refrag as R

index = R.PassageIndex(sys.argv[1])
retriever = R.ChunkEncoder(index.meta["embed_model"], "--embed_model").eval()
rag = R.read_rag("data/rag_eval.jsonl", "--eval_json")
# the words of each fact's sentence, learned from the gold passages: the sentence holding the answer
# with the entity and the answer removed (a template such as "The * River flows through *")
templates = {}
by_name = {t.split(" ", 1)[0]: t for t in index.texts}
for r in rag:
    for s in R.split_sentences(by_name.get(r["entity"], "")):
        if r["answers"][0] in s:
            words = frozenset(w for w in re.findall(r"[A-Za-z]+", s.replace(r["entity"], "").replace(r["answers"][0], ""))
                              if w not in ("City", "Alloy", "Person", "Event"))
            templates.setdefault(r["fact"], set()).add(words)
gold_in, n_same = 0, []
for r in rag:
    with R.torch.no_grad():
        q = retriever.embed_texts([r["question"]], normalize=True)
    ranked, _ = index.search(q.numpy(), 8)
    names = [index.texts[i].split(" ", 1)[0] for i in ranked]
    gold_in += r["entity"] in names
    kind = r["entity"].split("_")[0]
    same = 0
    for i, n in zip(ranked, names):
        if n == r["entity"] or n.split("_")[0] != kind:
            continue
        sents = R.split_sentences(index.texts[i])
        words = [frozenset(re.findall(r"[A-Za-z]+", s)) for s in sents]
        same += any(t <= w for t in templates[r["fact"]] for w in words)
    n_same.append(same)
res = {"questions": len(rag), "gold_in_top8": gold_in / len(rag),
       "mean_other_passages_stating_the_fact": float(np.mean(n_same)),
       "chance_em_if_name_ignored": float(np.mean([1 / (1 + s) for s in n_same]))}
print(json.dumps(res))
