"""Issue 33: the page's Ask view in headless Chromium against a running `refrag.py serve` (the quickstart's
command with --baseline): each mode's server TTFT and the first text the browser showed, timed from that mode's
own request. Usage: python results/serve_quickstart/page_order.py http://127.0.0.1:8000 "question" [runs]"""
import json
import re
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, question = sys.argv[1], sys.argv[2]
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    opts.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
out = []
try:
    driver.get(url + "/")
    WebDriverWait(driver, 60).until(lambda d: "reader" in d.find_element(By.ID, "server-info").text)
    for i in range(runs):
        box = driver.find_element(By.ID, "question")
        box.clear()
        box.send_keys(question)
        for field, value in (("p", "0"), ("max_new", "16")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "ask-button").click()
        WebDriverWait(driver, 120).until(lambda d: all(
            d.find_element(By.ID, f"answer-{m}").get_attribute("data-finished") for m in ("full", "refrag"))
            and d.find_elements(By.CSS_SELECTOR, "#stats-full .ttft"))
        row = {}
        for m in ("refrag", "full"):
            stats = driver.find_element(By.ID, f"stats-{m}").text
            first = re.search(r"first text in the browser after (\d+) ms", stats)
            row[m] = {"answer": driver.find_element(By.ID, f"answer-{m}").text,
                      "server_ttft_ms": float(driver.find_element(By.CSS_SELECTOR, f"#stats-{m} .ttft").text.split()[0]),
                      "browser_first_text_ms": int(first.group(1)) if first else None,
                      "reader": driver.find_element(By.CSS_SELECTOR, f"#stats-{m} .reader").text}
        row["refrag_finished_before_full_started"] = float(driver.find_element(By.ID, "answer-refrag").get_attribute(
            "data-finished")) <= float(driver.find_element(By.ID, "answer-full").get_attribute("data-started"))
        out.append(row)
        print(json.dumps(row), flush=True)
finally:
    driver.quit()
