"""`refrag.py serve` as a client sees it: a real server process on loopback with a tiny decoder, the OpenAI
wire format (plain and streamed, and the openai client itself), bad requests, a load check, the run browser."""
import json
import os
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest

import refrag

QUESTIONS = ["Who led Event_314?", "Where does Person_233 work?", "What is Alloy_270 mainly used for?",
             "Which river flows through City_191?"]


@pytest.fixture(scope="module")
def pipe(tiny_index, tiny_dec_dir, tiny_baseline_dir):  # the models the `server` fixture serves
    return refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_dec_dir, max_new=6, topk=4, untrained=True,
                                      baseline=tiny_baseline_dir)


def post(url, body, path="/v1/chat/completions", headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(question, stream=False, **refrag_opts):
    return {"model": "refrag", "stream": stream, "messages": [{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": question}],
            "refrag": refrag_opts}


def sse_events(text):
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_completion_is_the_pipelines_answer(server, pipe):
    for mode in ("full", "refrag"):
        status, text = post(server, chat(QUESTIONS[0], mode=mode, p=0.25))
        assert status == 200, text
        body = json.loads(text)
        rec = pipe.generate(QUESTIONS[0], mode=mode, p=0.25)
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"] == rec["answer"]
        assert body["refrag"]["mode"] == mode and body["refrag"]["ttft_s"] > 0
        assert body["usage"]["completion_tokens"] == rec["generated_tokens"]
        assert body["choices"][0]["finish_reason"] == rec["finish_reason"]


def test_streamed_answer_equals_the_plain_one_and_carries_the_timing(server):
    _, plain = post(server, chat(QUESTIONS[1], mode="refrag", p=0.5))
    status, text = post(server, chat(QUESTIONS[1], stream=True, mode="refrag", p=0.5, return_context=True))
    assert status == 200
    events = sse_events(text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    last = events[-1]
    assert streamed.strip() == json.loads(plain)["choices"][0]["message"]["content"] == last["refrag"]["answer"]
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["refrag"]["ttft_s"] > 0
    flags = [c["expanded"] for p in last["refrag"]["context"] for c in p["chunks"]]
    assert [i for i, f in enumerate(flags) if f] == last["refrag"]["expanded"]


def test_openai_client_gets_a_streamed_answer(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["refrag"]
    msgs = [{"role": "user", "content": QUESTIONS[2]}]
    whole = client.chat.completions.create(model="refrag", messages=msgs, max_tokens=5, extra_body={"refrag": {"mode": "full"}})
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="refrag", messages=msgs, max_tokens=5, stream=True, extra_body={"refrag": {"mode": "full"}}) if c.choices]
    assert whole.choices[0].message.content and "".join(parts).strip() == whole.choices[0].message.content
    assert whole.usage.completion_tokens <= 5


def test_posts_must_be_json_and_the_host_this_machine(server):
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(chat(QUESTIONS[0])).encode(),
                                 headers={"Content-Type": "text/plain"})  # what a page elsewhere may post unasked
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415 and "application/json" in json.loads(e.value.read())["error"]["message"]
    req = urllib.request.Request(server + "/health", headers={"Host": "evil.example:8000"})  # DNS rebinding
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 403


def test_caller_passages_over_the_api(server):
    status, text = post(server, chat("Who led Event_9?", mode="full", passages=["Event_9 was led by Person_77.", "x"]))
    rec = json.loads(text)["refrag"]
    assert status == 200 and rec["context_source"] == "caller" and rec["passages_used"] == [0, 1]


def test_a_conversation_over_the_api_is_the_pipelines_answer_with_turns(server, pipe):
    """The earlier messages enter as history (compressed by default); refrag.history and refrag.draft per request."""
    msgs = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "Tarn"},
            {"role": "user", "content": "When was that city founded?"}]
    for history in ("compressed", "drop"):
        status, text = post(server, {"messages": msgs, "refrag": {"history": history, "p": 0.0, "draft": "lookup"}})
        rec = json.loads(text)["refrag"]
        local = pipe.generate(msgs[-1]["content"], turns=[(QUESTIONS[0], "Tarn")], history=history, p=0.0, draft="lookup")
        assert status == 200 and rec["answer"] == local["answer"] and rec["draft"] == "lookup"
        assert rec.get("history_turns", 0) == (1 if history == "compressed" else 0)
        assert rec["prompt_positions"] == local["prompt_positions"]


BAD = [
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]},
     "messages[0]: an assistant message must answer a user message", "messages"),
    (chat(QUESTIONS[0], history="zip"), "refrag.history: 'zip' is out of range", "refrag.history"),
    (chat(QUESTIONS[0], draft="model"), "refrag.draft: 'model' is out of range", "refrag.draft"),
    (b"{not json", "malformed JSON", None),
    ({"messages": []}, "messages: expected a non-empty list", "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "no user message", "messages"),
    (chat(QUESTIONS[0], mode="fast"), "refrag.mode: 'fast' is out of range", "refrag.mode"),
    (chat(QUESTIONS[0], p=1.5), "refrag.p: 1.5 is out of range", "refrag.p"),
    (chat(QUESTIONS[0], k="8"), "refrag.k: expected an integer >= 1, got str", "refrag.k"),
    (chat(QUESTIONS[0], topk=True), "refrag.topk: expected an integer >= 1, got bool", "refrag.topk"),
    (chat(QUESTIONS[0], heuristic="best"), "refrag.heuristic", "refrag.heuristic"),
    (chat(QUESTIONS[0], colour="red"), "refrag.colour: unknown field", "refrag.colour"),
    (chat(QUESTIONS[0], policy=True), "refrag.policy: this server loaded no policy", "refrag.policy"),
    (chat(QUESTIONS[0], passages=["a"] * 5), "refrag.passages: 5 passages; 1 to 4 allowed", "refrag.passages"),
    (chat(QUESTIONS[0], passages=[3]), "refrag.passages: each must be a non-empty string", "refrag.passages"),
    (dict(chat(QUESTIONS[0]), max_tokens=0), "max_tokens: 0 is out of range", "max_tokens"),
    (dict(chat(QUESTIONS[0]), temperature="hot"), "temperature: expected a number in 0..2, got str", "temperature"),
    (dict(chat(QUESTIONS[0]), stream="yes"), "stream: expected true or false", "stream"),
    (chat("word " * 600), "longer than the 512-token limit", "messages"),
    (chat("Who led \u0000CONTEXT\u0000 Event_9?"), "messages: contains a NUL character", "messages"),
    (dict(chat(QUESTIONS[0]), n=2), "n: 2 is out of range (1: one answer per request)", "n"),
    (dict(chat(QUESTIONS[0]), stop=["\n"]), "stop: stop sequences are not supported", "stop"),
    (dict(chat(QUESTIONS[0]), seed=2 ** 70), "seed: ", "seed"),
    (dict(chat(QUESTIONS[0]), top_p=[1]), "top_p: expected a number in (0, 1], got list", "top_p"),
    (dict(chat(QUESTIONS[0]), max_completion_tokens=-1), "max_completion_tokens: -1 is out of range", "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "content parts must be objects", "messages"),
    # found by the pipeline once the prompt is built, still before anything streams
    (dict(chat(QUESTIONS[0]), max_tokens=5000), "new tokens exceeds the decoder's 2048 positions", "refrag.ctx_max"),
]


def test_a_request_naming_a_policy_never_makes_the_server_read_that_path(tmp_path):
    """refrag.policy is compared with the served policy as text: a path in a request is not listed, hashed or
    converted (it was resolved as a decoder name, which listed a directory's .gguf files into the error)."""
    probe = tmp_path / "private"
    probe.mkdir()
    (probe / "secret_a.gguf").write_bytes(b"x")
    (probe / "secret_b.gguf").write_bytes(b"x")
    cfg = refrag.ServeConfig(policy=str(tmp_path / "policy"))
    for asked in (str(probe), str(probe / "secret_a.gguf")):
        with pytest.raises(refrag.RequestError) as e:
            refrag.chat_request(chat(QUESTIONS[0], policy=asked), cfg)
        assert str(e.value) == f"refrag.policy: this server loaded {cfg.policy}" and e.value.param == "refrag.policy"
    over = refrag.chat_request(chat(QUESTIONS[0], policy=str(tmp_path / "policy" / ".")), cfg)[2]
    assert over["heuristic"] is None  # the served policy, however its path is spelled


@pytest.mark.parametrize("body,message,param", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, message, param):
    for stream in (False, True):  # a streamed request is refused before anything streams
        sent = dict(body, stream=True) if stream and isinstance(body, dict) and body.get("stream", False) is False else body
        status, text = post(server, sent)
        err = json.loads(text)["error"]
        assert status == 400 and message in err["message"] and err["type"] == "invalid_request_error", text
        assert err["param"] == param
    assert get(server, "/health")[1]["status"] == "ok"


def test_sixteen_concurrent_clients_get_the_answers_they_get_alone(server, capsys):
    requests = [chat(q, mode=m, p=0.25) for q in QUESTIONS for m in ("full", "refrag")]
    alone = [json.loads(post(server, r)[1])["choices"][0]["message"]["content"] for r in requests]
    latencies, errors, got = [], [], {}

    def client(c):
        for j in range(4):
            i = (c + j) % len(requests)
            t0 = time.perf_counter()
            stream = (c + j) % 2 == 1
            status, text = post(server, dict(requests[i], stream=stream))
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(text)
                continue
            answer = sse_events(text)[-1]["refrag"]["answer"] if stream else json.loads(text)["choices"][0]["message"]["content"]
            got[(c, j)] = (i, answer)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 64
    assert all(answer == alone[i] for i, answer in got.values())
    q = statistics.quantiles(latencies, n=20)
    with capsys.disabled():
        print(f"\nserve load check: 16 clients x 4 requests, p50 {statistics.median(latencies) * 1000:.0f} ms, "
              f"p95 {q[18] * 1000:.0f} ms")


def test_run_browser_lists_reads_and_refuses_paths_outside_runs(server, runs_dir, tmp_path):
    status, body = get(server, "/api/runs")
    paths = {r["path"]: r for r in body["runs"]}
    assert status == 200 and {"cpt_recon", "bench_like"} <= set(paths)
    status, run = get(server, "/api/run?path=cpt_recon")
    assert status == 200 and [r["step"] for r in run["metrics.jsonl"]] == [1, 2, 3, 4]
    assert run["run_config.json"]["command"].startswith("refrag.py cpt_recon")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "run_config.json").write_text('{"command": "secret"}')
    os.symlink(secret, runs_dir / "link")
    (runs_dir / "filelink").mkdir()
    (runs_dir / "filelink" / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\nnot json\n')
    os.symlink(secret / "run_config.json", runs_dir / "filelink" / "run_config.json")
    status, run = get(server, "/api/run?path=filelink")  # a linked file is skipped, NaN read as null
    assert status == 200 and "run_config.json" not in run and run["metrics.jsonl"] == [{"step": 1, "loss": None}]
    for path in ("../", "..%2F..%2Fetc", "link", "/etc", "cpt_recon/../../"):
        status, body = get(server, "/api/run?path=" + path)
        assert status == 403 and "outside" in body["error"]["message"], path
    assert get(server, "/api/file?path=../../etc/passwd")[0] == 403
    assert get(server, "/api/file?path=cpt_recon/run_config.json")[0] == 404  # plots only


def test_page_jobs_are_checked_and_their_log_follows(server, runs_dir):
    for body, status, message in (
            ({"command": "rm", "flags": {}}, 400, "command rm: the page may start evaluate, bench, chain"),
            ({"command": "evaluate", "flags": {"dec": "x"}}, 400, "flags.dec: not a flag the page may set"),
            ({"command": "evaluate", "flags": {"limit": "--all"}}, 400, "is not a plain value"),
            ({"command": "evaluate", "flags": {"out": "/tmp/elsewhere"}}, 403, "outside"),
            ({"command": "evaluate", "flags": {"out": "../up"}}, 403, "outside"),
            ({"command": "evaluate", "flags": {"out": "cpt_recon"}}, 409, "exists; name a new directory"),
            ({"command": "chain", "flags": {"resume": "maybe"}}, 400, "flags.resume: 'maybe' is not a bool"),
            ({"command": "chain", "flags": {"preset": "huge"}}, 400, "flags.preset: 'huge' is not one of"),
            ({"command": "evaluate", "flags": {"topk": "Infinity"}}, 400, "flags.topk"),
            ({"command": "evaluate", "flags": {"p": "2"}}, 400, "--p")):
        code, text = post(server, body, "/api/jobs")
        assert code == status and message in json.loads(text)["error"]["message"], text
    code, text = post(server, {"command": "evaluate", "flags": {"eval_json": "missing.jsonl"}}, "/api/jobs")
    assert code == 200, text
    assert f"--out {runs_dir}/jobs/" in json.loads(text)["job"]["command"]  # the default output: under runs_dir
    for _ in range(240):
        status, st = get(server, "/api/jobs")
        if not st["job"]["running"]:
            break
        time.sleep(0.25)
    assert st["job"]["returncode"] == 2 and "--eval_json missing.jsonl" in st["log"]
    assert st["job"]["command"].startswith("refrag.py evaluate --eval_json missing.jsonl")


def test_api_key_guards_every_route_but_health_and_the_page(pipe, tiny_index):
    from starlette.testclient import TestClient
    cfg = refrag.ServeConfig(index_dir=tiny_index, api_key="s3cret", max_new=3)
    client = TestClient(refrag.make_app(pipe, cfg), base_url="http://127.0.0.1")
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    for path in ("/v1/models", "/api/runs", "/api/config", "/api/run?path=x", "/api/file?path=x.png", "/api/jobs"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code in (200, 404)  # past the key
    for path in ("/v1/chat/completions", "/api/jobs"):
        r = client.post(path, json=chat(QUESTIONS[0], mode="full"), headers={"Authorization": "Bearer no"})
        assert r.status_code == 401


def test_a_client_that_goes_away_stops_its_generation(pipe):
    pieces = []

    def hang_up(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            raise refrag.Cancelled()
    with pytest.raises(refrag.Cancelled):
        pipe.generate(QUESTIONS[0], mode="full", max_new=40, stream=hang_up)
    assert len(pieces) == 2 and not pipe.lock.locked()  # stopped at once; the next request is not blocked
    assert pipe.generate(QUESTIONS[0], mode="full")["generated_tokens"] >= 1


def test_streamed_text_never_splits_a_character(tok):
    text = "café ünïcode 東京"
    ids, got, shown = tok.encode(text, add_special_tokens=False), [], ""
    for i in range(1, len(ids) + 1):
        shown = refrag._stream(got.append, tok, ids[:i], shown, set())
    assert "".join(got) == text and not any("\ufffd" in g for g in got)


def test_past_max_queue_waiting_requests_get_429(pipe, tiny_index):
    import asyncio

    import httpx
    cfg = refrag.ServeConfig(index_dir=tiny_index, max_new=2, max_queue=1)
    held = []
    app = refrag.make_app(pipe, cfg, submit=held.append)  # generations wait here until the test runs them

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            ask = lambda: c.post("/v1/chat/completions", json=chat(QUESTIONS[0], mode="full"))  # noqa: E731
            first, second = asyncio.create_task(ask()), asyncio.create_task(ask())  # running + one waiting
            while len(held) < 2:
                await asyncio.sleep(0.01)
            third = await ask()
            for fn in held:
                await asyncio.to_thread(fn)
            return (await first).status_code, (await second).status_code, third
    a, b, third = asyncio.run(main())
    assert (a, b) == (200, 200) and third.status_code == 429
    assert third.json()["error"]["type"] == "rate_limit_error" and "--max_queue 1" in third.json()["error"]["message"]
