"""One change at a time: drafting with a fixed draft length against the adaptive one (DRAFT_ADAPT: +2 after a pass
that keeps every drafted token, -1 after one that does not), beside plain decoding, on the same questions in one
process: the long-answer task read by the untrained reader (full context, top 4, 128 tokens) and held-out
questions in REFRAG mode (p = 0, 24 tokens), where drafts are seldom right. Writes runs/drafting/adapt_ab.json.
Run: PYTHONPATH=. python results/drafting/adapt_ab.py (after the quickstart, alone on the machine). Measured at
commit d409146, whose refrag.DRAFT_ADAPT switched the schedule; the fixed length won and the switch is gone."""
import json
import os

import numpy as np

import refrag

Q = "runs/quickstart"
TASKS = {"describe_full": dict(path="data/describe_eval.jsonl", n=15, load=dict(index_dir=f"{Q}/index", mode="full"),
                               encoder=False, ask=dict(max_new=128, topk=4)),
         "qa_refrag": dict(path="data/rag_eval.jsonl", n=40, load=dict(index_dir=f"{Q}/index_sft", load_dir=f"{Q}/sft"),
                           encoder=True, ask=dict(max_new=24, p=0.0))}
out = {}
for name, t in TASKS.items():
    pipe = refrag.RefragPipeline.load(encoder=t["encoder"], **t["load"])
    questions = [r["question"] for r in refrag.read_rag(t["path"], "x")][:t["n"]]
    pipe.generate(questions[0], **t["ask"])  # warm-up
    runs = {"plain": [], "fixed": [], "adaptive": []}
    for q in questions:
        for variant in runs:
            refrag.DRAFT_ADAPT = variant == "adaptive"
            runs[variant].append(pipe.generate(q, draft="none" if variant == "plain" else "lookup", **t["ask"]))
    plain = runs["plain"]
    out[name] = {v: {"throughput_tok_s": float(np.mean([r["throughput_tok_s"] for r in rs])),
                     "ttit_ms": 1000 * float(np.mean([r["ttit_s"] for r in rs if r["ttit_s"]])),
                     "same_answer": float(np.mean([a["answer"] == b["answer"] for a, b in zip(rs, plain)])),
                     "acceptance": (sum(r["draft_accepted"] for r in rs) / max(1, sum(r["draft_proposed"] for r in rs)))
                     if v != "plain" else None} for v, rs in runs.items()}
    print(name, json.dumps(out[name]), flush=True)
os.makedirs("runs/drafting", exist_ok=True)
with open("runs/drafting/adapt_ab.json", "w") as fh:
    json.dump(out, fh, indent=1)
