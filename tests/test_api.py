"""The Python API (refrag.RefragPipeline): one load, many questions, the caller's own passages."""
import threading

import pytest

import refrag
from conftest import run_cli


@pytest.fixture(scope="module")
def pipe(tiny_index, tiny_dec_dir):
    return refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_dec_dir, max_new=6, topk=4, untrained=True)


def test_pipeline_answers_like_the_cli(pipe, tiny_index, tiny_dec_dir):
    import json
    q = "Who led Event_314?"
    for mode in ("full", "refrag", "none"):
        rec = pipe.generate(q, mode=mode)
        code, out, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--question", q,
                                 "--max_new", 6, "--topk", 4, "--mode", mode, "--json", "--untrained")
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


def test_refrag_mode_refuses_an_untrained_projector(tiny_index, tiny_dec_dir, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    refusal = "--load_dir: refrag mode needs a trained checkpoint (without one the projector is untrained"
    with pytest.raises(refrag.RefragError, match="refrag mode needs a trained checkpoint"):
        refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_dec_dir)
    q = ("--index_dir", tiny_index, "--dec", tiny_dec_dir, "--question", "Who led Event_314?", "--max_new", 2)
    code, out, err = run_cli("generate", *q)
    assert code == 2 and err.strip().splitlines() == [f"error: {refusal} and the answers are noise): pass --load_dir "
                                                      "(e.g. runs/quickstart/sft), or --mode full, or --untrained for "
                                                      "research on untrained models"] and not out
    assert run_cli("generate", *q, "--mode", "full")[0] == 0      # full mode reads no projector
    assert run_cli("generate", *q, "--untrained")[0] == 0        # the explicit opt-in
    # serve refuses before it listens (a server that started would make this call time out)
    served = subprocess.run([sys.executable, "refrag.py", "serve", "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                             "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert served.returncode == 2 and served.stderr.strip().splitlines()[-1].startswith("error: " + refusal)


def test_baseline_reads_full_mode_and_refrag_mode_keeps_its_decoder(pipe, tiny_index, tiny_dec_dir, tiny_baseline_dir):
    both = refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_dec_dir, max_new=6, topk=4, untrained=True,
                                      baseline=tiny_baseline_dir)
    alone = refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_baseline_dir, max_new=6, topk=4, encoder=False,
                                       mode="full")
    qs = ["Who led Event_314?", "Where does Person_233 work?", "What is Alloy_270 mainly used for?"]
    differ = 0
    for q in qs:
        full, ref = both.generate(q, mode="full"), both.generate(q, mode="refrag", p=0.25)
        assert full["answer"] == alone.generate(q)["answer"] and full["decoder"] == tiny_baseline_dir
        assert ref["answer"] == pipe.generate(q, mode="refrag", p=0.25)["answer"] and ref["decoder"] == tiny_dec_dir
        differ += full["answer"] != pipe.generate(q, mode="full")["answer"]
    assert differ  # the two tiny decoders answer differently, so the reader really changed
