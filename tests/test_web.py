"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
against `refrag.py serve` with a tiny decoder. .ci/run installs the browser and sets REFRAG_REQUIRE_BROWSER=1,
so there this test runs or fails; elsewhere it is skipped when no Chromium is installed."""
import json
import os
import shutil

import pytest

from test_serve import chat, post

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        if os.environ.get("REFRAG_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM} / {DRIVER}")
        pytest.skip("Chromium and chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def wait(driver, condition, seconds=90):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds).until(condition)


def test_page_asks_shows_runs_and_refuses_outside_paths(browser, server, tiny_dec_dir, tiny_baseline_dir):
    from selenium.webdriver.common.by import By
    css = lambda sel: browser.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
    browser.get(server + "/")
    wait(browser, lambda d: "reader" in d.find_element(By.ID, "server-info").text)
    for field, value in (("question", "Who led Event_314?"), ("max_new", "5"), ("p", "0.5"), ("topk", "4")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "ask-button").click()
    wait(browser, lambda d: css("#stats-full .ttft") and css("#stats-refrag .ttft"))
    for mode in ("full", "refrag"):  # the answer the page shows is the API's answer to the same request
        _, text = post(server, dict(chat("Who led Event_314?", mode=mode, p=0.5, topk=4), max_tokens=5))
        assert browser.find_element(By.ID, "answer-" + mode).text == json.loads(text)["choices"][0]["message"]["content"].strip()
        assert browser.find_element(By.CSS_SELECTOR, f"#stats-{mode} .ttft").text.endswith(" ms")
    # each answer names its reader (full mode: serve's --baseline); REFRAG ran first, full context after it
    assert browser.find_element(By.CSS_SELECTOR, "#stats-refrag .reader").text == tiny_dec_dir
    assert browser.find_element(By.CSS_SELECTOR, "#stats-full .reader").text == tiny_baseline_dir
    started, finished = (float(browser.find_element(By.ID, f"answer-{m}").get_attribute(f"data-{a}"))
                         for m, a in (("full", "started"), ("refrag", "finished")))
    assert finished <= started
    assert "full-context reader " + tiny_baseline_dir in browser.find_element(By.ID, "server-info").text
    assert css("#context-refrag .passage .chunk.expanded") and css("#context-refrag .passage .chunk.compressed")
    assert css("#context-full .passage .chunk.expanded") and not css("#context-full .passage .chunk.compressed")
    # drafting is on by default: each answer says how many decoder passes its tokens took
    assert "decoder passes" in browser.find_element(By.CSS_SELECTOR, "#stats-refrag .drafting").text
    # a follow-up continues the conversation: each column sends its own earlier answer back, as history
    wait(browser, lambda d: len(css("#conversation .turn")) == 1)
    first = {m: browser.find_element(By.ID, "answer-" + m).text for m in ("refrag", "full")}
    browser.find_element(By.ID, "question").send_keys("When did that event take place?")
    browser.find_element(By.ID, "ask-button").click()
    wait(browser, lambda d: css("#stats-full .history") and len(css("#conversation .turn")) == 2)
    for mode in ("full", "refrag"):
        msgs = [{"role": "user", "content": "Who led Event_314?"}, {"role": "assistant", "content": first[mode]},
                {"role": "user", "content": "When did that event take place?"}]
        _, text = post(server, {"messages": msgs, "max_tokens": 5, "refrag": {"mode": mode, "p": 0.5, "topk": 4}})
        assert browser.find_element(By.ID, "answer-" + mode).text == json.loads(text)["choices"][0]["message"]["content"].strip()
        assert "history: 1 earlier turn(s)" in browser.find_element(By.CSS_SELECTOR, f"#stats-{mode} .history").text
    browser.find_element(By.ID, "new-conversation").click()
    assert not css("#conversation .turn")

    browser.find_element(By.ID, "tab-runs").click()
    wait(browser, lambda d: css('.run-item[data-path="cpt_recon"]'))
    browser.find_element(By.CSS_SELECTOR, '.run-item[data-path="cpt_recon"] button.open').click()
    wait(browser, lambda d: css('#run-a svg.chart[data-metric="loss"] polyline'))
    points = css('#run-a svg.chart[data-metric="loss"] polyline')[0].get_attribute("points").split()
    assert len(points) == 4  # one per logged step of the 4-step run
    browser.find_element(By.CSS_SELECTOR, '.run-item[data-path="bench_like"] button.compare').click()
    wait(browser, lambda d: css("#run-b table"))
    assert "bench_like" in browser.find_element(By.ID, "run-b").text and "0.5000" in browser.find_element(By.ID, "run-b").text

    browser.get(server + "/api/run?path=../")
    assert "outside" in browser.find_element(By.TAG_NAME, "body").text
