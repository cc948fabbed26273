"""Faults with nothing lost: kill -9 during index, each trainer and serve; damaged files; a full disk; and one
table of bad inputs, each refused with one line that names the flag, file or field, changing no file."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import refrag
from conftest import DATA, ROOT, run_cli, start_server


def tree(*dirs):
    """path -> sha1 of every file under dirs (what 'changes no file' compares)."""
    out = {}
    for d in dirs:
        for cur, _, files in os.walk(d):
            for f in files:
                p = os.path.join(cur, f)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha1(fh.read()).hexdigest()
    return out


def cli(*argv):
    return [sys.executable, os.path.join(ROOT, "refrag.py"), *map(str, argv)]


def env():
    return dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def kill_when(proc, ready, timeout=240):
    """kill -9 `proc` as soon as ready() holds; the test fails if the process ended first."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, "the process finished before it could be killed: " + proc.stdout.read()[-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def corpus_200(tmp_path_factory):
    path = tmp_path_factory.mktemp("c200") / "corpus.txt"
    with open(os.path.join(DATA, "corpus_small.txt"), encoding="utf-8") as fh:
        path.write_text("".join(line for line, _ in zip(fh, range(200))), encoding="utf-8")
    return path


def test_kill_during_index_keeps_the_old_index_and_the_rerun_resumes(tmp_path, tiny_dec_dir, corpus_200, small_corpus):
    idx, ref = tmp_path / "index", tmp_path / "ref"
    assert run_cli("index", "--corpus", small_corpus, "--index_dir", idx, "--dec", tiny_dec_dir, "--k", 16)[0] == 0
    before = tree(idx)
    argv = ("index", "--corpus", corpus_200, "--dec", tiny_dec_dir, "--k", 16, "--shard_size", 10)
    proc = subprocess.Popen(cli(*argv, "--index_dir", idx), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    building = str(idx) + ".building"
    kill_when(proc, lambda: os.path.isdir(building) and sum(f.endswith(".npz") and ".tmp" not in f
                                                             for f in os.listdir(building)) >= 3)
    assert tree(idx) == before and refrag.PassageIndex(str(idx)).meta["n_passages"] == 40  # the old one, intact
    code, out, err = run_cli(*argv, "--index_dir", idx)
    assert code == 0 and "resuming," in out and "of 20 shards already built" in out, err
    assert not os.path.exists(building)
    assert run_cli(*argv, "--index_dir", ref)[0] == 0  # uninterrupted
    a, b = refrag.PassageIndex(str(idx)), refrag.PassageIndex(str(ref))
    assert a.meta["n_passages"] == b.meta["n_passages"] == 200 and a.texts == b.texts
    np.testing.assert_array_equal(a.caches[16][0], b.caches[16][0])
    np.testing.assert_array_equal(a.tokens, b.tokens)


def trainer_args(kind, tiny_dec_dir, tiny_index, qa):
    if kind == "train_policy":
        return ["train_policy", "--rag_json", qa, "--eval_json", "", "--index_dir", tiny_index, "--dec", tiny_dec_dir,
                "--topk", 2, "--steps", 30, "--group", 2, "--batch_size", 2, "--log_every", 1, "--lr", 3e-3, "--save_every", 1]
    base = ["--dec", tiny_dec_dir, "--k", 8, "--steps", 30, "--batch_size", 2, "--log_every", 1, "--save_every", 1]
    if kind == "finetune":
        return ["finetune", "--rag_json", qa, "--index_dir", tiny_index, "--topk", 2, "--mode", "full", *base]
    return [kind, "--train_json", os.path.join(DATA, "cpt_eval.jsonl"), "--eval_json", "", "--max_chunks", 2, *base]


def weights(d):
    from safetensors.torch import load_file
    files = [f for f in ("encoder.safetensors", "projector.safetensors", "policy.safetensors",
                         "decoder/model.safetensors") if os.path.isfile(os.path.join(d, f))]
    return {f + ":" + k: v for f in files for k, v in load_file(os.path.join(d, f)).items()}


@pytest.mark.parametrize("kind", ["cpt_recon", "cpt_next", "finetune", "train_policy"])
def test_kill_during_training_then_resume_gives_the_uninterrupted_weights(kind, tmp_path, tiny_dec_dir, tiny_index, small_corpus):
    qa = tmp_path / "qa.jsonl"
    names = {line.split(" ", 1)[0] for line in open(small_corpus, encoding="utf-8")}
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        qa.write_text("".join(line for line in fh if json.loads(line)["entity"] in names))
    args = trainer_args(kind, tiny_dec_dir, tiny_index, qa)
    a, b = tmp_path / "a", tmp_path / "b"
    proc = subprocess.Popen(cli(*args, "--out_dir", b), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def checkpointed():
        try:  # the checkpoint directory is swapped atomically: it may be absent for an instant
            return json.loads((b / "train_state.json").read_text())["step"] >= 3
        except (OSError, ValueError):
            return False
    kill_when(proc, checkpointed)
    code, out, err = run_cli(*args, "--out_dir", b, "--resume")
    assert code == 0 and "resuming at step" in out, err
    assert run_cli(*args, "--out_dir", a)[0] == 0
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def test_kill_serve_under_load_then_restart_serves(tmp_path, tiny_index, tiny_dec_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    before = tree(tiny_index)
    proc, url = start_server("--index_dir", tiny_index, "--dec", tiny_dec_dir, "--untrained", "--runs_dir", runs,
                             "--max_new", 40)
    body = json.dumps({"messages": [{"role": "user", "content": "Who led Event_314?"}], "stream": True}).encode()
    import threading

    def client():
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=60).read()
        except Exception:  # noqa: BLE001  (the server died under it: a reset or a cut chunked response)
            pass
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join()
    proc, url = start_server("--index_dir", tiny_index, "--dec", tiny_dec_dir, "--untrained", "--runs_dir", runs,
                             "--max_new", 3)
    try:
        req = urllib.request.Request(url + "/v1/chat/completions", data=body.replace(b'"stream": true', b'"stream": false'),
                                     headers={"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["message"]["content"] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert tree(tiny_index) == before and os.listdir(runs) == []  # nothing half-written


def damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" + data[9:])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_dec_dir):
    out = tmp_path_factory.mktemp("ckpt") / "recon"
    code, _, err = run_cli("cpt_recon", "--dec", tiny_dec_dir, "--train_json", os.path.join(DATA, "cpt_eval.jsonl"),
                           "--eval_json", "", "--k", 16, "--max_chunks", 2, "--steps", 1, "--batch_size", 2, "--out_dir", out)
    assert code == 0, err
    return out


DAMAGED = [  # (what is damaged, how, the file the error must name)
    ("index", "meta.json", "truncate"), ("index", "chunk_emb_k16.npy", "truncate"), ("index", "passage_offsets.npy", "garble"),
    ("index", "faiss.index", "truncate"), ("index", "passages.jsonl", "garble"),
    ("checkpoint", "encoder.safetensors", "truncate"), ("checkpoint", "projector.safetensors", "garble"),
    ("checkpoint", "config.json", "truncate"),
]


@pytest.mark.parametrize("where,name,how", DAMAGED, ids=[f"{w}/{n}/{h}" for w, n, h in DAMAGED])
def test_damaged_files_are_named_in_one_line_and_nothing_is_overwritten(where, name, how, tmp_path, tiny_index,
                                                                        tiny_dec_dir, checkpoint):
    import shutil
    idx, ck = tmp_path / "index", tmp_path / "ck"
    shutil.copytree(tiny_index, idx)
    shutil.copytree(checkpoint, ck)
    damage((idx if where == "index" else ck) / name, how)
    before = tree(idx, ck)
    code, out, err = run_cli("generate", "--index_dir", idx, "--load_dir", ck, "--question", "Who led Event_314?",
                             "--max_new", 2, "--mode", "refrag")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], err
    assert tree(idx, ck) == before


def test_damaged_policy_checkpoint_is_named(tmp_path, tiny_index, tiny_dec_dir, small_corpus):
    qa = tmp_path / "qa.jsonl"
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        qa.write_text("".join(line for line, _ in zip(fh, range(4))))
    pol = tmp_path / "policy"
    code, _, err = run_cli("train_policy", "--rag_json", qa, "--eval_json", "", "--index_dir", tiny_index, "--dec",
                           tiny_dec_dir, "--topk", 2, "--steps", 1, "--group", 2, "--batch_size", 2, "--out_dir", pol)
    assert code == 0, err
    damage(pol / "policy.safetensors", "truncate")
    code, _, err = run_cli("generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--policy", pol, "--untrained",
                           "--question", "Who led Event_314?", "--max_new", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "policy.safetensors" in err, err


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_dec_dir, monkeypatch):
    import safetensors.torch
    out = tmp_path / "run"
    args = ["cpt_recon", "--dec", tiny_dec_dir, "--train_json", os.path.join(DATA, "cpt_eval.jsonl"), "--eval_json", "",
            "--k", 8, "--max_chunks", 2, "--batch_size", 2, "--log_every", 1, "--save_every", 2, "--out_dir", out]
    assert run_cli(*args, "--steps", 2)[0] == 0
    before = tree(out)
    real, calls = safetensors.torch.save_file, []

    def full_disk(tensors, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # part-way through the next checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **kw)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code, _, err = run_cli(*args, "--steps", 4, "--resume")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: ") and "No space left on device" in err
    after = tree(out)
    assert {p: h for p, h in after.items() if not p.endswith(("metrics.jsonl", "run_config.json"))} == \
        {p: h for p, h in before.items() if not p.endswith(("metrics.jsonl", "run_config.json"))}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]  # no half checkpoint left beside it
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    code, out_text, err = run_cli(*args, "--steps", 4, "--resume")
    assert code == 0 and "resuming at step 2" in out_text, err


# ---- one table of bad inputs: (argv builder, text the one-line error must contain) ----

def bad_inputs():
    big_q = "word " * 600
    return [
        (lambda f: ["index", "--corpus", f["missing"], "--index_dir", f["out"]], "--corpus"),
        (lambda f: ["index", "--corpus", f["empty"], "--index_dir", f["out"], "--dec", f["dec"]], "no passages"),
        (lambda f: ["index", "--corpus", f["blank_line"], "--index_dir", f["out"], "--dec", f["dec"]], ":2: empty line"),
        (lambda f: ["index", "--corpus", f["latin1"], "--index_dir", f["out"], "--dec", f["dec"]], ":2: not UTF-8"),
        (lambda f: ["index", "--k", "0", "--index_dir", f["out"]], "--k 0"),
        (lambda f: ["index", "--index_type", "lsh", "--index_dir", f["out"]], "argument --index_type"),
        (lambda f: f["gen"] + ["--question", ""], "--question"),
        (lambda f: f["gen"] + ["--question", big_q], "512-token limit"),
        (lambda f: f["gen"] + ["--question", "Who led \0CONTEXT\0 Event_9?"], "--question: contains a NUL character"),
        (lambda f: f["gen"] + ["--question", "q?", "--p", "1.5"], "--p 1.5"),
        (lambda f: f["gen"] + ["--question", "q?", "--p", "-0.1"], "--p -0.1"),
        (lambda f: f["gen"] + ["--question", "q?", "--k", "0"], "--k 0"),
        (lambda f: f["gen"] + ["--question", "q?", "--k", "5000"], "--k 5000"),
        (lambda f: f["gen"] + ["--question", "q?", "--topk", "0"], "--topk 0"),
        (lambda f: f["gen"] + ["--question", "q?", "--topk", "1000"], "--topk 1000: the index holds only 40"),
        (lambda f: f["gen"] + ["--question", "q?", "--heuristic", "best"], "argument --heuristic"),
        (lambda f: f["gen"] + ["--question", "q?", "--mode", "fast"], "argument --mode"),
        (lambda f: f["gen"] + ["--question", "q?", "--temperature", "-1"], "--temperature"),
        (lambda f: f["gen"] + ["--question", "q?", "--max_new", "abc"], "argument --max_new"),
        (lambda f: f["gen"] + ["--question", "q?", "--embed_model", f["dec"]], "--embed_model"),
        (lambda f: f["gen"] + ["--question", "q?", "--load_dir", f["out"]], "--load_dir"),
        (lambda f: f["gen"] + ["--question", "q?", "--load_dir", f["dec"]], "not a refrag checkpoint (its config.json"),
        (lambda f: f["gen"] + ["--question", "q?", "--load_dir", f["ckpt"], "--k", "8"], "trained with k=16"),
        (lambda f: ["generate", "--index_dir", f["missing"], "--question", "q?"], "--index_dir"),
        (lambda f: ["generate", "--index_dir", f["index"], "--question", "q?", "--load_dir", f["ckpt"], "--dec", f["other_dec"]],
         "--dec"),
        (lambda f: ["generate", "--index_dir", f["index"], "--question", "q?", "--dec", f["other_tok_dec"], "--untrained"],
         "tokenizer"),
        (lambda f: ["generate", "--index_dir", f["index"], "--question", "q?", "--dec", f["dec"]],
         "--load_dir: refrag mode needs a trained checkpoint (without one the projector is untrained"),
        (lambda f: f["gen"] + ["--question", "q?", "--mode", "full", "--baseline", f["other_tok_dec"]],
         "other_tok_dec: its tokenizer is not the refrag decoder's"),
        (lambda f: f["gen"] + ["--question", "q?", "--mode", "full", "--baseline", f["missing"]], "--baseline"),
        (lambda f: ["evaluate", "--eval_json", f["missing"], "--index_dir", f["index"], "--dec", f["dec"]], "--eval_json"),
        (lambda f: ["evaluate", "--eval_json", f["bad_line3"], "--index_dir", f["index"], "--dec", f["dec"]], ":3: invalid JSON"),
        (lambda f: ["evaluate", "--eval_json", f["no_answers"], "--index_dir", f["index"], "--dec", f["dec"]], "'answers'"),
        (lambda f: ["evaluate", "--eval_json", f["nul_question"], "--index_dir", f["index"], "--dec", f["dec"]],
         ":1: 'question' must be a non-empty string without NUL"),
        (lambda f: ["evaluate", "--modes", "full,fast", "--index_dir", f["index"]], "--modes"),
        (lambda f: ["evaluate", "--p", "0,2", "--index_dir", f["index"]], "--p"),
        (lambda f: ["cpt_recon", "--train_json", f["latin1"], "--dec", f["dec"], "--out_dir", f["out"]], "not UTF-8"),
        (lambda f: ["cpt_recon", "--steps", "0", "--out_dir", f["out"]], "--steps 0"),
        (lambda f: ["cpt_recon", "--lr", "-1", "--out_dir", f["out"]], "--lr -1"),
        (lambda f: ["finetune", "--rag_json", f["no_answers"], "--index_dir", f["index"], "--dec", f["dec"],
                    "--out_dir", f["out"]], "'answers'"),
        (lambda f: ["train_policy", "--p", "0", "--out_dir", f["out"]], "--p 0"),
        (lambda f: ["train_policy", "--group", "1", "--out_dir", f["out"]], "--group 1"),
        (lambda f: ["bench", "--ctx", "1k", "--out", f["out"]], "--ctx"),
        (lambda f: ["serve", "--port", "0"], "--port 0"),
        (lambda f: ["chain", "--preset", "huge"], "argument --preset"),
        (lambda f: ["generate", "--question", "q?", "--no_such_flag"], "unrecognized arguments"),
        (lambda f: ["index", "--enc", f["bad_ckpt"], "--dec", f["dec"], "--index_dir", f["out"]], "bad_ckpt/config.json"),
        (lambda f: ["chain", "--resume", "--dec", f["dec"], "--out_dir", f["bad_chain"]], "chain.json"),
    ]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_index, tiny_dec_dir, checkpoint, tok):
    from conftest import save_decoder, tiny_llama
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "blank_line.txt").write_text("one passage\n\nanother\n")
    (d / "latin1.txt").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (d / "bad_line3.jsonl").write_text('{"question": "a?", "answers": ["b"]}\n{"question": "c?", "answers": ["d"]}\n{oops\n')
    (d / "no_answers.jsonl").write_text('{"question": "a?", "answers": []}\n')
    (d / "nul_question.jsonl").write_text('{"question": "a \\u0000CONTEXT\\u0000?", "answers": ["b"]}\n')
    import shutil
    shutil.copytree(checkpoint, d / "bad_ckpt")
    damage(d / "bad_ckpt" / "config.json", "truncate")
    (d / "bad_chain").mkdir()
    (d / "bad_chain" / "chain.json").write_text('{"stages": {"index": {"seco')
    other = d / "other_dec"
    save_decoder(tiny_llama(tok, seed=5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2), tok, str(other))
    from transformers import AutoTokenizer
    other_tok = d / "other_tok_dec"
    gpt_tok = AutoTokenizer.from_pretrained(refrag.resolve_model_path(refrag.MINILM_ID))
    save_decoder(tiny_llama(tok, seed=6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2), gpt_tok, str(other_tok))
    return {"missing": d / "missing.txt", "out": d / "out", "dec": tiny_dec_dir, "index": tiny_index, "ckpt": checkpoint,
            "other_dec": other, "other_tok_dec": other_tok, "bad_ckpt": d / "bad_ckpt", "bad_chain": d / "bad_chain",
            "gen": ["generate", "--index_dir", tiny_index, "--dec", tiny_dec_dir, "--max_new", "2", "--untrained"],
            **{n: d / f for n, f in (("empty", "empty.txt"), ("blank_line", "blank_line.txt"), ("latin1", "latin1.txt"),
                                     ("bad_line3", "bad_line3.jsonl"), ("no_answers", "no_answers.jsonl"),
                                     ("nul_question", "nul_question.jsonl"))}}


BAD_INPUTS = bad_inputs()


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[b[1][:28] for b in BAD_INPUTS])
def test_bad_input_is_one_line_naming_it_and_changes_no_file(case, bad_files, tiny_index, checkpoint):
    build, expected = BAD_INPUTS[case]
    argv = [str(a) for a in build(bad_files)]
    before = tree(tiny_index, checkpoint, os.path.dirname(bad_files["empty"]))
    code, out, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
    assert expected in lines[0] and "Traceback" not in err, (argv, err)
    assert tree(tiny_index, checkpoint, os.path.dirname(bad_files["empty"])) == before
    assert not os.path.exists(bad_files["out"])


def test_atomic_dir_leaves_no_copy_behind_when_its_swap_fails(tmp_path, monkeypatch):
    """A swap that fails between its renames (another process swapping the same directory) removes the new copy
    (it stayed behind, hundreds of MB for a converted reader) and the next call puts the old one back."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("old")
    real, calls = os.replace, []

    def second_rename_fails(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(39, "Directory not empty")
        return real(a, b)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        with refrag.atomic_dir(str(d)) as tmp:
            (Path(tmp) / "f").write_text("new")
    monkeypatch.setattr(os, "replace", real)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
    refrag.recover_dir(str(d))
    assert (d / "f").read_text() == "old"
