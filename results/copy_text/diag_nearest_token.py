"""Diagnostic (run from the repository root): for a k = 1 cpt_recon checkpoint, how close are the
projected chunk embeddings of single decoder tokens to those tokens' own input embeddings?
  python results/copy_text/diag_nearest_token.py runs/recon_ct_k1 [--rms]
--rms rescales the projector output to the decoder's mean token-embedding RMS first (for checkpoints
trained with diag_recon_rms.py)."""
import json
import sys

import torch

sys.path.insert(0, ".")
import refrag  # noqa: E402

ck, rms = sys.argv[1], "--rms" in sys.argv
m = refrag.load_models(refrag.DEFAULT_DEC, refrag.MINILM_ID, refrag.MINILM_ID, ck, 1, torch.device("cpu"), torch.float32)
E = m.decoder.get_input_embeddings().weight.detach()
recs = [json.loads(line) for line in open("data/cpt_eval.jsonl", encoding="utf-8")][:30]
ids = [refrag.encode_text(m.tok, r["text"])[:16] for r in recs]
with torch.no_grad():
    z = m.projector(torch.cat(refrag.encode_chunks(m.encoder, m.tok, ids, 1)))
    if rms:
        z = z * (E.pow(2).mean(-1).sqrt().mean() / z.pow(2).mean(-1, keepdim=True).sqrt())
t = torch.tensor([x for s in ids for x in s])
cos = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(E, dim=-1).T
print(f"{len(t)} tokens | nearest token embedding (cosine) is the chunk's own token: {(cos.argmax(-1) == t).float().mean():.3f} | "
      f"cosine to own token {cos[torch.arange(len(t)), t].mean():.3f} | norm: projected {z.norm(dim=-1).mean():.2f}, "
      f"token embeddings {E[t].norm(dim=-1).mean():.2f}")
