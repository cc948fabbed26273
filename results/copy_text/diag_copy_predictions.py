"""Diagnostic (run from the repository root): does a decoder copy text it has just read? For the first
40 held-out texts (data/cpt_eval.jsonl), it reads BOS + the first 32 tokens + the same 32 tokens and
predicts each token of the repeat; prints four texts with its wrong predictions as token[->prediction]
and the copy accuracy over all 40.
  python results/copy_text/diag_copy_predictions.py runs/demo_decoder"""
import json
import sys

import torch

sys.path.insert(0, ".")
import refrag  # noqa: E402

dec_dir = sys.argv[1]
dec = refrag.load_decoder(dec_dir, torch.device("cpu"), torch.float32)
tok = refrag.load_tokenizer(dec_dir)
recs = [json.loads(line) for line in open("data/cpt_eval.jsonl", encoding="utf-8")][:40]
n_ok = n = 0
for i, r in enumerate(recs):
    ids = refrag.encode_text(tok, r.get("text") or r.get("tokens"))[:32]
    seq, _ = refrag.repeat_example(tok, ids)
    with torch.no_grad():
        logits = dec(input_ids=torch.tensor([seq])).logits[0]
    pred = logits[len(seq) - len(ids) - 1:-1].argmax(-1).tolist()  # the predictions of the repeat's tokens
    ok = [p == t for p, t in zip(pred, ids)]
    n_ok, n = n_ok + sum(ok), n + len(ok)
    if i < 4:
        print(" ".join(repr(tok.decode([t])) + ("" if o else f"[->{tok.decode([p])!r}]") for t, p, o in zip(ids, pred, ok)))
print(f"copy accuracy over {n} tokens: {n_ok / n:.3f}")
