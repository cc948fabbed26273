"""Issue 32: how much of REFRAG's TTFT gain remains when the passages come with the request (serve's and the
API's `passages`: chunk embeddings computed on the fly) instead of from the index's cache, per chunk encoder.
For each checkpoint: the first N held-out questions, top 8 retrieved once; then per question, after one
warm-up, the median TTFT of full context, REFRAG p = 0 from the index (cached chunk embeddings), and REFRAG
p = 0 with the same passages sent by the caller (encoded on the fly), and each stage of the TTFT breakdown.
Usage (repository root, .venv): python results/ttft_onthefly/measure.py OUT.json INDEX:CKPT [INDEX:CKPT ...]"""
import json
import statistics
import sys

import refrag

N = 20
out, rows = sys.argv[1], []
qs = [r["question"] for r in refrag.read_rag("data/rag_eval.jsonl", "eval")[:N]]
for spec in sys.argv[2:]:
    index_dir, ckpt = spec.split(":")
    pipe = refrag.RefragPipeline.load(index_dir=index_dir, load_dir=ckpt, topk=8, max_new=2, p=0.0)
    times = {"full": [], "refrag_cached": [], "refrag_on_the_fly": []}
    parts = {k: {} for k in times}
    for q in qs:
        texts = pipe.index.passage_texts(pipe.generate(q, mode="full")["passages_used"])
        for name, kw in (("full", dict(mode="full")), ("refrag_cached", dict(mode="refrag")),
                         ("refrag_on_the_fly", dict(mode="refrag", passages=texts))):
            pipe.generate(q, **kw)  # warm-up
            rec = pipe.generate(q, **kw)
            times[name].append(1000 * rec["ttft_s"])
            for stage, v in rec["ttft_breakdown"].items():
                parts[name].setdefault(stage, []).append(1000 * v)
    row = {"index": index_dir, "checkpoint": ckpt, "encoder": pipe.models.enc_name, "questions": N,
           **{f"{k}_ttft_ms": statistics.median(v) for k, v in times.items()},
           "breakdown_ms": {k: {s: statistics.median(v) for s, v in p.items()} for k, p in parts.items()},
           "device": refrag.device_name(pipe.models.device), "dtype": str(pipe.models.dtype)}
    row["speedup_cached"] = row["full_ttft_ms"] / row["refrag_cached_ttft_ms"]
    row["speedup_on_the_fly"] = row["full_ttft_ms"] / row["refrag_on_the_fly_ttft_ms"]
    rows.append(row)
    print(json.dumps(row), flush=True)
with open(out, "w") as f:
    json.dump(rows, f, indent=1)
