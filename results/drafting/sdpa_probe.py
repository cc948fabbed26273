"""Decoder logits of one decode step fed alone and fed with 8 more positions (what a drafted pass feeds), SmolLM2-135M
after a 300-token prompt, bf16 and fp32, SDPA and eager attention batched, and SDPA row by row as refrag's drafted passes run it (drafted_pass): the largest
difference at the shared position (results/drafting). Run: PYTHONPATH=. python results/drafting/sdpa_probe.py"""
import copy

import torch

import refrag

for dtype in (torch.bfloat16, torch.float32):
    for attn in ("sdpa", "eager", "sdpa row by row"):
        dec = refrag.load_decoder(refrag.DEFAULT_DEC, torch.device("cpu"), dtype)
        dec.config._attn_implementation = attn.split()[0]  # read at every forward: the function is looked up by name
        ids = torch.randint(100, 40000, (1, 300), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            past = refrag.kv_cache_of(dec(input_ids=ids, use_cache=True))
            alone, _ = refrag.decode_step(dec, torch.tensor([[5]]), copy.deepcopy(past))
            with refrag.drafted_pass(dec, attn == "sdpa row by row"):
                drafted, _ = refrag.decode_step(dec, torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]]), past)
        diff = float((drafted.logits[0, 0].float() - alone.logits[0, 0].float()).abs().max())
        print(f"{str(dtype)[6:]:9s} {attn:15s} largest logit difference {diff:.6g} (largest logit "
              f"{float(alone.logits.float().abs().max()):.4g})", flush=True)
