"""Real reader behind `refrag.py serve` (the quickstart checkpoint): five held-out questions streamed through the
openai client in full and REFRAG (p = 0) mode, then the page screenshot docs/page.png. Run from anywhere after
`bash refrag_quickstart_auto_accel.sh` (needs runs/quickstart) with .venv/bin/python."""
import json, os, subprocess, sys, time, urllib.request
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
port = 8800
url = f"http://127.0.0.1:{port}"
proc = subprocess.Popen([sys.executable, "refrag.py", "serve", "--index_dir", "runs/quickstart/index_sft",
                         "--load_dir", "runs/quickstart/sft", "--port", str(port), "--runs_dir", "runs", "--max_new", "16", "--p", "0"],
                        cwd=ROOT, stdout=open(os.path.join(HERE, "serve.log"), "w"), stderr=subprocess.STDOUT)
t0 = time.time()
while True:
    try:
        urllib.request.urlopen(url + "/health", timeout=1); break
    except OSError:
        time.sleep(0.5)
print(f"serve up after {time.time() - t0:.1f} s", flush=True)
from openai import OpenAI
client = OpenAI(base_url=url + "/v1", api_key="unused")
qs = [json.loads(l) for l in open(os.path.join(ROOT, "data/rag_eval.jsonl"))][:5]
out = []
for r in qs:
    row = {"question": r["question"], "gold": r["answers"][0]}
    for mode in ("full", "refrag"):
        t = time.perf_counter(); first = None; parts = []; last = None
        for c in client.chat.completions.create(model="refrag", messages=[{"role": "user", "content": r["question"]}],
                                                stream=True, max_tokens=16, extra_body={"refrag": {"mode": mode, "p": 0.0}}):
            if c.choices and c.choices[0].delta.content:
                if first is None: first = time.perf_counter() - t
                parts.append(c.choices[0].delta.content)
            last = c
        rec = last.model_extra["refrag"]
        row[mode] = {"answer": "".join(parts).strip(), "server_ttft_ms": round(rec["ttft_s"] * 1000, 1),
                     "client_first_text_ms": round(first * 1000, 1) if first else None, "prompt_positions": rec["prompt_positions"]}
    out.append(row)
    print(json.dumps(row), flush=True)
json.dump(out, open(os.path.join(HERE, "openai_stream.json"), "w"), indent=1)
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
o = webdriver.ChromeOptions(); o.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900"]:
    o.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
d.get(url + "/")
WebDriverWait(d, 30).until(lambda d: "decoder" in d.find_element(By.ID, "server-info").text)
for f, v in (("question", qs[0]["question"]), ("max_new", "16"), ("p", "0.25"), ("topk", "8")):
    e = d.find_element(By.ID, f); e.clear(); e.send_keys(v)
d.find_element(By.ID, "ask-button").click()
WebDriverWait(d, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stats-full .ttft") and d.find_elements(By.CSS_SELECTOR, "#stats-refrag .ttft"))
time.sleep(0.5)
os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
d.save_screenshot(os.path.join(ROOT, "docs", "page.png"))
print("page:", d.find_element(By.ID, "answer-full").text, "|", d.find_element(By.ID, "answer-refrag").text,
      "|", d.find_element(By.ID, "stats-full").text, "|", d.find_element(By.ID, "stats-refrag").text)
d.quit(); proc.terminate()
