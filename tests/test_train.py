"""REFRAG trainers: the curriculum, reconstruction batches, resume equivalence, 2-process DDP."""
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import refrag
from conftest import DATA, ROOT, run_cli


def test_curriculum_follows_table8_shape():
    total = sum(sum(row) for row in refrag.CURRICULUM_TABLE8.values())  # 26005: the paper's rows are rounded
    stages = refrag.build_curriculum(total, 64, random.Random(0))
    assert len(stages) == 9 and sum(len(s) for s in stages) == total
    counts = [[s.count(n) for s in stages] for n in (1, 2, 4, 8, 16, 32, 64)]
    assert counts[0] == refrag.CURRICULUM_TABLE8[1]          # the paper's own scale comes back exactly
    assert counts[6] == refrag.CURRICULUM_TABLE8[64]
    small = refrag.build_curriculum(900, 8, random.Random(0))
    share = lambda st, n: small[st].count(n) / max(1, len(small[st]))  # noqa: E731
    assert share(0, 1) > 0.7 and share(8, 8) > 0.6          # easy samples first, long ones last
    assert {n for st in small for n in st} <= {1, 2, 4, 8}
    assert sum(len(s) for s in small) == 900


def test_recon_sample_never_shows_the_chunk_tokens_as_context(tok):
    ids = list(range(10, 60))
    smp = refrag.recon_sample(ids, 2, 8, [tok.bos_token_id], random.Random(0))
    assert [k for k, _ in smp["pieces"]] == ["tokens", "chunk", "chunk"]
    x = smp["target"]
    assert len(x) == 16 and smp["pieces"][1][1] + smp["pieces"][2][1] == x
    b = refrag.make_batch([smp], tok.pad_token_id)
    # positions: BOS, chunk, chunk, x1..x16; the last chunk position predicts x1, x_t predicts x_t+1
    assert b["tok_ids"][0, :3].tolist() == [tok.bos_token_id, -1, -1] and b["slot"][0, 1:3].tolist() == [0, 1]
    assert b["labels"][0, 2:18].tolist() == x and (b["labels"][0, :2] == -100).all()
    assert b["chunks"] == [x[:8], x[8:]]


def test_next_sample_expands_a_random_fraction(tok):
    ids = list(range(100, 400))
    smp = refrag.next_sample(ids, 200, 50, 16, 8, 0.25, [1], random.Random(0))
    kinds = [k for k, _ in smp["pieces"][1:]]
    assert len(kinds) == 16 and kinds.count("tokens") == 4
    assert smp["target"] == ids[200:250]
    assert sum(len(c) for _, c in smp["pieces"][1:]) == 128 and smp["pieces"][-1][1][-1] == ids[199]


def weights(path):
    return {k: v for name in ("encoder.safetensors", "projector.safetensors")
            for k, v in load_file(os.path.join(path, name)).items()}


def write_corpus_qa(corpus, path, n=None) -> list[dict]:
    """The training questions about the entities of `corpus` (the first n) written to `path`, and returned."""
    names = {line.split(" ", 1)[0] for line in open(corpus, encoding="utf-8")}
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        rows = [r for r in map(json.loads, fh) if r["entity"] in names][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def train_args(tiny_dec_dir, out, *extra):
    return ["cpt_recon", "--dec", tiny_dec_dir, "--train_json", os.path.join(DATA, "cpt_eval.jsonl"),
            "--eval_json", "", "--k", 8, "--max_chunks", 2, "--steps", 4, "--batch_size", 2, "--log_every", 1,
            "--out_dir", out, *extra]


def test_cpt_recon_resume_matches_uninterrupted_run(tiny_dec_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*train_args(tiny_dec_dir, a))[0] == 0
    code, out, err = run_cli(*train_args(tiny_dec_dir, b, "--stop_after", 2))
    assert code == 0, err
    assert json.load(open(b / "train_state.json"))["step"] == 2
    code, out, err = run_cli(*train_args(tiny_dec_dir, b, "--resume"))
    assert code == 0 and "resuming at step 2" in out, err
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)
    cfg = json.load(open(a / "config.json"))
    assert cfg["trained"] == ["encoder", "projector"] and cfg["step"] == 4 and cfg["k"] == 8
    assert not (a / "decoder").exists()  # the decoder was frozen: not saved
    steps = [json.loads(line)["step"] for line in open(b / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_ms_per_step_divides_by_the_steps_logged(tiny_dec_dir, tmp_path, monkeypatch):
    """The last interval (steps % log_every) and the first after a resume are shorter than log_every; each
    step here takes at least 0.2 s, so every record must say at least 200 ms/step (it said about half)."""
    real = refrag.lr_at

    def slow_lr_at(*a, **kw):  # called once per step
        time.sleep(0.2)
        return real(*a, **kw)

    monkeypatch.setattr(refrag, "lr_at", slow_lr_at)
    out = tmp_path / "r"
    assert run_cli(*train_args(tiny_dec_dir, out, "--steps", 3, "--log_every", 2, "--stop_after", 1))[0] == 0
    assert run_cli(*train_args(tiny_dec_dir, out, "--steps", 3, "--log_every", 2, "--resume"))[0] == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 3] and all(r["ms_per_step"] >= 200 for r in rows), rows


def test_checkpoint_loads_strictly_into_generate(tiny_dec_dir, tiny_index, tmp_path):
    ck = tmp_path / "ck"
    assert run_cli(*train_args(tiny_dec_dir, ck, "--steps", 1, "--k", 16))[0] == 0
    code, out, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--load_dir", ck,
                             "--question", "Who led Event_314?", "--max_new", 3, "--json")
    assert code == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["chunk_cache"].startswith("miss (index cached encoder")  # the trained encoder differs
    assert "warning: the index's cached chunk embeddings come from another encoder" in err
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--load_dir", ck,
                           "--question", "x?", "--k", 8)
    assert code == 2 and "trained with k=16, but --k 8" in err
    proj = load_file(ck / "projector.safetensors")
    proj["fc1.weight"] = proj["fc1.weight"][:, :10].contiguous()
    from safetensors.torch import save_file
    save_file(proj, ck / "projector.safetensors")
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--load_dir", ck,
                           "--question", "x?")
    assert code == 2 and "fc1.weight has shape" in err


def test_cpt_next_trains_the_decoder_and_reports_perplexities(tiny_dec_dir, tmp_path):
    out = tmp_path / "next"
    ev = tmp_path / "ev.jsonl"
    with open(os.path.join(DATA, "cpt_eval.jsonl"), encoding="utf-8") as fh:
        ev.write_text("".join(next(fh) for _ in range(3)))
    code, stdout, err = run_cli("cpt_next", "--dec", tiny_dec_dir, "--train_json", os.path.join(DATA, "cpt_eval.jsonl"),
                                "--eval_json", ev, "--k", 8, "--max_chunks", 4,
                                "--steps", 2, "--batch_size", 2, "--expand_frac", 0.25, "--max_o", 16, "--out_dir", out)
    assert code == 0, err
    ev = json.load(open(out / "eval.json"))["results"]
    assert set(ev) == {"compressed", "compressed_p0.25", "full", "none"} and all(v > 0 for v in ev.values())
    dec0 = refrag.load_decoder(tiny_dec_dir, torch.device("cpu"), torch.float32).state_dict()
    dec1 = refrag.load_decoder(str(out / "decoder"), torch.device("cpu"), torch.float32).state_dict()
    emb = "model.embed_tokens.weight"
    assert not torch.equal(dec0[emb], dec1[emb])  # input embeddings train too


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_two_processes_keep_identical_weights(tiny_dec_dir, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(ROOT, "refrag.py")] + [str(a) for a in train_args(tiny_dec_dir, out, "--steps", 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re
    fps = dict(re.findall(r"rank (\d) weights fingerprint ([0-9a-f]{12})", proc.stdout))  # ranks may interleave
    assert set(fps) == {"0", "1"} and fps["0"] == fps["1"], proc.stdout
    assert "2 process(es)" in proc.stdout and (out / "encoder.safetensors").exists()


@pytest.mark.parametrize("mode", ["refrag", "full", "rank"])  # rank: refrag, the leading chunks kept as tokens
def test_finetune_trains_on_retrieved_contexts(tiny_dec_dir, tiny_index, small_corpus, tmp_path, mode):
    qa = tmp_path / "qa.jsonl"
    rows = write_corpus_qa(small_corpus, qa, 6)
    out = tmp_path / f"sft_{mode}"
    how = ["--mode", "refrag", "--expand_by", "rank"] if mode == "rank" else ["--mode", mode]
    code, stdout, err = run_cli("finetune", "--rag_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                                *how, "--k", 16, "--p", 0.25, "--topk", 3, "--steps", 2, "--batch_size", 2,
                                "--log_every", 1, "--out_dir", out)
    assert code == 0, err
    cfg = json.load(open(out / "config.json"))
    assert cfg["trained"] == (["decoder"] if mode == "full" else ["encoder", "projector", "decoder"])
    assert cfg["train_config"]["expand_by"] == ("rank" if mode == "rank" else "random")
    assert (out / "decoder" / "model.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
    assert len(losses) == 2 and all(l > 0 for l in losses)
    sel = ["--mode", "refrag", "--heuristic", "rank"] if mode == "rank" else ["--mode", mode]
    code, stdout, err = run_cli("generate", "--index_dir", tiny_index, "--load_dir", out,
                                *sel, "--k", 16, "--p", 0.25, "--question", rows[0]["question"], "--max_new", 3, "--json")
    assert code == 0, err
    if mode == "full":  # the checkpoint brings its fine-tuned decoder: --dec may name its base, not another model
        code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--load_dir", out,
                               "--mode", "full", "--question", "x?", "--max_new", 2, "--json")
        assert code == 0, err
        code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tmp_path / "other", "--load_dir", out,
                               "--mode", "full", "--question", "x?")
        assert code == 2 and "drop --dec or pass that one" in err
    rec = json.loads(stdout.strip().splitlines()[-1])
    if mode == "rank":  # the leading chunks, i.e. the top-ranked passage's text, are the expanded ones
        assert rec["selection"] == "rank" and rec["expanded"] == list(range(len(rec["expanded"]))) and rec["expanded"]


def test_training_and_inference_prompts_are_the_same_layout(tok):
    prefix, sep, suffix = refrag.prompt_pieces(tok, "Who led Event_7?")
    passages = [refrag.encode_text(tok, "Event_7 was led by Tarn Velo. Event_7 lasted 9 days."),
                refrag.encode_text(tok, "Event_70 took place in 1200.")]
    chunks = [refrag.split_chunks(x, 4) for x in passages]
    expanded = {1, 4}
    embs = [[torch.zeros(3) for _ in c] for c in chunks]
    layout = refrag.assemble_layout(prefix, chunks, sep, suffix, embs, sorted(expanded))
    pieces = [(kind, v[2] if kind == "chunk" else v)
              for kind, v in refrag.prompt_segments(prefix, chunks, sep, suffix, expanded)]
    batch = refrag.make_batch([{"pieces": pieces, "target": [5]}], tok.pad_token_id)
    n = layout.tok_ids.numel()
    assert batch["tok_ids"][0, :n].tolist() == layout.tok_ids.tolist()
    assert ((batch["slot"][0, :n] >= 0) == (layout.slot >= 0)).all()
    full = refrag.assemble_layout(prefix, chunks, sep, suffix, None, [])
    assert (full.slot < 0).all() and full.tok_ids.tolist() == prefix + passages[0] + sep + passages[1] + suffix


def test_chain_runs_every_stage_times_them_and_resumes(tiny_dec_dir, small_corpus, tmp_path):
    qa = tmp_path / "qa.jsonl"
    write_corpus_qa(small_corpus, qa)
    cpt = tmp_path / "cpt.jsonl"
    with open(os.path.join(DATA, "cpt_eval.jsonl"), encoding="utf-8") as fh:
        cpt.write_text("".join(next(fh) for _ in range(4)))
    out = tmp_path / "chain"
    argv = ["chain", "--preset", "quick", "--corpus", small_corpus, "--train_json", cpt, "--eval_json", cpt,
            "--rag_json", qa, "--rag_eval", qa, "--dec", tiny_dec_dir, "--k", 16, "--p", 0.25, "--eval_p", "0,0.25",
            "--topk", 2, "--ft_full_topk", 2, "--full_topk", "1,2,4", "--recon_steps", 2, "--next_steps", 2,
            "--ft_steps", 2,
            "--ft_full_steps", 2, "--policy_steps", 2, "--ppl", 1, "--batch_size", 2, "--ft_batch_size", 2,
            "--recon_tokens", 32, "--next_tokens", 32, "--eval_limit", 2, "--max_new", 4, "--show", 2,
            "--expand_by", "rank", "--ctx_max", 600, "--out_dir", out]
    code, stdout, err = run_cli(*argv)
    assert code == 0, err
    rec = json.load(open(out / "chain.json"))
    assert rec["preset"] == "quick"
    assert list(rec["stages"]) == ["index", "cpt_recon", "cpt_next", "finetune", "finetune_full", "index_sft",
                                   "train_policy", "evaluate", "evaluate_full", "evaluate_full_top1",
                                   "evaluate_full_top4"]  # the preset's full_topk 1,2,4 besides --topk 2
    assert all(s["seconds"] > 0 for s in rec["stages"].values())
    sm = rec["summary"]
    assert set(sm["recon"]) == {"1", "2"} and set(sm["next_logppl"]) >= {"compressed", "full", "none"}
    assert all(0 <= r["acc_rawtokens"] <= 1 for r in sm["recon"].values())  # the ceiling: raw tokens as context
    # rank expansion is trained and scored beside random, ppl_desc and the trained policy at the same p
    # (each p > 0 row with its expanded-only twin: the same expanded chunks, the compressed ones dropped)
    assert [(r["mode"], r["p"], r["selection"], r["expanded_only"]) for r in sm["qa"]] == [
        ("refrag", 0.0, "none", False)] + [("refrag", 0.25, sel, drop) for sel in ("rank", "random", "ppl_desc",
                                                                                 "policy:policy") for drop in (False, True)]
    assert set(sm["recon_facts"]) == {"value", "id"} and 0 <= sm["recon_facts"]["value"]["chunk"] <= 1
    base = sm["full_ft_baseline"]
    assert 0 <= base["em"] <= 1
    assert [r["topk"] for r in sm["full_ft_by_topk"]] == [2, 1, 4]
    best = max(r["em"] for r in sm["full_ft_by_topk"])
    assert sm["full_ft_best"]["em"] == best and sm["full_ft_best"] in sm["full_ft_by_topk"]
    for r in sm["qa"]:
        assert r["em_ratio_to_best"] == (r["em"] / best if best else None)
        assert r["ttft_speedup"] == pytest.approx(base["ttft_s"] / r["ttft_s"])
        assert r["em_ratio_to_baseline"] == (r["em"] / base["em"] if base["em"] else None)
    assert sm["train_s"] > 0 and sm["eval_s"] > 0
    # every stage trained from the previous one and recorded its own command line; the preset's values
    # fill what was not given (quick evaluates 16 answer tokens unless told otherwise: here 4)
    assert json.load(open(out / "cpt_next" / "config.json"))["trained"] == ["encoder", "projector", "decoder"]
    run_config = json.load(open(out / "sft" / "run_config.json"))
    assert run_config["command"].startswith("refrag.py finetune ") and run_config["config"]["expand_by"] == "rank"
    words = lambda stage: rec["stages"][stage]["command"].split()  # noqa: E731
    argv_of = lambda stage, flag: words(stage)[words(stage).index(flag) + 1]  # noqa: E731
    for stage in ("finetune", "finetune_full", "train_policy", "evaluate", "evaluate_full"):  # --ctx_max everywhere
        assert argv_of(stage, "--ctx_max") == "600"
    assert argv_of("finetune_full", "--topk") == "2" and argv_of("evaluate", "--max_new") == "4"
    assert argv_of("cpt_recon", "--lr") == "0.0002" and argv_of("finetune", "--lr") == "0.0001"  # from the preset
    assert "--ppl" in words("index_sft")
    assert "chain: QA full context (fine-tuned baseline): EM" in stdout
    assert stdout.count("chain: example ") == 2 and "REFRAG (" in stdout and "--preset cpu trains longer" in stdout
    assert len(re.findall(r"\(\s*\d+ ms, (right|wrong)\): ", stdout)) == 4  # each example's answers marked
    so_far = r"\(\d+\.\d min so far(, about \d+ min to go)?\): "  # each stage's line: minutes spent and expected
    assert re.search(r"chain: \[11/11\] evaluate_full_top4 " + so_far, stdout)
    # it ends with the commands to ask one's own questions with these checkpoints, its own paths in them
    nxt = stdout.split("chain: next, your own questions with these checkpoints:\n")[1].splitlines()
    assert nxt[0].startswith(f"  python refrag.py generate --index_dir {out}/index_sft --load_dir {out}/sft ")
    assert f"--mode full --index_dir {out}/index --dec {out}/sft_full/decoder" in nxt[1]
    assert f"serve --index_dir {out}/index_sft --load_dir {out}/sft --policy {out}/policy --p 0.25 --baseline " \
        f"{out}/sft_full" in nxt[2] and nxt[3].startswith("  python refrag.py index --corpus ")
    for line in nxt[:2]:  # the printed generate commands run as printed
        code2, out2, err2 = run_cli(*shlex.split(line.split("   #")[0])[2:], "--max_new", 2)
        assert code2 == 0 and "TTFT" in err2, err2
    code, stdout, err = run_cli(*argv, "--resume")
    assert code == 0, err
    assert stdout.count("done earlier") == 11 and json.load(open(out / "chain.json"))["stages"] == rec["stages"]
    meta = out / "index_sft" / "meta.json"  # an index written by an older refrag is built again on resume
    meta.write_text(json.dumps(dict(json.load(open(meta)), format=refrag.INDEX_FORMAT - 1)))
    code, stdout, err = run_cli(*argv, "--resume")
    assert code == 0 and stdout.count("done earlier") == 5 and re.search(r"\] index_sft " + so_far + "refrag.py index", stdout), err
    assert json.load(open(meta))["format"] == refrag.INDEX_FORMAT


def test_chain_examples_match_questions_by_evaluate_s_ids(tmp_path):
    """The chain's closing examples find evaluate's rows for questions without an id (keyed by line number) or
    with an integer id (keyed as text); it crashed on the first and showed nothing for the second."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Who led Event_9?", "answers": ["Person_77"]}\n'
                  '{"id": 7, "question": "Where is City_3?", "answers": ["Tarn"]}\n')
    key = refrag.config_key({"mode": "refrag", "k": 16, "p": 0.0, "selection": "none"})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "rows.jsonl").write_text("".join(
        json.dumps({"config": c, "id": i, "answer": f"{c} {i}", "ttft_s": 0.1, "em": float(c == "full")}) + "\n"
        for c in ("full", key) for i in ("1", "7")))
    cfg = refrag.ChainConfig(out_dir=str(tmp_path), rag_eval=str(qa), k=16, show=5)
    shown = refrag.chain_examples(cfg)
    assert [(x["question"], x["full"], x["refrag"]) for x in shown] == [
        ("Who led Event_9?", "full 1", f"{key} 1"), ("Where is City_3?", "full 7", f"{key} 7")]
    assert all(x["full_em"] == 1.0 and x["refrag_em"] == 0.0 for x in shown)


def test_chain_preset_defaults_to_cpu_without_cuda_and_checks_eval_p():
    args = refrag.parse_config(["chain", "--device", "cpu", "--ft_steps", "7"])
    assert args.preset == "cpu" and args.ft_steps == 7 and args.recon_steps == refrag.CHAIN_PRESETS["cpu"]["recon_steps"]
    names = [n for n, _ in refrag.chain_stages(args)]
    assert "train_policy" in names and names[-5:] == ["evaluate", "evaluate_full", "evaluate_full_top1",
                                                      "evaluate_full_top2", "evaluate_full_top4"]
    assert names.index("finetune") < names.index("finetune_full")
    args = refrag.parse_config(["chain", "--device", "cpu", "--distill", "1", "--full_topk", ""])
    names, stages = [n for n, _ in refrag.chain_stages(args)], dict(refrag.chain_stages(args))
    assert names.index("finetune_full") < names.index("finetune") and names[-1] == "evaluate_full"  # the teacher first
    assert stages["finetune"].teacher == os.path.join(args.out_dir, "sft_full", "decoder")
    assert stages["finetune_full"].steps == stages["finetune"].steps  # the baseline fine-tunes as long as REFRAG
    with pytest.raises(refrag.RefragError, match="--distill 1 needs the baseline"):
        refrag.chain_stages(refrag.parse_config(["chain", "--device", "cpu", "--distill", "1", "--no_baseline"]))
    with pytest.raises(refrag.RefragError, match="--eval_p 0,1.5"):
        refrag.parse_config(["chain", "--device", "cpu", "--eval_p", "0,1.5"])


def test_finetune_distils_a_teacher(tiny_dec_dir, tiny_index, small_corpus, tmp_path):
    """--teacher adds KL(teacher || student) over the answer tokens to the gold answer's cross-entropy. With the
    student's own decoder as teacher and every chunk expanded (--p 1) both read the same prompt: the KL is 0 and
    the losses equal a run without a teacher; another decoder as teacher adds a positive KL."""
    from conftest import save_decoder, tiny_llama
    tok = refrag.load_tokenizer(os.path.join(DATA, "tokenizer.json"))
    other = tmp_path / "other"
    save_decoder(tiny_llama(tok, seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2), tok, other)
    qa = tmp_path / "qa.jsonl"
    write_corpus_qa(small_corpus, qa)

    def losses(name, *extra):
        argv = ["finetune", "--rag_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--k", 16, "--topk", 2,
                "--steps", 2, "--batch_size", 2, "--log_every", 1, "--out_dir", tmp_path / name, *extra]
        code, _, err = run_cli(*argv)
        assert code == 0, err
        return [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]

    plain = losses("plain", "--p", 1)
    assert losses("self", "--p", 1, "--teacher", tiny_dec_dir) == plain
    assert all(a > b for a, b in zip(losses("other", "--p", 1, "--teacher", other), plain))
    # --p0_share 1: every sample at p = 0, whatever --p says
    assert losses("p0", "--p", 0.5, "--p0_share", 1) == losses("p0_ref", "--p", 0, "--p0_share", 1)
    code, _, err = run_cli("finetune", "--rag_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--mode",
                           "full", "--teacher", other, "--out_dir", tmp_path / "x")
    assert code == 2 and "--teacher: distillation trains a REFRAG reader" in err


def test_finetune_with_lora_trains_adapters_only_resumes_exactly_and_loads_merged(tiny_dec_dir, tiny_index,
                                                                                  small_corpus, tmp_path):
    from safetensors.torch import load_file
    qa = tmp_path / "qa.jsonl"
    rows = write_corpus_qa(small_corpus, qa, 6)
    def args(out, *extra, lora=("--lora", 4)):
        return ["finetune", "--rag_json", qa, "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--k", 16, "--p", 0.25,
                "--topk", 3, "--steps", 4, "--batch_size", 2, "--lr", 1e-2, "--log_every", 1, *lora, "--out_dir", out,
                *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    code, stdout, err = run_cli(*args(a))
    assert code == 0, err
    base = load_file(os.path.join(tiny_dec_dir, "model.safetensors"))
    merged = load_file(str(a / "decoder" / "model.safetensors"))
    adapters = load_file(str(a / "decoder_lora.safetensors"))
    assert set(merged) == set(base) and adapters and all("lora_" in key for key in adapters)
    # LoRA changes the adapted projections only: embeddings and norms keep the base weights exactly
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed and all(any(m in key for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")) for key in changed)
    cfg = json.load(open(a / "config.json"))
    assert cfg["lora"]["r"] == 4 and cfg["lora"]["alpha"] == 8 and cfg["lora"]["base"] == tiny_dec_dir
    # killed after step 2 and resumed: the same adapters and merged weights as the uninterrupted run
    assert run_cli(*args(b, "--stop_after", 2))[0] == 0
    code, stdout, err = run_cli(*args(b, "--resume"))
    assert code == 0 and "resuming at step 2" in stdout, err
    for name in ("decoder_lora.safetensors", "decoder/model.safetensors", "projector.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[key], wb[key]) for key in wa), name
    code, _, err = run_cli(*args(b, "--resume", lora=()))  # resumed without --lora: refused
    assert code == 2 and "began with LoRA adapters" in err
    # the checkpoint is a plain one: generate loads its merged decoder
    code, out, err = run_cli("generate", "--index_dir", tiny_index, "--load_dir", a, "--question", rows[0]["question"],
                             "--max_new", 3, "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["answer"] is not None, err


def test_finetune_mixes_a_share_of_reconstruction_samples(tiny_dec_dir, tiny_index, small_corpus, tmp_path, monkeypatch):
    from accelerate import Accelerator
    qa = tmp_path / "qa.jsonl"
    write_corpus_qa(small_corpus, qa)
    tok = refrag.load_tokenizer(tiny_dec_dir)
    made = []
    real = refrag.recon_sample
    monkeypatch.setattr(refrag, "recon_sample", lambda *a: made.append(real(*a)) or made[-1])
    counts = {}
    for share in (0.0, 0.5, 1.0):
        cfg = refrag.TrainConfig(stage="finetune", rag_json=str(qa), index_dir=tiny_index, dec=tiny_dec_dir, k=16,
                                 topk=2, batch_size=8, recon_share=share, train_json=os.path.join(DATA, "cpt_eval.jsonl"))
        make = refrag.finetune_batches(cfg, tok, torch.device("cpu"), Accelerator(cpu=True))
        made.clear()
        batches = [make(step, 0)[0] for step in range(4)]
        counts[share] = len(made)
        for smp in made:  # a reconstruction sample: its target is the text its chunks compress, which it never sees
            assert [ids for kind, ids in smp["pieces"] if kind == "chunk"] == \
                [smp["target"][i:i + 16] for i in range(0, len(smp["target"]), 16)]
        assert all(b["labels"].ge(0).any() for b in batches)
    assert counts[0.0] == 0 and 0 < counts[0.5] < 32 and counts[1.0] == 32
    with pytest.raises(refrag.RefragError, match="--recon_share"):
        refrag.TrainConfig(stage="finetune", recon_share=0.2, mode="full")


def test_chain_says_about_how_long_is_left():
    args = refrag.parse_config(["chain", "--preset", "quick", "--device", "cpu"])
    stages = refrag.chain_stages(args)
    ref = refrag.CHAIN_REF_S["quick"]
    assert [n for n, _ in stages] == list(ref)  # every quick stage has a reference time
    assert refrag.chain_left_s("quick", stages, [0.0, 0.0]) == pytest.approx(sum(s for s, _ in ref.values()))
    # twice as slow as the reference so far: twice the reference for what is left
    assert refrag.chain_left_s("quick", stages[3:], [200.0, 100.0]) == pytest.approx(
        2 * sum(ref[n][0] for n, _ in stages[3:]))
    longer = refrag.chain_stages(refrag.parse_config(["chain", "--preset", "quick", "--device", "cpu", "--ft_steps", "100"]))
    assert refrag.chain_left_s("quick", [s for s in longer if s[0] == "finetune"], [0, 0]) == pytest.approx(
        2 * ref["finetune"][0])  # a training stage scales with its steps
    assert refrag.chain_left_s("cpu", refrag.chain_stages(refrag.parse_config(["chain", "--device", "cpu"])),
                               [0, 0]) is None  # no reference run: no estimate
