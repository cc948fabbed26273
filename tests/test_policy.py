"""The selective-expansion policy: sequential picks and their log-probabilities, GRPO and REINFORCE
learning a planted reward, the index's perplexity cache, train_policy end to end, and the checks
that a policy is used only with the models it was trained against."""
import itertools
import json
import math
import os
import random

import pytest
import torch

import refrag
from conftest import DATA, load_json, run_cli, save_decoder, tiny_llama


def test_picks_follow_the_sequential_masked_softmax():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    picks = refrag.policy_picks(logits, 2, n=20000, gen=gen)
    assert picks.shape == (20000, 2) and bool((picks[:, 0] != picks[:, 1]).all())
    counts = {}
    for a, b in picks.tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    for a, b in itertools.permutations(range(4), 2):
        p_seq = float(refrag.picks_logprob(logits, torch.tensor([[a, b]])).sum().exp())
        w = [math.exp(float(x)) for x in logits]
        p_a = w[a] / sum(w)
        p_b = w[b] / (sum(w) - w[a])
        assert p_seq == pytest.approx(p_a * p_b, rel=1e-5)             # log-prob of the picks taken
        assert counts.get((a, b), 0) / 20000 == pytest.approx(p_seq, abs=0.015)  # sampler draws it
    top = refrag.policy_picks(logits, 3, sample=False)
    assert top.tolist() == [[0, 3, 1]]  # deterministic: highest logits in pick order


def test_policy_reads_all_chunks_and_optionally_the_question():
    torch.manual_seed(0)
    pol = refrag.SelectionPolicy(16, d_model=32)
    c, mask = torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)
    base = pol(c, mask)
    c2 = c.clone()
    c2[0, 5] = torch.randn(16)  # (a constant shift would vanish in the input LayerNorm)
    assert not torch.allclose(pol(c2, mask)[0, :5], base[0, :5])  # every chunk sees the others
    mask[0, 4:] = False
    padded = pol(c, mask)
    assert torch.isinf(padded[0, 4:]).all() and torch.isfinite(padded[0, :4]).all()
    assert torch.allclose(padded[0, :4], pol(c[:, :4], mask[:, :4])[0], atol=1e-5)  # padding is invisible
    qpol = refrag.SelectionPolicy(16, d_model=32, query=True, d_q=8)
    q1, q2 = torch.randn(1, 8), torch.randn(1, 8)
    assert not torch.allclose(qpol(c, mask, q1), qpol(c, mask, q2))
    with pytest.raises(refrag.RefragError, match="query-aware"):
        qpol(c, mask)


def planted_examples(n, L, d, seed, by_query=False):
    """Contexts of L random chunk embeddings; one chunk holds the answer. Without by_query it is
    marked in its embedding (any policy can see it); with by_query only the question says which."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        emb = torch.randn(L, d, generator=g)
        good = rng.randrange(L)
        q = torch.randn(d, generator=g)
        if by_query:
            q = emb[good] + 0.1 * torch.randn(d, generator=g)
        else:
            emb[good, :4] = 4.0
        ctx = refrag.RetrievedContext([], [], [], [], [], [], [], [[[0]] * L], [emb], q)
        out.append({"ctx": ctx, "target": [], "good": good})
    return out


def hit_rate(policy, exs, t):
    hits = 0
    with torch.no_grad():
        for ex in exs:
            logits = refrag.policy_logits(policy, [ex["ctx"]], torch.device("cpu"))[0]
            hits += ex["good"] in refrag.policy_picks(logits, t, sample=False)[0].tolist()
    return hits / len(exs)


@pytest.mark.parametrize("algo", ["grpo", "reinforce"])
def test_policy_learns_a_planted_reward(algo):
    torch.manual_seed(0)
    L, d = 8, 16
    train, held = planted_examples(256, L, d, 1), planted_examples(100, L, d, 2)
    cfg = refrag.PolicyConfig(k=16, p=0.25, algo=algo, group=8, batch_size=8, lr=3e-3)
    pol = refrag.SelectionPolicy(d, d_model=32)
    opt = torch.optim.AdamW(pol.parameters(), lr=cfg.lr)
    before = hit_rate(pol, held, 2)
    reward = lambda ex, sels: torch.tensor([float(ex["good"] in s) for s in sels])  # noqa: E731
    gen, rng, state = torch.Generator().manual_seed(0), random.Random(0), {}
    for _ in range(120):
        rec = refrag.policy_step(pol, opt, [train[rng.randrange(256)] for _ in range(cfg.batch_size)],
                                 reward, cfg, gen, state)
    after = hit_rate(pol, held, 2)
    assert before < 0.5 and after > 0.9, (before, after)
    assert set(rec) == {"reward", "reward_std", "entropy", "clipped"}
    if algo == "reinforce":
        assert 0 < state["baseline"] <= 1


def test_only_the_query_aware_policy_can_follow_the_question():
    torch.manual_seed(0)
    L, d = 8, 16
    train, held = planted_examples(256, L, d, 3, by_query=True), planted_examples(100, L, d, 4, by_query=True)
    rates = {}
    for query in (False, True):
        torch.manual_seed(0)
        cfg = refrag.PolicyConfig(k=16, p=0.25, group=8, batch_size=8, lr=3e-3, policy_query=query)
        pol = refrag.SelectionPolicy(d, d_model=32, query=query)
        opt = torch.optim.AdamW(pol.parameters(), lr=cfg.lr)
        reward = lambda ex, sels: torch.tensor([float(ex["good"] in s) for s in sels])  # noqa: E731
        gen, rng, state = torch.Generator().manual_seed(0), random.Random(0), {}
        for _ in range(150):
            refrag.policy_step(pol, opt, [train[rng.randrange(256)] for _ in range(8)], reward, cfg, gen, state)
        rates[query] = hit_rate(pol, held, 2)
    assert rates[False] < 0.45 and rates[True] > 0.7, rates  # chance is 2/8


def test_index_caches_chunk_perplexities_used_by_the_heuristic(tmp_path, tiny_dec_dir, small_corpus, tiny_index):
    idx = tmp_path / "idx_ppl"
    code, out, err = run_cli("index", "--corpus", small_corpus, "--index_dir", idx, "--dec", tiny_dec_dir,
                             "--k", "8,16", "--ppl", "--dtype", "fp32")
    assert code == 0, err
    meta = load_json(idx / "meta.json")
    assert meta["ppl_cache"]["ks"] == [8, 16] and (idx / "chunk_ppl_k16.npy").exists()
    q = "Who led Event_314?"
    args = ("generate", "--dec", tiny_dec_dir, "--question", q, "--heuristic", "--p", 0.5, "--max_new", 2, "--json",
            "--untrained")
    code, out, err = run_cli(*args, "--index_dir", idx)
    cached = json.loads(out.strip().splitlines()[-1])
    code2, out2, err2 = run_cli(*args, "--index_dir", tiny_index)
    fresh = json.loads(out2.strip().splitlines()[-1])
    assert code == code2 == 0, err + err2
    assert cached["ppl_cache"] == "hit" and fresh["ppl_cache"].startswith("miss (no perplexities cached")
    assert cached["expanded"] == fresh["expanded"] and cached["answer"] == fresh["answer"]
    index = refrag.PassageIndex(str(idx))
    dec = refrag.load_decoder(tiny_dec_dir, torch.device("cpu"), torch.float32)
    direct = refrag.chunk_perplexities(dec, index.passage_ids([3]), 8, torch.device("cpu"), 0)[0]
    assert torch.allclose(torch.from_numpy(index.cached_ppl([3], 8)[0].copy()), direct, atol=1e-5)
    # the cache was written by the fp32 decoder; a decoder loaded in fp16 (MPS, GPUs without bf16) is the same one
    code, out, err = run_cli(*args, "--index_dir", idx, "--dtype", "fp16")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["ppl_cache"] == "hit", err + out[-300:]


def qa_rows(small_corpus, path, n=6):
    names = {line.split(" ", 1)[0] for line in open(small_corpus, encoding="utf-8")}
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        rows = [r for r in map(json.loads, fh) if r["entity"] in names][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("algo,query", [("grpo", False), ("reinforce", True)])
def test_train_policy_end_to_end_and_generate_uses_it(tiny_dec_dir, tiny_index, small_corpus, tmp_path, algo, query):
    qa = tmp_path / "qa.jsonl"
    rows = qa_rows(small_corpus, qa)
    out = tmp_path / "policy"
    code, stdout, err = run_cli("train_policy", "--rag_json", qa, "--eval_json", qa, "--eval_n", 2,
                                "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--k", 16, "--p", 0.25,
                                "--topk", 3, "--steps", 2, "--group", 3, "--batch_size", 2, "--log_every", 1,
                                "--algo", algo, *(["--policy_query"] if query else []), "--out_dir", out)
    assert code == 0, err
    cfg = load_json(out / "config.json")
    assert cfg["kind"] == "refrag_policy" and cfg["algo"] == algo and cfg["shape"]["query"] == query
    assert set(cfg["fingerprints"]) == {"decoder", "encoder", "projector", "retriever"}
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["reward"] < 0 for m in metrics)
    ev = load_json(out / "eval.json")
    assert ev["n"] == 2 and all(ev[m] > 0 for m in ("policy", "random", "ppl_desc", "ppl_asc", "rank", "p=0", "p=1"))
    code, stdout, err = run_cli("generate", "--index_dir", tiny_index, "--policy", out, "--untrained", "--k", 16, "--p", 0.25,
                                "--question", rows[0]["question"], "--max_new", 2, "--json")
    assert code == 0, err
    rec = json.loads(stdout.strip().splitlines()[-1])
    assert rec["selection"] == "policy" and len(rec["expanded"]) == round(0.25 * rec["n_chunks"])
    code, stdout, err = run_cli("generate", "--index_dir", tiny_index, "--policy", out, "--untrained", "--k", 16, "--p", 0.25,
                                "--question", rows[0]["question"], "--max_new", 2, "--json", "--policy_sample")
    assert code == 0, err
    sampled = json.loads(stdout.strip().splitlines()[-1])
    assert sampled["selection"] == "policy" and len(sampled["expanded"]) == len(rec["expanded"])
    # the untrained projector is seeded by --seed: another seed is another model, and is refused
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--policy", out, "--untrained", "--k", 16,
                           "--question", rows[0]["question"], "--seed", 7)
    assert code == 2 and "policy trained against other projector weights" in err
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--policy", out, "--untrained", "--k", 8, "--question", "x?")
    assert code == 2 and "policy trained with k=16, but --k 8" in err
    # trained with the models in bf16 (or fp32): the same models loaded in fp16 are accepted
    code, stdout, err = run_cli("generate", "--index_dir", tiny_index, "--policy", out, "--untrained", "--k", 16, "--p", 0.25,
                                "--question", rows[0]["question"], "--max_new", 2, "--json", "--dtype", "fp16")
    assert code == 0, err
    half = json.loads(stdout.strip().splitlines()[-1])
    assert half["selection"] == "policy" and (query or half["expanded"] == rec["expanded"])  # (fp16 question vector)
    # the community version's spelling, --load_dir naming the policy, is read as --policy (and said so)
    code, stdout, err = run_cli("generate", "--index_dir", tiny_index, "--load_dir", out, "--untrained", "--k", 16, "--p", 0.25,
                                "--question", rows[0]["question"], "--max_new", 2, "--json")
    assert code == 0 and "read as --policy" in err, err
    assert json.loads(stdout.strip().splitlines()[-1])["expanded"] == rec["expanded"]
    code, _, err = run_cli("evaluate", "--index_dir", tiny_index, "--load_dir", out, "--eval_json", qa, "--out",
                           tmp_path / "ev")
    assert code == 2 and "a policy checkpoint, not a refrag one; pass it as --policy" in err


def test_policy_refuses_models_it_was_not_trained_against(tiny_dec_dir, tiny_index, small_corpus, tmp_path, tok):
    qa = tmp_path / "qa.jsonl"
    rows = qa_rows(small_corpus, qa, n=3)
    out = tmp_path / "policy"
    assert run_cli("train_policy", "--rag_json", qa, "--eval_json", "", "--index_dir", tiny_index,
                   "--dec", tiny_dec_dir, "--topk", 2, "--steps", 1, "--group", 2, "--batch_size", 1,
                   "--out_dir", out)[0] == 0
    torch.manual_seed(1)
    other = tiny_llama(tok, seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    other_dir = tmp_path / "other_dec"
    other_dir.mkdir()
    save_decoder(other, tok, str(other_dir))
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", other_dir, "--policy", out, "--untrained",
                           "--question", rows[0]["question"], "--max_new", 2)
    assert code == 2 and "policy trained against other decoder weights" in err
    code, _, err = run_cli("train_policy", "--rag_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                           "--p", 1.0, "--out_dir", tmp_path / "bad")
    assert code == 2 and "--p 1.0" in err


def test_evaluate_compares_policy_with_heuristics(tiny_dec_dir, tiny_index, small_corpus, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa_rows(small_corpus, qa, n=3)
    pol = tmp_path / "policy"
    assert run_cli("train_policy", "--rag_json", qa, "--eval_json", "", "--index_dir", tiny_index,
                   "--dec", tiny_dec_dir, "--topk", 2, "--steps", 1, "--group", 2, "--batch_size", 1,
                   "--out_dir", pol)[0] == 0
    out = tmp_path / "ev"
    code, stdout, err = run_cli("evaluate", "--eval_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                                "--modes", "full,refrag", "--k", 16, "--p", "0,0.25", "--topk", 2,
                                "--heuristic", "random,ppl_desc", "--policy", pol, "--max_new", 2, "--out", out)
    assert code == 0, err
    keys = [(r["selection"], r.get("drop_compressed", False))
            for r in load_json(out / "results.json")["results"] if r["mode"] == "refrag"]
    assert keys == [("none", False)] + [(s, drop) for s in ("random", "ppl_desc", "policy:policy") for drop in (False, True)]
    assert "policy:policy" in (out / "results.md").read_text()
    code, _, err = run_cli("evaluate", "--eval_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                           "--modes", "refrag", "--k", 16, "--p", "0.25", "--policy", tmp_path, "--out", out)
    assert code == 2 and "not a policy checkpoint" in err
    (pol / "config.json").write_text("{broken")
    code, _, err = run_cli("evaluate", "--eval_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                           "--modes", "refrag", "--k", 16, "--p", "0.25", "--policy", pol, "--out", out)
    assert code == 2 and "invalid JSON" in err and "config.json" in err


def test_train_policy_resume_matches_uninterrupted_run(tiny_dec_dir, tiny_index, small_corpus, tmp_path):
    from safetensors.torch import load_file
    qa = tmp_path / "qa.jsonl"
    qa_rows(small_corpus, qa, n=3)
    base = ["train_policy", "--rag_json", qa, "--eval_json", "", "--index_dir", tiny_index, "--dec", tiny_dec_dir,
            "--topk", 2, "--steps", 4, "--group", 2, "--batch_size", 2, "--log_every", 1, "--lr", 3e-3]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*base, "--out_dir", a)[0] == 0
    assert run_cli(*base, "--out_dir", b, "--stop_after", 2)[0] == 0
    assert json.load(open(b / "train_state.json"))["step"] == 2
    code, stdout, err = run_cli(*base, "--out_dir", b, "--resume")
    assert code == 0 and "resuming at step 2" in stdout, err
    wa, wb = load_file(a / "policy.safetensors"), load_file(b / "policy.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lrs = [json.loads(line)["lr"] for line in open(b / "metrics.jsonl")]
    assert [json.loads(line)["step"] for line in open(b / "metrics.jsonl")] == [1, 2, 3, 4]
    assert lrs[1] > lrs[3] and lrs == [json.loads(line)["lr"] for line in open(a / "metrics.jsonl")]  # the cosine
    code, _, err = run_cli(*base[:-2], "--lr", 3e-3, "--p", 0.5, "--out_dir", b, "--resume")
    assert code == 2 and "differs in p" in err


def test_policy_on_long_texts_trains_and_is_evaluated(tiny_dec_dir, tiny_index, small_corpus, tmp_path):
    """train_policy reads long texts (reward: continuation log-ppl), so evaluate scores such a policy on long
    texts too (it crashed there: the long-text path knew only the heuristics)."""
    cpt = tmp_path / "cpt.jsonl"
    with open(os.path.join(DATA, "cpt_eval.jsonl"), encoding="utf-8") as fh:
        cpt.write_text("".join(next(fh) for _ in range(3)))
    pol, out = tmp_path / "policy", tmp_path / "ev"
    flags = ["--index_dir", tiny_index, "--dec", tiny_dec_dir, "--k", 16, "--p", 0.25, "--ctx_max", 256,
             "--steps", 1, "--group", 2, "--batch_size", 1]
    code, _, err = run_cli("train_policy", "--train_json", cpt, "--eval_json", "", *flags, "--out_dir", pol)
    assert code == 0, err
    code, stdout, err = run_cli("evaluate", "--eval_json", cpt, "--dec", tiny_dec_dir, "--modes", "full,refrag",
                                "--k", 16, "--p", "0.25,1", "--heuristic", "rank", "--policy", pol, "--out", out)
    assert code == 0, err
    res = {refrag.config_key(r): r for r in load_json(out / "results.json")["results"]}
    assert set(res) == {"full", "refrag k=16 p=0.25 sel=rank", "refrag k=16 p=0.25 sel=policy:policy",
                        "refrag k=16 p=0.25 sel=rank expanded-only", "refrag k=16 p=0.25 sel=policy:policy expanded-only",
                        "refrag k=16 p=1 sel=rank", "refrag k=16 p=1 sel=policy:policy"}  # p = 1 drops nothing: no twin
    assert res["refrag k=16 p=0.25 sel=policy:policy"]["logppl"] > 0
    # p = 1 expands every chunk whoever selects: the full-context prompt
    assert res["refrag k=16 p=1 sel=policy:policy"]["logppl"] == pytest.approx(res["full"]["logppl"], rel=1e-4)
    code, _, err = run_cli("train_policy", "--train_json", cpt, "--eval_json", "", *flags, "--policy_query",
                           "--out_dir", tmp_path / "q")
    assert code == 2 and "no question for a query-aware policy" in err
    qa = tmp_path / "qa.jsonl"
    qa_rows(small_corpus, qa, n=3)
    code, _, err = run_cli("train_policy", "--rag_json", qa, "--eval_json", "", *flags, "--policy_query",
                           "--out_dir", tmp_path / "q")
    assert code == 0, err
    code, _, err = run_cli("evaluate", "--eval_json", cpt, "--dec", tiny_dec_dir, "--modes", "refrag", "--k", 16,
                           "--p", "0.25", "--policy", tmp_path / "q", "--out", tmp_path / "ev_q")
    assert code == 2 and "a query-aware policy (--policy_query) needs questions" in err
