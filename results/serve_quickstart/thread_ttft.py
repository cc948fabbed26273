"""REFRAG TTFT of one question on the main thread against worker threads (why `serve` generates on its main
thread). Needs runs/quickstart (bash refrag_quickstart_auto_accel.sh); run from the repository root:
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python results/serve_quickstart/thread_ttft.py"""
import threading
from concurrent.futures import ThreadPoolExecutor

import refrag

refrag.quiet_hf()
pipe = refrag.RefragPipeline.load(index_dir="runs/quickstart/index_sft", load_dir="runs/quickstart/sft", max_new=16, p=0.0)
q = "Which prize did Person_2336 receive?"
ttft = lambda: round(pipe.generate(q)["ttft_s"] * 1000, 1)  # noqa: E731
for _ in range(2):
    ttft()  # warm-up
print("main thread, ms:", [ttft() for _ in range(5)])
fresh = []
for _ in range(5):
    t = threading.Thread(target=lambda: fresh.append(ttft()))
    t.start()
    t.join()
print("a new thread per request, ms:", fresh)
with ThreadPoolExecutor(max_workers=1) as ex:
    print("one reused worker thread, ms:", [ex.submit(ttft).result() for _ in range(6)])
