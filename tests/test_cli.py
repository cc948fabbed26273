"""Each subcommand of refrag.py run the way a user runs it (in-process), asserting on its outputs."""
import json
import os

import numpy as np
import pytest
import torch

import refrag
from conftest import DATA, N_PASSAGES, load_json, run_cli


def gen_json(index_dir, dec_dir, question, *extra):
    code, out, err = run_cli("generate", "--index_dir", index_dir, "--dec", dec_dir, "--question", question,
                             "--max_new", 6, "--json", *extra)
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
    assert idx.passage_ids(0).tolist() == ids0
    assert idx.cached_chunks(0, 16).shape == (len(refrag.split_chunks(ids0, 16)), 384)
    assert cc["n_chunks"]["16"] == sum(-(-len(refrag.encode_text(tok, p)) // 16) for p in passages)
    # the cache holds exactly what the encoder computes for those chunks
    enc = refrag.ChunkEncoder(refrag.MINILM_ID).eval()
    with torch.no_grad():
        fresh = refrag.encode_chunks(enc, tok, [ids0], 16)[0]
    np.testing.assert_allclose(idx.cached_chunks(0, 16), fresh.numpy(), rtol=1e-4, atol=1e-5)
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
    n_chunks = sum(-(-len(refrag.PassageIndex(tiny_index).passage_ids(i)) // 16) for i in ref["passages_used"])
    assert ref["n_chunks"] == n_chunks and len(ref["expanded"]) == round(0.25 * n_chunks)
    # prompt positions: each compressed chunk is one position, each expanded chunk its tokens
    assert ref["prompt_positions"] < full["prompt_positions"]
    assert full["prompt_positions"] - full["context_tokens"] == none["prompt_positions"] + \
        (len(full["passages_used"]) - 1)  # separators between passages
    assert ref["chunk_cache"] == "hit" and full["chunk_cache"] == "n/a"
    assert none["context_tokens"] == 0 and none["retrieved"] == []


def test_first_token_comes_from_prefill_and_greedy_matches_uncached_decoding(tiny_index, tiny_dec_dir, tok):
    rec = gen_json(tiny_index, tiny_dec_dir, "Who led Event_314?", "--mode", "full", "--topk", 2)
    idx = refrag.PassageIndex(tiny_index)
    prefix, sep, suffix = refrag.prompt_pieces(tok, "Who led Event_314?")
    ids = list(prefix)
    for j, i in enumerate(rec["passages_used"]):
        ids += (sep if j else []) + idx.passage_ids(i).tolist()
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
                             "--max_new", 4, "--out_dir", tmp_path / "g")
    assert code == 0, err
    rec = load_json(tmp_path / "g" / "generate.json")
    assert out.strip() == rec["answer"] or rec["answer"] == ""
    assert "TTFT" in err and "cache hit" in err
    assert load_json(tmp_path / "g" / "run_config.json")["args"]["question"] == "Who led Event_314?"


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
    argv = ["generate"] + [x for kv in base.items() for x in kv]
    code, out, err = run_cli(*argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err


def test_generate_refuses_index_built_for_another_tokenizer(tiny_index, tmp_path, tok):
    model = refrag.build_demo_decoder(tok, "tiny", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    other = tmp_path / "other"
    other.mkdir()
    tok2 = refrag.load_tokenizer(os.path.join(DATA, "tokenizer.json"))
    tok2.add_tokens(["<extra>"])
    refrag.save_hf_model(model, tok2, str(other), {})
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", other, "--question", "x?")
    assert code == 2 and "built with decoder tokenizer" in err


def test_bad_corpus_line_is_named(tmp_path, tiny_dec_dir):
    bad = tmp_path / "bad.txt"
    bad.write_text("City_1 is a city.\n\nCity_2 is a city.\n")
    code, _, err = run_cli("index", "--corpus", bad, "--index_dir", tmp_path / "i", "--dec", tiny_dec_dir)
    assert code == 2 and f"--corpus {bad}:2: empty line" in err
    assert not (tmp_path / "i").exists()


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
    assert keys == ["full", "refrag k=8 p=0 sel=none", "refrag k=8 p=0.5 sel=random", "refrag k=8 p=0.5 sel=ppl_desc",
                    "refrag k=16 p=0 sel=none", "refrag k=16 p=0.5 sel=random", "refrag k=16 p=0.5 sel=ppl_desc", "none"]
    for s in res["results"]:
        assert s["n"] == 3 and 0 <= s["em"] <= 1 and 0 <= s["chrf"] <= 100 and s["ttft_s"] > 0
        assert s["answer_logppl"] > 0 and 0 <= s["wrong_passage"] <= 1 - s["em"]
    assert res["results"][0]["answer_in_context"] == 1.0  # retrieval found every gold passage
    assert res["results"][-1]["wrong_passage"] == 0.0  # no context, no passage to copy from
    assert res["results"][-1]["em_answer_top"] is None and res["results"][-1]["em_answer_lower"] is None
    assert res["results"][0]["em_answer_top"] is not None or res["results"][0]["em_answer_lower"] is not None
    full, k8, k16 = (res["results"][i]["prompt_positions"] for i in (0, 1, 4))
    assert k16 < k8 < full
    md = open(tmp_path / "ev" / "results.md").read()
    assert md.count("\n| refrag |") == 6 and "Command: `" in md
    n_rows = len(open(tmp_path / "ev" / "rows.jsonl").read().splitlines())
    assert n_rows == 8 * 3
    code, out, err = run_cli(*argv)  # resumed: nothing left to score, same results
    assert code == 0 and "24 rows already scored" in out
    assert len(open(tmp_path / "ev" / "rows.jsonl").read().splitlines()) == n_rows
    assert load_json(tmp_path / "ev" / "results.json")["results"] == res["results"]


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


def test_pretrain_runs_and_saves_a_loadable_decoder(tmp_path):
    out = tmp_path / "dec"
    code, stdout, err = run_cli("pretrain", "--steps", 4, "--batch_size", 2, "--max_passages", 2, "--log_every", 1,
                                "--copy_warmup", 1, "--single_steps", 1, "--copy_frac", 0,
                                "--eval_json", os.path.join(DATA, "rag_eval.jsonl"), "--eval_n", 2,
                                "--dec_config", "tiny", "--out_dir", out)
    assert code == 0, err
    assert "held-out exact match" in stdout
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in metrics)
    # copy warm-up, then one-passage contexts, then contexts of up to --max_passages
    assert [m["batch"] for m in metrics[:2]] == ["copy", "qa x1"] and metrics[3]["batch"] in ("qa x1", "qa x2")
    dec = refrag.load_decoder(str(out), torch.device("cpu"), torch.float32)
    assert dec.config.hidden_size == 256 and (out / "model.safetensors").exists()
    assert not any(p.startswith(".tmp") for p in os.listdir(out))
    more = tmp_path / "dec2"
    code, stdout, err = run_cli("pretrain", "--init_from", out, "--steps", 1, "--batch_size", 2, "--copy_warmup", 0,
                                "--single_steps", 0, "--copy_frac", 0.5, "--copy_text", 1, "--max_passages", 3,
                                "--min_passages", 3, "--ctx_ramp", 0, "--log_every", 1, "--out_dir", more)
    assert code == 0, err
    assert json.loads(open(more / "metrics.jsonl").readline())["batch"] in ("copy", "qa x3")
    dec2 = refrag.load_decoder(str(more), torch.device("cpu"), torch.float32)
    w = "model.embed_tokens.weight"
    assert torch.allclose(dec2.state_dict()[w], dec.state_dict()[w], atol=0.01)  # continued, not re-initialised
    assert not torch.equal(dec2.state_dict()[w], dec.state_dict()[w])
    code, _, err = run_cli("pretrain", "--min_passages", 3, "--max_passages", 2, "--out_dir", tmp_path / "bad")
    assert code == 2 and "--min_passages 3: must be in 1..--max_passages (2)" in err
    bind = tmp_path / "bind"  # binding batches only: 2..max_passages same-fact passages of 1..2 sentences
    code, stdout, err = run_cli("pretrain", "--init_from", out, "--steps", 2, "--batch_size", 2, "--copy_warmup", 0,
                                "--single_steps", 0, "--copy_frac", 0, "--bind_frac", 1, "--bind_sentences", 2,
                                "--max_passages", 3, "--ctx_ramp", 0, "--log_every", 1, "--dtype", "bf16",
                                "--id_ramp", 1, "--out_dir", bind)
    assert code == 0, err
    bind_metrics = [json.loads(line) for line in open(bind / "metrics.jsonl")]
    assert [m["id_max"] for m in bind_metrics] == [9, 197]  # id curriculum over the 2 steps
    assert {m["id_max"] for m in metrics} == {refrag.FRESH_ID_MAX}  # off by default
    assert all(m["batch"] in ("bind x2", "bind x3") and np.isfinite(m["loss"]) for m in bind_metrics)
    assert "bf16 autocast" in stdout and "bf16 autocast" not in run_cli("pretrain", "--steps", 1, "--batch_size", 2,
                                                                        "--out_dir", tmp_path / "fp32")[1]
    from safetensors import safe_open
    with safe_open(str(bind / "model.safetensors"), "pt") as fh:  # autocast: the weights stay fp32
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}
    code, _, err = run_cli("pretrain", "--id_ramp", 2, "--out_dir", tmp_path / "bad")
    assert code == 2 and "--id_ramp 2.0: must be in [0, 1]" in err
    code, _, err = run_cli("pretrain", "--dtype", "fp16", "--out_dir", tmp_path / "bad")
    assert code == 2 and "--dtype fp16: expected auto, fp32 or bf16" in err
    code, _, err = run_cli("pretrain", "--bind_frac", 1.5, "--out_dir", tmp_path / "bad")
    assert code == 2 and "--bind_frac 1.5: must be in [0, 1]" in err


def test_reader_data_never_uses_held_out_entities_and_renames(tok):
    passages = refrag.read_corpus(os.path.join(DATA, "corpus_small.txt"))
    train = refrag.read_rag(os.path.join(DATA, "rag_train.jsonl"), "--rag_json")
    held = {r["entity"] for r in refrag.read_rag(os.path.join(DATA, "rag_eval.jsonl"), "--eval_json")}
    import random
    data = refrag.ReaderData(passages, train, tok, 8, random.Random(0))
    for _ in range(50):
        ids, mask = data.sample(n_ctx=4)
        text = tok.decode(ids)
        names = set(refrag.re.findall(r"(?:City|Alloy|Person|Event)_\d+", text))
        assert not names & held
        answer = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True).strip()
        assert answer in tok.decode(ids[:mask.index(1)])  # the answer is readable from the context
    for _ in range(20):  # copy sequences of passage text: training entities only, renamed, target = the repeat
        ids, mask = data.copy_text_example()
        m = sum(mask)
        assert 16 <= m <= 64 and ids[0] == tok.bos_token_id and mask == [0] * (len(ids) - m) + [1] * m
        assert ids[-m:] == ids[-2 * m:-m]
        names = set(refrag.re.findall(r"(?:City|Alloy|Person|Event)_\d+", tok.decode(ids)))
        assert not names & held and not names & set(data.train_names)


def test_binding_samples_state_the_asked_fact_in_every_passage(tok):
    import random
    passages = refrag.read_corpus(os.path.join(DATA, "corpus_small.txt"))
    train = refrag.read_rag(os.path.join(DATA, "rag_train.jsonl"), "--rag_json")
    held = {r["entity"] for r in refrag.read_rag(os.path.join(DATA, "rag_eval.jsonl"), "--eval_json")}
    data = refrag.ReaderData(passages, train, tok, 8, random.Random(0))
    assert refrag.split_sentences("Alloy_7 is 7.4 grams dense. It melts! 它很硬。Next one.") == [
        "Alloy_7 is 7.4 grams dense.", "It melts!", "它很硬。", "Next one."]
    question_of = {}  # question with the entity blanked -> fact
    for r in train:
        question_of[refrag.re.sub(r"(?:City|Alloy|Person|Event)_\d+", "X", r["question"])] = r["fact"]
    for n_ctx, n_sent in [(2, 1), (3, 2), (4, 3), (6, 1)] * 5:
        ids, mask = data.sample(n_ctx=n_ctx, n_questions=n_ctx, same_fact=True, n_sent=n_sent)
        text = tok.decode(ids, skip_special_tokens=True)
        context, qa = text.split("Question:", 1)
        lines = [x for x in context.split("\n")[1:] if x.strip()]
        assert len(lines) == n_ctx
        names = [refrag.re.match(r"(?:.*?)((?:City|Alloy|Person|Event)_\d+)", x).group(1) for x in lines]
        assert len(set(names)) == n_ctx and not set(names) & held and len({n.split("_")[0] for n in names}) == 1
        for line, name in zip(lines, names):  # at most n_sent sentences, all about that passage's entity
            sents = refrag.split_sentences(line)
            assert 1 <= len(sents) <= n_sent
        pairs = refrag.re.findall(r"Question: (.*?)\nAnswer: (.*?)(?:\n|$)", "Question:" + qa)
        assert len(pairs) == n_ctx  # every entity is asked, and the same fact
        facts = {question_of[refrag.re.sub(r"(?:City|Alloy|Person|Event)_\d+(?![0-9])", "X", q)] for q, _ in pairs}
        assert len(facts) == 1
        for q, a in pairs:  # each answer stands in its own entity's passage (values of small pools repeat)
            ent = refrag.re.search(r"(?:City|Alloy|Person|Event)_\d+(?![0-9])", q).group(0)
            owner = [line for line, n in zip(lines, names) if n == ent]
            assert len(owner) == 1 and a.strip() in owner[0]
    # the id curriculum (pretrain --id_ramp): one-digit gold ids at first, FRESH_ID_MAX after the ramp
    assert [refrag.id_max_at(s, 100) for s in (-5, 0, 50, 100, 150)] == [9, 9, 197, 4299, 4299]
    assert refrag.id_max_at(0, 0) == refrag.FRESH_ID_MAX == data.id_max
    data.id_max = 9
    for _ in range(20):
        ids, mask = data.sample(n_ctx=3, n_questions=1, same_fact=True, n_sent=1)
        asked = refrag.re.search(r"Question: .*?_(\d+)", tok.decode(ids)).group(1)
        names = set(refrag.re.findall(r"(?:City|Alloy|Person|Event)_\d+", tok.decode(ids)))
        assert 1 <= int(asked) <= 9 and not names & held


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
    # KV cache bytes: 2 (K and V) x layers x kv_heads x head_dim x positions x 4 bytes (fp32)
    full64 = next(r for r in recs if r["s"] == 64 and r["mode"] == "full")
    assert full64["kv_bytes"] == 2 * 2 * 2 * 8 * (64 + 32 + 3 - 1) * 4
    assert (out / "bench_ttft_speedup.png").stat().st_size > 1000


def test_heldout_monitor_contexts_mix_gold_and_training_distractors(tok):
    import random
    passages = refrag.read_corpus(os.path.join(DATA, "corpus_small.txt"))
    train = refrag.ReaderData(passages, refrag.read_rag(os.path.join(DATA, "rag_train.jsonl"), "--rag_json"),
                              tok, 8, random.Random(0))
    data, recs = refrag.heldout_monitor(passages, os.path.join(DATA, "rag_eval.jsonl"), train, 20)
    held = {r["entity"] for r in recs}
    for r in recs:
        ids, mask = data.sample(r, n_ctx=6, n_questions=1)
        text = tok.decode(ids[:mask.index(1)])
        names = set(refrag.re.findall(r"(?:City|Alloy|Person|Event)_\d+(?![0-9])", text))
        assert r["entity"] in names and len(names) == 6 and not (names - {r["entity"]}) & held
        assert tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True).strip() == r["answers"][0]
