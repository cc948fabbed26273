"""--draft lookup: prompt-lookup speculative decoding in the one decode loop (drafts copied from the prompt's
passages, checked in one decoder pass): the same tokens as plain decoding, fewer decoder passes when it copies."""
import json
import os

import numpy as np
import pytest
import torch

import refrag
from conftest import DATA, run_cli, tiny_llama


def test_lookup_draft_copies_what_follows_the_longest_match():
    src = refrag.draft_source([[1, 2, 3, 4, 5], [9, 2, 3, 7, 8, 6]])
    assert src.tolist() == [1, 2, 3, 4, 5, -1, 9, 2, 3, 7, 8, 6, -1]
    assert refrag.lookup_draft(src, [9, 2, 3], 3) == [7, 8, 6]     # the 3-gram picks the second passage
    assert refrag.lookup_draft(src, [0, 2, 3], 3) == [4, 5]        # the 2-gram's first match; stops at the passage's end
    assert refrag.lookup_draft(src, [42, 8], 5) == [6]
    assert refrag.lookup_draft(src, [42], 4) == [] and refrag.lookup_draft(src, [6], 4) == []  # no match / nothing after
    assert refrag.lookup_draft(refrag.draft_source([]), [1], 4) == []


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.5)


def run(model, prompt, source=None, n=8, pick=None, max_new=24):
    pick = pick or (lambda lg: int(torch.argmax(lg)))
    return refrag.decode(model, {"input_ids": torch.tensor([prompt])}, max_new, pick, set(), torch.device("cpu"),
                         draft=None if source is None else refrag.draft_source(source), draft_len=n)


def test_a_drafted_pass_reads_like_one_token_steps(model):
    """drafted_pass runs SDPA one query at a time over the keys each one-token step sees: the pass's logits are the
    steps' (here in fp32, where the matrix kernels may still differ in the last bits), and SDPA is restored."""
    import copy
    assert model.config._attn_implementation == "sdpa"
    prompt = torch.arange(200, 260)[None]
    with torch.inference_mode():
        past = refrag.kv_cache_of(model(input_ids=prompt, use_cache=True))
        steps, p1 = [], copy.deepcopy(past)
        for t in range(5, 11):
            out, p1 = refrag.decode_step(model, torch.tensor([[t]]), p1)
            steps.append(out.logits[0, -1])
        with refrag.drafted_pass(model, True):
            assert model.config._attn_implementation == "refrag_rowwise_sdpa"
            out, p2 = refrag.decode_step(model, torch.tensor([list(range(5, 11))]), past)
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(out.logits[0], torch.stack(steps), atol=1e-4, rtol=0)  # (logits up to 12; fp32 rows differ by 2e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(p1.layers[0].keys[0, :, -6:], p2.layers[0].keys[0, :, -6:]))


@pytest.mark.parametrize("corrupt", [0, 2, 3])
def test_drafted_greedy_tokens_equal_plain_ones_and_the_cache_stays_right(model, corrupt):
    """Drafts from the model's own answer (every other or third token changed: partial acceptance, the cache cut
    back) give the plain tokens; the untouched answer is accepted whole, in fewer decoder passes."""
    for seed in range(4):
        prompt = torch.randint(5, 4000, (30,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = run(model, prompt)
        answer = list(plain["tokens"])
        if corrupt:
            answer = [t if i % corrupt else (t + 1) % 4000 for i, t in enumerate(answer)]
        drafted = run(model, prompt, source=[prompt[:5], answer])
        assert drafted["tokens"] == plain["tokens"]
        d = drafted["draft"]
        assert d["proposed"] > 0 and d["accepted"] <= d["proposed"]
        assert d["steps"] + d["accepted"] == len(answer) - 1  # each token after the first: a pass's pick or a kept draft
        if not corrupt:
            assert d["steps"] < len(answer) // 2
        # the KV cache holds exactly the prompt and the tokens fed so far (the last one is not fed)
        assert drafted["past"].get_seq_length() == len(prompt) + len(answer) - 1


def test_sampled_tokens_are_the_same_draws(model):
    """Each emitted token is one pick from the same logits, in the same order: with the same generator a sampled
    answer is unchanged (the speculative-sampling rule for a one-hot draft)."""
    prompt = list(range(100, 130))
    pick = lambda g: lambda lg: refrag.sample_next(lg, 1.0, 0.9, g)  # noqa: E731
    plain = run(model, prompt, pick=pick(torch.Generator().manual_seed(3)))
    drafted = run(model, prompt, source=[plain["tokens"]], pick=pick(torch.Generator().manual_seed(3)))
    assert drafted["tokens"] == plain["tokens"] and drafted["draft"]["accepted"] > 0


QUESTIONS = [r["question"] for r in refrag.read_rag(os.path.join(DATA, "rag_eval.jsonl"), "x")][:24]


def test_pipeline_answers_are_identical_with_drafting_in_both_modes(tiny_index, tiny_baseline_dir, tok):
    """Over many questions, refrag and full mode (fp32): the same answer and tokens with and without drafting."""
    pipe = refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_baseline_dir, max_new=16, topk=3, untrained=True)
    proposed = 0
    for q in QUESTIONS:
        for mode in ("refrag", "full"):
            a = pipe.generate(q, mode=mode, p=0.25, heuristic="rank")
            b = pipe.generate(q, mode=mode, p=0.25, heuristic="rank", draft="lookup", draft_len=4)
            assert (b["answer"], b["generated_tokens"], b["finish_reason"]) == (a["answer"], a["generated_tokens"],
                                                                                 a["finish_reason"]), (q, mode)
            assert a["draft"] == "none" and "acceptance" not in a and b["draft_len"] == 4
            assert b["decoder_steps"] == b["generated_tokens"] - b["draft_accepted"]  # one pass per token not drafted
            proposed += b["draft_proposed"]
    assert proposed > 0  # drafts were tried and turned down (the decode-level tests above take them)


def test_generate_cli_reports_drafting_and_refuses_a_bad_length(tiny_index, tiny_dec_dir):
    code, out, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--question", QUESTIONS[0],
                             "--mode", "full", "--max_new", 6, "--draft", "lookup", "--json")
    rec = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and rec["draft"] == "lookup" and rec["decoder_steps"] >= 1 and "draft_proposed" in rec
    code, out, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--question", "x",
                             "--mode", "full", "--draft_len", 0)
    assert code != 0 and "--draft_len 0: must be at least 1" in err


def test_evaluate_scores_drafting_beside_plain_decoding(tiny_index, tiny_baseline_dir, tmp_path):
    code, out, err = run_cli("evaluate", "--index_dir", tiny_index, "--dec", tiny_baseline_dir, "--modes", "full",
                             "--eval_json", os.path.join(DATA, "rag_eval.jsonl"), "--limit", 4, "--max_new", 6,
                             "--draft", "none,lookup", "--out", tmp_path / "ev")
    assert code == 0, err
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    assert [r["draft"] for r in res] == ["none", "lookup"]
    assert res[1]["same_answer_as_plain"] == 1.0 and "acceptance" in res[1] and res[1]["throughput_speedup"] > 0
    assert "drafts accepted" in (tmp_path / "ev" / "results.md").read_text()
    assert np.isfinite(res[1]["throughput_tok_s"])
