"""Training-step speed of a random-weight Llama on CPU, fp32 against bf16 autocast (AMX / AVX512-BF16
where the CPU has them). Usage: python results/bf16_cpu/bf16_probe.py [THREADS]"""
import time, torch, sys
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 2)
for d, L, V, B, T in [(256,4,4096,32,128),(256,4,4096,8,512),(512,6,4096,8,512)]:
    cfg = LlamaConfig(hidden_size=d, intermediate_size=4*d if d>256 else 688, num_hidden_layers=L, num_attention_heads=8, num_key_value_heads=8, vocab_size=V, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg); opt = torch.optim.AdamW(m.parameters(), 1e-3)
    ids = torch.randint(3, V, (B, T))
    for mode in ["fp32", "bf16"]:
        ts=[]
        for i in range(4):
            t=time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode=="bf16")):
                out = m(input_ids=ids, labels=ids)
            out.loss.backward(); opt.step(); opt.zero_grad()
            ts.append(time.perf_counter()-t)
        s=min(ts[1:])
        print(f"d{d} L{L} B{B} T{T} {mode}: {s*1000:.0f} ms/step {B*T/s:.0f} tok/s params {sum(p.numel() for p in m.parameters())/1e6:.1f}M", flush=True)
