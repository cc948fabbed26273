"""The Python API (refrag.RefragPipeline): one load, many questions, the caller's own passages."""
import threading

import pytest

import refrag
from conftest import run_cli


@pytest.fixture(scope="module")
def pipe(tiny_index, tiny_dec_dir):
    return refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_dec_dir, max_new=6, topk=4)


def test_pipeline_answers_like_the_cli(pipe, tiny_index, tiny_dec_dir):
    import json
    q = "Who led Event_314?"
    for mode in ("full", "refrag", "none"):
        rec = pipe.generate(q, mode=mode)
        code, out, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--question", q,
                                 "--max_new", 6, "--topk", 4, "--mode", mode, "--json")
        cli = json.loads(out.strip().splitlines()[-1])
        assert code == 0 and rec["answer"] == cli["answer"] and rec["passages_used"] == cli["passages_used"]
        assert rec["mode"] == mode and rec["context_source"] == "index" and rec["ttft_s"] > 0


def test_stream_callable_receives_the_answer(pipe):
    pieces = []
    rec = pipe.generate("Where does Person_233 work?", mode="full", stream=pieces.append)
    assert rec["answer"] and "".join(pieces).strip() == rec["answer"]


def test_caller_passages_replace_retrieval(pipe):
    q = "What is Alloy_270 mainly used for?"
    from_index = pipe.generate(q, mode="refrag", p=0.0)
    texts = [pipe.index.texts[i] for i in from_index["passages_used"]]
    own = pipe.generate(q, mode="refrag", p=0.0, passages=texts)
    assert own["context_source"] == "caller" and own["chunk_cache"].startswith("n/a (caller passages")
    assert own["passages_used"] == list(range(len(texts))) and own["retrieved"][0]["score"] is None
    # the same passages in the same order: the same prompt and (chunks encoded on the fly == cached) answer
    assert own["prompt_positions"] == from_index["prompt_positions"] and own["answer"] == from_index["answer"]
    full = pipe.generate(q, mode="full", passages=["Alloy_270 is used for bridges.", "Unrelated text."])
    assert full["context_source"] == "caller" and full["passages_used"] == [0, 1]
    chunks = pipe.context_chunks(own, texts)
    assert [c["id"] for c in chunks] == own["passages_used"]
    assert sum(len(c["chunks"]) for c in chunks) == own["n_chunks"]
    assert not any(ch["expanded"] for c in chunks for ch in c["chunks"])  # p = 0: every chunk compressed


def test_context_chunks_mark_the_expanded_ones(pipe):
    rec = pipe.generate("Who led Event_314?", mode="refrag", p=0.5, heuristic="ppl_desc")
    flags = [ch["expanded"] for c in pipe.context_chunks(rec) for ch in c["chunks"]]
    assert [i for i, f in enumerate(flags) if f] == rec["expanded"] and rec["expanded"]


def test_bad_request_settings_are_refused(pipe):
    with pytest.raises(refrag.RefragError, match="--p 1.5"):
        pipe.generate("Who led Event_314?", p=1.5)
    with pytest.raises(refrag.RefragError, match="index_dir: not a per-request setting"):
        pipe.generate("Who led Event_314?", index_dir="elsewhere")
    with pytest.raises(refrag.RefragError, match="--question"):
        pipe.generate("   ")


def test_threads_share_one_pipeline(pipe):
    qs = ["Who led Event_314?", "Where does Person_233 work?", "What is Alloy_270 mainly used for?"]
    alone = {q: pipe.generate(q, mode="full")["answer"] for q in qs}
    got = {}

    def ask(q):
        got[q] = pipe.generate(q, mode="full")["answer"]
    threads = [threading.Thread(target=ask, args=(q,)) for q in qs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_pipeline_without_index_needs_passages(tiny_dec_dir):
    pipe = refrag.RefragPipeline.load(index_dir=None, dec=tiny_dec_dir, max_new=3, encoder=False, mode="full")
    with pytest.raises(refrag.RefragError, match="passages: this pipeline has no index"):
        pipe.generate("Who led Event_314?")
    with pytest.raises(refrag.RefragError, match="without the chunk encoder"):
        pipe.generate("Who led Event_314?", mode="refrag", passages=["x"])
    rec = pipe.generate("Who led Event_314?", passages=["Event_314 was led by Person_1."])
    assert rec["passages_used"] == [0] and rec["generated_tokens"] >= 1
    rec = pipe.generate("Who led Event_314?", mode="none", context=True)  # no index needed without context
    assert rec["passages_used"] == [] and rec["context"] == [] and rec["generated_tokens"] >= 1


def test_context_chunks_rejoin_to_the_passage_text(pipe):
    text = "Event_9 was led by Person_77 in 東京 café über alles, ünïcode " * 3
    rec = pipe.generate("Who led Event_9?", mode="refrag", p=0.0, passages=[text])
    (passage,) = pipe.context_chunks(rec, [text])
    assert len(passage["chunks"]) == rec["n_chunks"] > 1
    assert "".join(c["text"] for c in passage["chunks"]) == pipe.models.tok.decode(refrag.encode_text(pipe.models.tok, text))
    assert not any("\ufffd" in c["text"] for c in passage["chunks"])
