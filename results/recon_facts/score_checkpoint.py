"""Score a cpt_recon checkpoint with the held-out fact-value / entity-id reconstruction metric that cpt_recon
prints at its end (refrag.eval_recon_facts), for checkpoints trained before the metric existed.
    python results/recon_facts/score_checkpoint.py runs/m_recon_base [out.json]"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import refrag  # noqa: E402

ckpt = sys.argv[1]
cfg = refrag.read_checkpoint_config(ckpt, None)
_, tok, dec, enc, proj = refrag.load_refrag_modules(ckpt, None, None, cfg["k"], torch.device("cpu"), torch.float32)
model = refrag.RefragModel(enc, proj, dec, tok)
ev = refrag.load_cpt_ids("data/cpt_eval.jsonl", "--eval_json", tok)
res = refrag.eval_recon_facts(model, *refrag.held_out_facts(ev, "data/rag_eval.jsonl"), tok, cfg["k"])
refrag.print_recon_facts(res, ckpt)
if len(sys.argv) > 2:
    refrag.write_json(sys.argv[2], {"checkpoint": ckpt, "facts": res})
