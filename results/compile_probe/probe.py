"""Would torch.compile shorten TTFT? Eager against compiled SmolLM2-135M (bf16, this CPU): the
prefill of a REFRAG-sized prompt (118 positions) and a full-context one (1,000), one cached decoding
step, and what compiling costs the first request. Run from the repository root:
    PYTHONPATH=. .venv/bin/python results/compile_probe/probe.py > results/compile_probe/probe.log"""
import statistics
import time

import torch

import refrag


def median_ms(fn, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


@torch.no_grad()
def measure(model, label: str) -> dict:
    out = {}
    for n in (118, 1000):
        ids = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(n))
        t = time.perf_counter()
        model(input_ids=ids, use_cache=True)  # the first call compiles when model is compiled
        out[f"first_call_{n}_s"] = time.perf_counter() - t
        out[f"prefill_{n}_ms"] = median_ms(lambda: model(input_ids=ids, use_cache=True))
    ids = torch.randint(100, 40000, (1, 118), generator=torch.Generator().manual_seed(0))
    past = refrag.kv_cache_of(model(input_ids=ids, use_cache=True))
    nxt = torch.tensor([[42]])

    def step():
        nonlocal past
        _, past = refrag.decode_step(model, nxt, past)
    t = time.perf_counter()
    step()
    out["first_step_s"] = time.perf_counter() - t
    out["decode_step_ms"] = median_ms(step, reps=15)
    print(label, {k: round(v, 3) for k, v in out.items()}, flush=True)
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    dec = refrag.load_decoder("smollm2", torch.device("cpu"), torch.bfloat16)
    print("torch", torch.__version__, "threads", torch.get_num_threads())
    eager = measure(dec, "eager")
    compiled = measure(torch.compile(dec), "compiled")
    for key in eager:
        if key.endswith("_ms"):
            print(f"{key:18s} eager {eager[key]:7.1f} ms  compiled {compiled[key]:7.1f} ms")
    print(f"compile cost on first calls: {sum(v for k, v in compiled.items() if k.startswith('first')):.0f} s")
