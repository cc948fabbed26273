"""`index --store qdrant` (Qdrant's embedded local mode): the same top-k, chunk cache, perplexities and answers
as the FAISS store on the small corpus, through generate, evaluate and train_policy."""
import json
import os
import shutil

import numpy as np
import pytest

import refrag
from conftest import DATA, run_cli

pytest.importorskip("qdrant_client")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_dec_dir, small_corpus):
    d = tmp_path_factory.mktemp("stores")
    for store in ("faiss", "qdrant"):
        code, out, err = run_cli("index", "--corpus", small_corpus, "--index_dir", d / store, "--dec", tiny_dec_dir,
                                 "--k", "8,16", "--ppl", "--store", store, "--shard_size", 16)  # 3 shards
        assert code == 0, err
    return d / "faiss", d / "qdrant"


def test_qdrant_store_holds_what_faiss_holds(stores):
    f, q = refrag.PassageIndex(str(stores[0])), refrag.PassageIndex(str(stores[1]))
    assert type(q) is refrag.QdrantIndex and q.meta["store"] == "qdrant" and os.path.isdir(stores[1] / "qdrant")
    assert not (stores[1] / "faiss.index").exists() and not (stores[1] / "chunk_emb_k16.npy").exists()
    assert q.texts == f.texts and q.passage_texts([39, 0]) == f.passage_texts([39, 0])
    ids = [7, 0, 39]
    for a, b in zip(q.passage_ids(ids), f.passage_ids(ids), strict=True):
        np.testing.assert_array_equal(a, b)
    for k in (8, 16):
        for a, b in zip(q.cached_chunks(ids, k), f.cached_chunks(ids, k), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(q.cached_ppl(ids, k), f.cached_ppl(ids, k), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    assert q.passage_ids([]) == q.cached_chunks([], 16) == []
    # each chunk point names its passage (global ids across shards), and the collection its index directory
    off = q.caches[16][1]
    points = q.client.scroll(f"{q.name}_chunks_k16", limit=10_000, with_payload=True)[0]
    assert len(points) == off[-1] and all(off[p.payload["passage"]] <= p.id < off[p.payload["passage"] + 1]
                                          for p in points)
    assert q.name == "qdrant_" + refrag.sha1_text(os.path.abspath(stores[1]))[:8]


def gen(index, dec, q, *extra):
    code, out, err = run_cli("generate", "--index_dir", index, "--dec", dec, "--question", q, "--max_new", 5, "--json",
                             "--untrained", *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", [("full",), ("refrag", "--p", "0"), ("refrag", "--p", "0.5", "--heuristic", "ppl_desc"),
                                  ("refrag", "--k", "8", "--p", "0.25")])
def test_generate_answers_the_same_on_either_store(stores, tiny_dec_dir, mode):
    for q in ("Who led Event_314?", "Where does Person_233 work?", "What is Alloy_270 mainly used for?"):
        a, b = (gen(s, tiny_dec_dir, q, "--mode", *mode) for s in stores)
        assert a["retrieved"] == b["retrieved"] and a["passages_used"] == b["passages_used"]
        assert a["answer"] == b["answer"] and a["expanded"] == b["expanded"] and a["chunk_cache"] == b["chunk_cache"]
        if "ppl_desc" in mode:
            assert a["ppl_cache"] == b["ppl_cache"] == "hit"


def test_a_request_fetches_all_its_passages_in_one_round_trip_per_lookup(stores, tiny_dec_dir, tmp_path, monkeypatch):
    """On a server every retrieve call is a network round trip: a request fetches its passages' tokens,
    chunk vectors and perplexities in one call each (not one per passage), and evaluate's answer-in-context
    check fetches the passages used, not the whole collection."""
    from qdrant_client import QdrantClient
    calls, real = [], QdrantClient.retrieve
    monkeypatch.setattr(QdrantClient, "retrieve", lambda self, name, ids, **kw: calls.append(len(ids)) or
                        real(self, name, ids, **kw))
    rec = gen(stores[1], tiny_dec_dir, "Who led Event_314?", "--mode", "refrag", "--p", "0.5", "--heuristic",
              "ppl_desc", "--topk", 4)
    assert rec["ppl_cache"] == "hit" and len(rec["passages_used"]) >= 2
    assert len(calls) == 3 * (1 + rec["warmup_runs"])  # tokens, chunk vectors, perplexities; per run
    n = json.load(open(stores[1] / "meta.json"))["n_passages"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q1", "question": "Who led Event_314?", "answers": ["x"]}) + "\n")
    calls.clear()
    code, out, err = run_cli("evaluate", "--eval_json", qa, "--index_dir", stores[1], "--dec", tiny_dec_dir,
                             "--modes", "refrag", "--k", 16, "--p", "0", "--max_new", 2, "--out", tmp_path / "ev")
    assert code == 0, err
    # warm-up and question: tokens, chunk vectors; then the texts of the question's passages only
    assert len(calls) == 5 and calls[4] == calls[0] < n


@pytest.mark.parametrize("store", [0, 1], ids=["faiss", "qdrant"])
def test_either_store_puts_back_an_interrupted_swap_and_refuses_another_format(stores, tiny_dec_dir, tmp_path, store):
    d = tmp_path / "index"
    shutil.copytree(stores[store], str(d) + ".old")  # killed between atomic_dir's two renames
    assert type(refrag.PassageIndex(str(d))).__name__ == ("PassageIndex", "QdrantIndex")[store] and d.is_dir()
    meta = json.load(open(d / "meta.json"))
    (d / "meta.json").write_text(json.dumps(dict(meta, format=meta["format"] - 1)))
    code, out, err = run_cli("generate", "--index_dir", d, "--dec", tiny_dec_dir, "--question", "Who led Event_314?",
                             "--untrained")
    assert code == 2 and err.strip() == f"error: --index_dir {d}: index format {meta['format'] - 1} is not " \
        f"{meta['format']}; rebuild it"


def test_evaluate_and_train_policy_run_on_qdrant(stores, tiny_dec_dir, small_corpus, tmp_path):
    names = {line.split(" ", 1)[0] for line in open(small_corpus, encoding="utf-8")}
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        rows = [line for line in fh if json.loads(line)["entity"] in names][:3]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(rows))
    res = []
    for s in stores:
        code, out, err = run_cli("evaluate", "--eval_json", qa, "--index_dir", s, "--dec", tiny_dec_dir, "--modes",
                                 "full,refrag", "--k", 16, "--p", "0,0.5", "--heuristic", "ppl_desc", "--max_new", 3,
                                 "--out", tmp_path / os.path.basename(s))
        assert code == 0, err
        res.append([open(tmp_path / os.path.basename(s) / "rows.jsonl").read().count('"answer"'),
                    [{k: r[k] for k in ("mode", "k", "p", "em", "f1", "prompt_positions")}
                     for r in json.load(open(tmp_path / os.path.basename(s) / "results.json"))["results"]]])
    assert res[0] == res[1]
    code, out, err = run_cli("train_policy", "--rag_json", qa, "--eval_json", "", "--index_dir", stores[1], "--dec",
                             tiny_dec_dir, "--topk", 2, "--steps", 2, "--group", 2, "--batch_size", 2, "--out_dir",
                             tmp_path / "policy")
    assert code == 0 and (tmp_path / "policy" / "policy.safetensors").exists(), err
