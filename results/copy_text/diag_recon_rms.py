"""Diagnostic (run from the repository root): cpt_recon with the projector output rescaled to the
decoder's mean token-embedding RMS (not an option of refrag.py; the paper's projector has no such step).
  python results/copy_text/diag_recon_rms.py cpt_recon ... (the usual cpt_recon arguments)"""
import sys, torch
sys.path.insert(0, '.')
import refrag
from safetensors.torch import load_file
dec = sys.argv[sys.argv.index('--dec') + 1]  # a decoder directory with model.safetensors
E = load_file(dec + '/model.safetensors')['model.embed_tokens.weight']
TARGET = E.pow(2).mean(-1).sqrt().mean().item()
print("target rms", TARGET)
orig = refrag.Projector.forward
def fwd(self, c):
    z = orig(self, c)
    return z * (TARGET / z.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt())
refrag.Projector.forward = fwd
refrag.main(sys.argv[1:])
