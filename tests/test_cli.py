"""Each subcommand of refrag.py run the way a user runs it (in-process), asserting on its outputs."""
import json
import os
import time

import numpy as np
import pytest
import torch

import refrag
from conftest import DATA, N_PASSAGES, ROOT, load_json, run_cli, save_decoder, tiny_llama


def gen_json(index_dir, dec_dir, question, *extra):
    code, out, err = run_cli("generate", "--index_dir", index_dir, "--dec", dec_dir, "--question", question,
                             "--max_new", 6, "--json", "--untrained", *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_index_writes_cache_and_metadata(tiny_index, tiny_dec_dir, passages, tok):
    meta = load_json(os.path.join(tiny_index, "meta.json"))
    assert meta["n_passages"] == N_PASSAGES and meta["embed_dim"] == 384
    cc = meta["chunk_cache"]
    assert cc["n_chunks"].keys() == {"16"} and cc["dim"] == 384 and cc["enc"] == refrag.MINILM_ID and cc["pooling"] == "mean"
    idx = refrag.PassageIndex(tiny_index)
    assert idx.texts == passages
    ids0 = refrag.encode_text(tok, passages[0])
    assert idx.passage_ids([0])[0].tolist() == ids0
    assert idx.passage_texts([2, 0]) == [passages[2], passages[0]]
    assert idx.cached_chunks([0], 16)[0].shape == (len(refrag.split_chunks(ids0, 16)), 384)
    assert cc["n_chunks"]["16"] == sum(-(-len(refrag.encode_text(tok, p)) // 16) for p in passages)
    # the cache holds what the encoder computes for those chunks (in the dtype it ran in), stored as fp16
    assert cc["dtype"] == "float16" and idx.cached_chunks([0], 16)[0].dtype == np.float16
    dtype = getattr(torch, cc["computed_in"])
    enc = refrag.ChunkEncoder(refrag.MINILM_ID).to(dtype=dtype).eval()
    with torch.no_grad():
        fresh = refrag.encode_chunks(enc, tok, [ids0], 16)[0]
    cached = torch.from_numpy(np.array(idx.cached_chunks([0], 16)[0])).float()
    assert torch.nn.functional.cosine_similarity(cached, fresh.float()).min() > 0.999
    assert (cached - fresh.float()).abs().max() < (2e-2 if dtype == torch.bfloat16 else 2e-3)
    for name in os.listdir(tiny_index):
        if name.endswith(".npy"):
            np.load(os.path.join(tiny_index, name), allow_pickle=False)  # no pickled arrays


def test_retrieval_finds_the_entity_passage(tiny_index, tiny_dec_dir, passages):
    name = passages[3].split(" ", 1)[0]
    rec = gen_json(tiny_index, tiny_dec_dir, f"Where is {name}?", "--mode", "full", "--topk", 4)
    assert 3 in [r["id"] for r in rec["retrieved"]]


def test_generate_modes_report_honest_timing(tiny_index, tiny_dec_dir, passages):
    q = f"Which river flows through {passages[0].split(' ', 1)[0]}?"
    full = gen_json(tiny_index, tiny_dec_dir, q, "--mode", "full", "--topk", 4)
    ref = gen_json(tiny_index, tiny_dec_dir, q, "--mode", "refrag", "--topk", 4, "--p", 0.25)
    none = gen_json(tiny_index, tiny_dec_dir, q, "--mode", "none")
    for rec in (full, ref, none):
        bd = rec["ttft_breakdown"]
        assert set(bd) == {"retrieve_s", "encode_s", "select_s", "project_s", "prefill_s"}
        assert all(v >= 0 for v in bd.values())
        assert sum(bd.values()) == pytest.approx(rec["ttft_s"], rel=1e-6)
        assert rec["generated_tokens"] >= 1 and rec["throughput_tok_s"] > 0
        assert rec["total_s"] >= rec["ttft_s"]
    assert full["passages_used"] == ref["passages_used"] and full["context_tokens"] == ref["context_tokens"]
    n_chunks = sum(-(-len(x) // 16) for x in refrag.PassageIndex(tiny_index).passage_ids(ref["passages_used"]))
    assert ref["n_chunks"] == n_chunks and len(ref["expanded"]) == round(0.25 * n_chunks)
    # prompt positions: each compressed chunk is one position, each expanded chunk its tokens
    assert ref["prompt_positions"] < full["prompt_positions"]
    assert full["prompt_positions"] - full["context_tokens"] == none["prompt_positions"] + \
        (len(full["passages_used"]) - 1)  # separators between passages
    assert ref["chunk_cache"] == "hit" and full["chunk_cache"] == "n/a"
    assert none["context_tokens"] == 0 and none["retrieved"] == []


def test_breakdown_puts_the_same_work_in_the_same_stage_in_every_mode(tiny_index, tiny_dec_dir, passages,
                                                                     monkeypatch):
    """The template prefix's KV cache (prefix_kv) is prefill work in every mode; it was counted as projection in
    refrag mode and as prefill in full mode, so prefill_s could not be compared across modes."""
    real = refrag.prefix_kv

    def slow_prefix_kv(*a, **kw):
        time.sleep(0.3)
        return real(*a, **kw)

    monkeypatch.setattr(refrag, "prefix_kv", slow_prefix_kv)
    q = f"Which river flows through {passages[0].split(' ', 1)[0]}?"
    for mode in ("refrag", "full", "none"):
        bd = gen_json(tiny_index, tiny_dec_dir, q, "--mode", mode, "--topk", 4, "--p", 0.25, "--warmup", 0)["ttft_breakdown"]
        assert bd["prefill_s"] >= 0.3 and bd["project_s"] < 0.3, (mode, bd)


def test_first_token_comes_from_prefill_and_greedy_matches_uncached_decoding(tiny_index, tiny_dec_dir, tok):
    rec = gen_json(tiny_index, tiny_dec_dir, "Who led Event_314?", "--mode", "full", "--topk", 2)
    idx = refrag.PassageIndex(tiny_index)
    prefix, sep, suffix = refrag.prompt_pieces(tok, "Who led Event_314?")
    ids = list(prefix)
    for j, x in enumerate(idx.passage_ids(rec["passages_used"])):
        ids += (sep if j else []) + x.tolist()
    ids += suffix
    dec = refrag.load_decoder(tiny_dec_dir, torch.device("cpu"), torch.float32)
    gen = []
    with torch.no_grad():
        for _ in range(rec["generated_tokens"]):  # no KV cache: full forward each step
            nxt = int(dec(input_ids=torch.tensor([ids + gen])).logits[0, -1].argmax())
            gen.append(nxt)
            if nxt == tok.eos_token_id:
                break
    assert rec["answer"] == tok.decode([t for t in gen if t != tok.eos_token_id], skip_special_tokens=True).strip()


def test_all_expanded_refrag_answers_like_full(tiny_index, tiny_dec_dir):
    q = "In which year was Alloy_270 first produced?"
    full = gen_json(tiny_index, tiny_dec_dir, q, "--mode", "full")
    ref = gen_json(tiny_index, tiny_dec_dir, q, "--mode", "refrag", "--p", 1.0)
    assert ref["answer"] == full["answer"] and ref["prompt_positions"] == full["prompt_positions"]
    assert len(ref["expanded"]) == ref["n_chunks"]


def test_cache_hit_miss_and_no_cache_agree(tiny_index, tiny_dec_dir):
    q = "What is Alloy_270 mainly used for?"
    hit = gen_json(tiny_index, tiny_dec_dir, q, "--p", 0)
    off = gen_json(tiny_index, tiny_dec_dir, q, "--p", 0, "--no_cache")
    miss = gen_json(tiny_index, tiny_dec_dir, q, "--p", 0, "--k", 8)
    assert hit["chunk_cache"] == "hit" and off["chunk_cache"].startswith("off")
    assert miss["chunk_cache"] == "miss (index cached k=16, asked k=8)"
    assert hit["answer"] == off["answer"] and miss["n_chunks"] > hit["n_chunks"]


def test_heuristics_select_by_perplexity(tiny_index, tiny_dec_dir):
    q = "Who led Event_314?"
    desc = gen_json(tiny_index, tiny_dec_dir, q, "--heuristic", "--p", 0.5)
    asc = gen_json(tiny_index, tiny_dec_dir, q, "--heuristic", "ppl_asc", "--p", 0.5)
    assert desc["selection"] == "ppl_desc" and asc["selection"] == "ppl_asc"
    assert len(desc["expanded"]) == len(asc["expanded"]) == round(0.5 * desc["n_chunks"])
    assert desc["expanded"] != asc["expanded"]


def test_ctx_max_keeps_whole_passages_in_rank_order(tiny_index, tiny_dec_dir):
    rec = gen_json(tiny_index, tiny_dec_dir, "Who led Event_314?", "--mode", "full", "--ctx_max", 250)
    assert 0 < rec["context_tokens"] <= 250
    assert rec["passages_used"] == [r["id"] for r in rec["retrieved"]][:len(rec["passages_used"])]


def test_generate_streams_answer_and_writes_out_dir(tiny_index, tiny_dec_dir, tmp_path):
    code, out, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--question", "Who led Event_314?",
                             "--max_new", 4, "--out_dir", tmp_path / "g", "--untrained")
    assert code == 0, err
    rec = load_json(tmp_path / "g" / "generate.json")
    assert rec["answer"] and out.strip() == rec["answer"]  # what was streamed is the (non-empty) recorded answer
    assert 1 <= rec["generated_tokens"] <= 4 and rec["ttft_s"] > 0
    assert "TTFT" in err and "cache hit" in err
    assert load_json(tmp_path / "g" / "run_config.json")["config"]["question"] == "Who led Event_314?"


def test_embed_model_flag_names_the_index_retriever_or_is_refused(tiny_index, tiny_dec_dir, tmp_path):
    # the seed's command lines pass --embed_model to generate and train_policy
    q = ("--index_dir", tiny_index, "--dec", tiny_dec_dir, "--question", "Who led Event_314?", "--max_new", 2,
         "--untrained")
    code, out, err = run_cli("generate", *q, "--embed_model", "sentence-transformers/all-MiniLM-L6-v2")
    assert code == 0, err
    other = str(tmp_path / "another-encoder")
    code, out, err = run_cli("generate", *q, "--embed_model", other)
    assert code == 2 and f"--embed_model {other}: the index in {tiny_index} was built with " in err
    code, out, err = run_cli("train_policy", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--embed_model", other,
                             "--steps", 1, "--out_dir", tmp_path / "pol")
    assert code == 2 and f"--embed_model {other}: the index" in err and not (tmp_path / "pol").exists()


@pytest.mark.parametrize("args,message", [
    (["--index_dir", "/nonexistent/idx"], "--index_dir /nonexistent/idx: no index there"),
    (["--question", "  "], "--question: empty question"),
    (["--question", "word " * 600], "tokens, longer than the 512-token limit"),
    (["--dec", "/nonexistent/model"], "--dec /nonexistent/model: cannot load"),
    (["--p", "1.5"], "--p 1.5: must be between 0 and 1"),
    (["--topk", "0"], "--topk 0: must be at least 1"),
])
def test_generate_bad_input_gives_one_line_error(tiny_index, tiny_dec_dir, args, message):
    base = {"--index_dir": tiny_index, "--dec": tiny_dec_dir, "--question": "Who led Event_314?"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["generate"] + [x for kv in base.items() for x in kv] + ["--untrained"]
    code, out, err = run_cli(*argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err


def test_serve_takes_every_model_and_retrieval_flag_generate_takes():
    import argparse
    sub = next(a for a in refrag.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = lambda command: {s for a in sub[command]._actions for s in a.option_strings}  # noqa: E731
    assert flags("generate") - flags("serve") == {"--question", "--messages", "--json", "--out_dir"}  # one question's flags


def test_generate_refuses_index_built_for_another_tokenizer(tiny_index, tmp_path, tok):
    model = tiny_llama(tok, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    other = tmp_path / "other"
    other.mkdir()
    tok2 = refrag.load_tokenizer(os.path.join(DATA, "tokenizer.json"))
    tok2.add_tokens(["<extra>"])
    save_decoder(model, tok2, str(other))
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", other, "--question", "x?", "--untrained")
    assert code == 2 and "built with decoder tokenizer" in err


def test_bad_corpus_line_is_named(tmp_path, tiny_dec_dir):
    bad = tmp_path / "bad.txt"
    bad.write_text("City_1 is a city.\n\nCity_2 is a city.\n")
    code, _, err = run_cli("index", "--corpus", bad, "--index_dir", tmp_path / "i", "--dec", tiny_dec_dir)
    assert code == 2 and f"--corpus {bad}:2: empty line" in err
    assert not (tmp_path / "i").exists()


def test_a_resumed_index_build_counts_the_time_of_shards_built_before(tmp_path, tiny_dec_dir, small_corpus, monkeypatch):
    """meta.json's build seconds and passages/s (bench_index reports them) cover the whole build, also when a
    killed build was resumed: here the first shard took over 4 s in a process that then died."""
    real, calls = refrag.index_shard, []

    def first_slow_then_killed(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after its first shard
        time.sleep(4)
        return real(*a, **kw)

    argv = ("index", "--corpus", small_corpus, "--index_dir", tmp_path / "idx", "--dec", tiny_dec_dir, "--k", 16,
            "--shard_size", 16)
    monkeypatch.setattr(refrag, "index_shard", first_slow_then_killed)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*argv)
    monkeypatch.setattr(refrag, "index_shard", real)
    code, out, err = run_cli(*argv)
    assert code == 0 and "1 of 3 shards already built" in out, err
    build = load_json(tmp_path / "idx" / "meta.json")["build"]
    assert build["seconds"] >= 4 and build["passages_per_s"] <= N_PASSAGES / 4, build


def test_index_rebuild_is_atomic(tmp_path, tiny_dec_dir, small_corpus, monkeypatch):
    d = tmp_path / "idx"
    assert run_cli("index", "--corpus", small_corpus, "--index_dir", d, "--dec", tiny_dec_dir, "--k", 32)[0] == 0
    before = load_json(d / "meta.json")

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(refrag.np, "save", boom)
    with pytest.raises(RuntimeError):
        run_cli("index", "--corpus", small_corpus, "--index_dir", d, "--dec", tiny_dec_dir, "--k", 8)
    assert load_json(d / "meta.json") == before  # the old index survives a failed rebuild
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_evaluate_scores_a_grid_and_resumes(tiny_index, tiny_dec_dir, tmp_path, small_corpus):
    qa = tmp_path / "qa.jsonl"
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    names = {line.split(" ", 1)[0] for line in open(small_corpus, encoding="utf-8")}
    qa.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["entity"] in names][:3]))
    argv = ["evaluate", "--eval_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--modes", "full,refrag,none",
            "--k", "8,16", "--p", "0,0.5", "--heuristic", "random,ppl_desc", "--max_new", 4, "--out", tmp_path / "ev"]
    code, out, err = run_cli(*argv)
    assert code == 0, err
    res = load_json(tmp_path / "ev" / "results.json")
    keys = [refrag.config_key(r) for r in res["results"]]
    twin = lambda key: [key, key + " expanded-only"]  # noqa: E731  (p > 0: the expanded chunks alone beside it)
    assert keys == ["full", "refrag k=8 p=0 sel=none", *twin("refrag k=8 p=0.5 sel=random"),
                    *twin("refrag k=8 p=0.5 sel=ppl_desc"), "refrag k=16 p=0 sel=none",
                    *twin("refrag k=16 p=0.5 sel=random"), *twin("refrag k=16 p=0.5 sel=ppl_desc"), "none"]
    for s in res["results"]:
        assert s["n"] == 3 and 0 <= s["em"] <= 1 and 0 <= s["chrf"] <= 100 and s["ttft_s"] > 0
        assert s["answer_logppl"] > 0 and 0 <= s["answer_in_context"] <= 1
    assert res["results"][0]["answer_in_context"] == 1.0  # retrieval found every gold passage
    assert res["results"][-1]["answer_in_context"] == 0.0  # no context, no answer in it
    full, k8, k16 = (res["results"][i]["prompt_positions"] for i in (0, 1, 6))
    assert k16 < k8 < full
    # the twin drops exactly the compressed positions: a half of the chunks, one position each
    by_key = {refrag.config_key(r): r for r in res["results"]}
    rows = {(r["config"], r["id"]): r for r in map(json.loads, open(tmp_path / "ev" / "rows.jsonl"))}
    for k in (8, 16):
        n_chunks = by_key[f"refrag k={k} p=0 sel=none"]["prompt_positions"] - by_key["none"]["prompt_positions"]
        for sel in ("random", "ppl_desc"):
            both = by_key[f"refrag k={k} p=0.5 sel={sel}"], by_key[f"refrag k={k} p=0.5 sel={sel} expanded-only"]
            assert 0 < both[0]["prompt_positions"] - both[1]["prompt_positions"] <= n_chunks
    assert all(rows[("refrag k=8 p=0.5 sel=random expanded-only", i)]["prompt_positions"]
               < rows[("refrag k=8 p=0.5 sel=random", i)]["prompt_positions"] for i in {i for _, i in rows})
    md = open(tmp_path / "ev" / "results.md").read()
    assert md.count("\n| refrag |") == 10 and "Command: `" in md
    n_rows = len(open(tmp_path / "ev" / "rows.jsonl").read().splitlines())
    assert n_rows == 12 * 3
    code, out, err = run_cli(*argv)  # resumed: nothing left to score, same results
    assert code == 0 and "36 rows already scored" in out
    assert len(open(tmp_path / "ev" / "rows.jsonl").read().splitlines()) == n_rows
    assert load_json(tmp_path / "ev" / "results.json")["results"] == res["results"]
    # rows scored under other settings are never mixed in: refused, nothing written
    before = {f: (tmp_path / "ev" / f).read_bytes() for f in ("rows.jsonl", "run_config.json", "results.json")}
    code, out, err = run_cli(*argv[:-2], "--topk", 3, "--out", tmp_path / "ev")
    assert code == 2 and "rows.jsonl was scored with another --topk (8 -> 3)" in err, err
    assert before == {f: (tmp_path / "ev" / f).read_bytes() for f in before}
    code, out, err = run_cli(*argv[:-2], "--modes", "full", "--out", tmp_path / "ev")  # a part of the grid: fine
    assert code == 0 and "36 rows already scored" in out, err
    # ids key the rows: a repeated id is refused
    qa.write_text(qa.read_text() + qa.read_text().splitlines(keepends=True)[0])
    code, out, err = run_cli(*argv[:-2], "--out", tmp_path / "ev2")
    assert code == 2 and f"{qa}:4: id " in err and "repeats line 1" in err, err


def test_evaluate_cpt_perplexity_orders_context_modes(tiny_dec_dir, tmp_path):
    cpt = tmp_path / "cpt.jsonl"
    with open(os.path.join(DATA, "cpt_eval.jsonl"), encoding="utf-8") as fh:
        cpt.write_text("".join(next(fh) for _ in range(2)))
    code, out, err = run_cli("evaluate", "--eval_json", cpt, "--dec", tiny_dec_dir, "--modes", "full,refrag,none",
                             "--k", 16, "--p", "0,1", "--out", tmp_path / "cpt")
    assert code == 0, err
    res = {refrag.config_key(r): r for r in load_json(tmp_path / "cpt" / "results.json")["results"]}
    assert res["full"]["logppl"] > 0 and res["none"]["prompt_positions"] == 1
    # every chunk expanded is the full-context prompt: identical continuation perplexity
    assert res["refrag k=16 p=1 sel=random"]["logppl"] == pytest.approx(res["full"]["logppl"], rel=1e-4)
    assert res["refrag k=16 p=0 sel=none"]["prompt_positions"] < res["full"]["prompt_positions"]


def test_index_caches_several_k(tmp_path, tiny_dec_dir, small_corpus):
    d = tmp_path / "idx"
    code, out, err = run_cli("index", "--corpus", small_corpus, "--index_dir", d, "--dec", tiny_dec_dir, "--k", "8,32")
    assert code == 0, err
    assert "chunks of k=8" in out and "chunks of k=32" in out
    assert set(load_json(d / "meta.json")["chunk_cache"]["n_chunks"]) == {"8", "32"}
    q = "Who led Event_314?"
    assert gen_json(str(d), tiny_dec_dir, q, "--k", 8, "--p", 0)["chunk_cache"] == "hit"
    assert gen_json(str(d), tiny_dec_dir, q, "--k", 32, "--p", 0)["chunk_cache"] == "hit"
    assert gen_json(str(d), tiny_dec_dir, q, "--k", 16, "--p", 0)["chunk_cache"] == "miss (index cached k=8,32, asked k=16)"


def test_bench_times_full_and_refrag_and_writes_json_and_plot(tiny_dec_dir, tmp_path):
    out = tmp_path / "bench"
    code, stdout, err = run_cli("bench", "--dec", tiny_dec_dir, "--enc_config", "minilm", "--ctx", "64,128,100000",
                                "--k", "8,16", "--o", 3, "--repeats", 1, "--warmup", 1, "--out", out)
    assert code == 0, err
    assert "skip s=100000: longer than the decoder's 2048 positions" in stdout
    res = load_json(out / "bench.json")
    recs = res["records"]
    assert {(r["s"], r["k"], r["mode"]) for r in recs} == {
        (s, None, "full") for s in (64, 128)} | {(s, k, m) for s in (64, 128) for k in (8, 16)
                                                 for m in ("refrag_cached", "refrag_nocache")}
    d = res["d"]
    for r in recs:
        assert r["ttft_s"] > 0 and r["ttit_s"] > 0 and r["throughput_tok_s"] > 0
        if r["k"]:
            assert r["prompt_positions"] == -(-r["s"] // r["k"]) + 32
            assert r["analytic_ttft_speedup"] == pytest.approx(
                r["k"] ** 2 * (6 * d * r["s"] + r["s"] ** 2) / (6 * d * r["s"] * r["k"] + r["s"] ** 2))
            full = next(f for f in recs if f["s"] == r["s"] and f["mode"] == "full")
            assert r["ttft_speedup"] == pytest.approx(full["ttft_s"] / r["ttft_s"])
            assert r["kv_bytes"] < full["kv_bytes"]
    # KV cache bytes: 2 (K and V) x layers x kv_heads x head_dim x positions x bytes per element
    full64 = next(r for r in recs if r["s"] == 64 and r["mode"] == "full")
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[res["dtype"]]
    assert full64["kv_bytes"] == 2 * 2 * 2 * 8 * (64 + 32 + 3 - 1) * width
    assert (out / "bench_ttft_speedup.png").stat().st_size > 1000


def test_bench_times_drafting_at_each_length(tiny_dec_dir, tmp_path):
    code, stdout, err = run_cli("bench", "--dec", tiny_dec_dir, "--enc_config", "minilm", "--ctx", "64,128", "--k", 16,
                                "--o", 12, "--repeats", 1, "--warmup", 0, "--draft", "lookup", "--draft_len", 4,
                                "--out", tmp_path / "b")
    assert code == 0, err
    recs = load_json(tmp_path / "b" / "bench.json")["records"]
    drafted = [r for r in recs if r["mode"] in ("full", "refrag_cached")]
    assert len(drafted) == 4 and not any("draft_copy" in r for r in recs if r["mode"] == "refrag_nocache")
    for r in drafted:  # the answer in the context: every pass keeps its drafts (4 + the pass's own token)
        copy, miss = r["draft_copy"], r["draft_miss"]
        assert copy["same_tokens"] and miss["same_tokens"] and copy["decoder_steps"] == 1 + -(-11 // 5)
        assert copy["acceptance"] == 1.0 and copy["throughput_speedup"] > 0
    assert "draft copy: x" in stdout


@pytest.mark.parametrize("mode", ["full", "refrag"])
def test_answer_nll_scored_from_the_prompt_cache_equals_a_fresh_scoring(tiny_index, tiny_dec_dir, tok, mode):
    """evaluate scores the gold answer from generation's own KV cache (cropped back to the prompt)."""
    models = refrag.load_models(tiny_dec_dir, refrag.MINILM_ID, refrag.MINILM_ID, None, 16,
                                torch.device("cpu"), torch.float32)
    idx = refrag.PassageIndex(tiny_index)
    q, target = "Who led Event_314?", refrag.answer_ids(tok, "Sarah Lindqvist")
    cfg = refrag.GenerateConfig(topk=3, mode=mode, p=0.25, max_new=5)
    g = refrag.run_generation(q, cfg, models, idx, target=target)
    layout, _ = refrag.prepare_prompt(q, cfg, models, idx, torch.Generator().manual_seed(cfg.seed), {})
    fresh = refrag.target_nll(models.decoder, models.projector, layout, target)
    assert g["generated_tokens"] >= 1 and fresh > 0
    assert g["target_nll"] == pytest.approx(fresh, rel=1e-4)
    # the template's constant prefix came from the prefix cache, computed once and reused unchanged
    assert g["cached_prefix_positions"] > 0 and len(models.prefix_cache) == 1
    again = refrag.run_generation(q, cfg, models, idx, target=target)
    assert again["answer"] == g["answer"] and again["target_nll"] == pytest.approx(g["target_nll"], rel=1e-6)


def documented_commands():
    """Every `python refrag.py ...` command of the module docstring and of README.md's bash blocks, with
    line continuations joined, `[--opt ...]` taken as given (first alternative of a|b) and comments dropped."""
    import re
    import shlex
    texts = [refrag.__doc__, "\n".join(re.findall(r"```bash\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S))]
    out = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split(" #")[0].strip()
                if not part.startswith("python refrag.py "):
                    continue
                part = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split("|")[0], part)
                out.append(shlex.split(part)[2:])
    return out


def test_every_documented_command_parses():
    cmds = documented_commands()
    assert len(cmds) >= 25 and {c[0] for c in cmds} == set(refrag.COMMANDS)
    for argv in cmds:
        cfg = refrag.parse_config(argv)
        assert refrag.command_line(cfg).split()[1] == argv[0], argv


def test_command_line_round_trips_through_the_shell():
    import shlex
    for argv in (["generate", "--question", "Où est l'été? $HOME `x`\tend", "--heuristic", "--no_cache"],
                 ["evaluate", "--policy", "runs/a b", "--policy", "runs/c", "--p", "0,0.25"],
                 ["finetune", "--mode", "full", "--stop_after", "3"]):
        cfg = refrag.parse_config(argv)
        again = refrag.parse_config(shlex.split(refrag.command_line(cfg))[1:])
        assert again == cfg, refrag.command_line(cfg)


def test_launchers_run_the_chain_once_with_every_override():
    for name in ("refrag_quickstart_auto_accel.sh", "refrag_quickstart_auto_accel.bat"):
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        runs = [line.strip() for line in text.splitlines() if line.strip().startswith("python refrag.py")]
        assert len(runs) == 1 and runs[0].startswith("python refrag.py chain "), (name, runs)
        for var in ("ENC_MODEL", "DEC_MODEL", "EMBED_MODEL", "TOPK", "K", "P", "CTX_MAX", "MAX_NEW", "STEPS",
                    "LR_RECON", "LR_NEXT", "LR_POLICY"):
            assert var in text, (name, var)
    bat = open(os.path.join(ROOT, "refrag_quickstart_auto_accel.bat"), encoding="utf-8").read()
    assert bat.count(":error") == 1 + bat.count("goto :error")  # one handler, at the end
    assert bat.rstrip().endswith("exit /b 1")
