"""Conversations: earlier turns (questions, answers, the passages retrieved for them) in the prompt, compressed like
passages, raw, or dropped (conversation_prompt), through the API, generate --messages, evaluate and finetune."""
import json
import os

import pytest
import torch

import refrag
from conftest import DATA, run_cli

CONV = [("Which river flows through City_191?", "Tarn"), ("When was that city founded?", "1203")]


@pytest.fixture(scope="module")
def pipe(tiny_index, tiny_dec_dir):
    return refrag.RefragPipeline.load(index_dir=tiny_index, dec=tiny_dec_dir, max_new=4, topk=2, untrained=True)


@pytest.mark.parametrize("chat", [False, True])
def test_without_turns_the_prompt_is_the_single_question_one(tok, chat):
    t = refrag.load_tokenizer(refrag.DEFAULT_DEC) if chat else tok
    q, ps = "Who led Event_314?", [refrag.encode_text(t, "Event_314 was led by A."), refrag.encode_text(t, "B.")]
    prefix, sep, suffix = refrag.prompt_pieces(t, q)
    for history in refrag.HISTORY:
        assert refrag.conversation_prompt(t, q, ps, [], history) == (prefix, ps, [sep], suffix, 0)


def test_earlier_turns_in_the_chat_template_raw_and_compressed():
    t = refrag.load_tokenizer(refrag.DEFAULT_DEC)
    turns = [refrag.Turn(q, a, [refrag.encode_text(t, f"Passage {i}.")]) for i, (q, a) in enumerate(CONV)]
    now = [refrag.encode_text(t, "City_191 was founded in 1203.")]
    prefix, texts, gaps, suffix, n = refrag.conversation_prompt(t, "How many people live there?", now, turns, "raw")
    assert n == 0 and texts == now and not gaps
    raw = t.decode(prefix + texts[0] + suffix)
    assert raw.count("<|im_start|>user") == 3 and raw.count("<|im_start|>assistant") == 3 and "Passage 1." in raw
    assert raw.index("When was that city founded?") < raw.index("1203<|im_end|>") < raw.index("How many people")
    prefix, texts, gaps, suffix, n = refrag.conversation_prompt(t, "How many people live there?", now, turns)
    assert n == 6 and [t.decode(x) for x in texts[:3]] == ["Passage 0.", CONV[0][0], "Tarn"] and texts[-1] == now[0]
    assert len(gaps) == len(texts) - 1 and t.decode(prefix + [x for tx, g in zip(texts, gaps + [suffix]) for x in tx + g]) == raw


def test_compressed_history_expanded_whole_is_the_raw_prompt(pipe):
    """p = 1 expands every chunk, the earlier turns' too: the compressed-history prompt is then the raw one."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    turns = [refrag.Turn(q, a) for q, a in CONV]
    lay = {}
    for history, p in (("compressed", 1.0), ("raw", 1.0), ("compressed", 0.0), ("drop", 0.0)):
        cfg = pipe.request_config("What is that city's main industry?", p=p, history=history, topk=2)
        lay[history, p] = refrag.prepare_prompt(cfg.question, cfg, pipe.models, pipe.index, gen(), {}, None, turns)
    (c1, info), (r1, raw_info) = lay["compressed", 1.0], lay["raw", 1.0]
    assert torch.equal(c1.tok_ids, r1.tok_ids) and (c1.tok_ids >= 0).all() and info["history_turns"] == 2
    c0, info0 = lay["compressed", 0.0]
    assert info0["history_chunks"] > 0 and (c0.slot >= 0).sum() == info0["n_chunks"] and c0.tok_ids.numel() < r1.tok_ids.numel()
    assert info0["cached_prefix_positions"] == info["cached_prefix_positions"] == len(refrag.prompt_pieces(pipe.models.tok, "x")[0])
    d0, drop_info = lay["drop", 0.0]
    assert "history_turns" not in drop_info and d0.tok_ids.numel() < c0.tok_ids.numel()


def test_history_turns_keep_the_latest_and_query_turns_joins_the_previous_question(pipe):
    rec = pipe.generate("How many people live there?", turns=CONV, history_turns=1, p=0.0)
    one = pipe.generate("How many people live there?", turns=CONV[1:], p=0.0)
    assert rec["history_turns"] == 1 and rec["prompt_positions"] == one["prompt_positions"]
    assert refrag.retrieval_queries("And its river?", [refrag.Turn("Who founded City_7?", "X")], 2) == \
        ["Who founded City_7?", "Who founded City_7? And its river?"]
    joined = pipe.generate("And its river?", turns=[("Who founded City_191?", "X")], query_turns=2, mode="full")
    alone = pipe.generate("Who founded City_191? And its river?", mode="full", history="drop")
    assert joined["passages_used"] == alone["passages_used"]


def test_messages_become_turns_and_bad_ones_are_refused(pipe):
    turns = refrag.turns_of_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": CONV[0][0]},
                                      {"role": "assistant", "content": [{"type": "text", "text": "Tarn"}]},
                                      {"role": "user", "content": CONV[1][0]}])
    assert [(t.question, t.answer) for t in turns] == [(CONV[0][0], "Tarn"), (CONV[1][0], "")]
    for bad, msg in (([{"role": "assistant", "content": "hi"}], r"messages\[0\]: an assistant message must answer"),
                     ([{"role": "tool", "content": "x"}], r"messages\[0\].role: 'tool'"),
                     ([{"role": "user", "content": " "}], r"messages\[0\].content: an empty user message"),
                     ([{"role": "user", "content": 5}], r"messages\[0\]: content must be a string")):
        with pytest.raises(refrag.RefragError, match=msg):
            refrag.turns_of_messages(bad)
    with pytest.raises(refrag.RefragError, match="turns: expected a list of"):
        pipe.generate("q", turns=[("only a question",)])


def test_generate_reads_a_conversation_file(tiny_index, tiny_dec_dir, tmp_path):
    msgs = tmp_path / "conv.json"
    msgs.write_text(json.dumps([{"role": "user", "content": CONV[0][0]}, {"role": "assistant", "content": "Tarn"}]))
    argv = ["generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--untrained", "--question", CONV[1][0],
            "--max_new", 4, "--topk", 2, "--p", 0, "--json", "--messages", msgs]
    code, out, err = run_cli(*argv)
    rec = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and rec["history"] == "compressed" and rec["history_turns"] == 1 and rec["history_chunks"] > 0
    msgs.write_text(json.dumps([{"role": "assistant", "content": "hi"}]))
    code, out, err = run_cli(*argv)
    assert code != 0 and f"--messages {msgs}[0]: an assistant message must answer a user message" in err


def write_conversations(path, n):
    with open(os.path.join(DATA, "conv_eval.jsonl"), encoding="utf-8") as fh:
        path.write_text("".join(fh.readline() for _ in range(n)))


def test_evaluate_scores_every_turn_with_each_history(tiny_index, tiny_dec_dir, tmp_path):
    convs = tmp_path / "conv.jsonl"
    write_conversations(convs, 2)
    code, out, err = run_cli("evaluate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--modes", "full,refrag",
                             "--eval_json", convs, "--max_new", 3, "--topk", 2, "--out", tmp_path / "ev")
    assert code == 0, err
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    keys = [(r["mode"], r["history"]) for r in res["results"]]
    assert res["kind"] == "conv" and keys == [("full", "raw"), ("full", "drop"), ("refrag", "compressed"),
                                              ("refrag", "raw"), ("refrag", "drop")]
    for r in res["results"]:
        assert r["n"] == 12 and [b["turn"] for b in r["by_turn"]] == list(range(6)) and 0 <= r["em_last"] <= 1
    by = {k: r["by_turn"] for k, r in zip(keys, res["results"])}
    # raw history grows the prompt with every turn; dropped history does not; compressed grows it less than raw
    assert by["full", "raw"][5]["prompt_positions"] > by["full", "raw"][0]["prompt_positions"]
    assert by["refrag", "raw"][3]["prompt_positions"] > by["refrag", "compressed"][3]["prompt_positions"] > \
        by["refrag", "drop"][3]["prompt_positions"]
    assert (tmp_path / "ev" / "conversation_turns.png").stat().st_size > 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == {f"conv-eval-0000{c}#{t}" for c in (0, 1) for t in range(1, 7)}


def test_finetune_reads_conversations(tiny_index, tiny_dec_dir, tmp_path):
    convs = tmp_path / "conv.jsonl"
    write_conversations(convs, 3)
    code, out, err = run_cli("finetune", "--rag_json", convs, "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                             "--k", 16, "--p", 0.25, "--topk", 2, "--steps", 2, "--batch_size", 2, "--log_every", 1,
                             "--out_dir", tmp_path / "ft")
    assert code == 0, err
    assert len((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()) >= 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"turns": [{"question": "q", "answers": []}]}) + "\n")
    code, out, err = run_cli("finetune", "--rag_json", bad, "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                             "--steps", 1, "--out_dir", tmp_path / "ft2")
    assert code != 0 and "bad.jsonl:1: turns[0].answers must be a non-empty list" in err
