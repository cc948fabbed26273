"""Shared fixtures: a tiny Llama decoder (a few hundred thousand parameters, random weights, the
data/ tokenizer) and a small index built by `refrag.py index` with the packaged MiniLM encoder."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import refrag  # noqa: E402

DATA = os.path.join(ROOT, "data")
N_PASSAGES = 40  # the tiny index holds the first 40 passages of corpus_small


def run_cli(*argv):
    """Run refrag.main in-process; return (exit code, stdout, stderr) via capsys-free capture."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            refrag.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def tiny_llama(tok, seed=0, **shape):
    """A random-weight Llama for the data/ tokenizer (seeded: the same weights every run)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=2048, tie_word_embeddings=True, **shape)
    return LlamaForCausalLM(cfg).eval()


def save_decoder(model, tok, d):
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)


@pytest.fixture(scope="session")
def tok():
    return refrag.load_tokenizer(os.path.join(DATA, "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_dec_dir(tmp_path_factory, tok):
    """A random-weight 2-layer Llama (hidden 32) saved like the demo decoder."""
    torch.manual_seed(0)
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    d = str(tmp_path_factory.mktemp("tiny_dec"))
    save_decoder(model, tok, d)
    return d


@pytest.fixture(scope="session")
def tiny_baseline_dir(tmp_path_factory, tok):
    """Another random tiny Llama (other weights, the same tokenizer): serve's --baseline reader in the tests. Its
    weights are drawn wider (std 0.5) so that it answers visibly unlike tiny_dec_dir (which repeats one token)."""
    model = tiny_llama(tok, seed=7, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
    d = str(tmp_path_factory.mktemp("tiny_baseline"))
    save_decoder(model, tok, d)
    return d


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    path = d / "corpus.txt"
    with open(os.path.join(DATA, "corpus_small.txt"), encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(N_PASSAGES)]
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_dec_dir, small_corpus):
    d = str(tmp_path_factory.mktemp("idx") / "index")
    code, out, err = run_cli("index", "--corpus", small_corpus, "--index_dir", d, "--dec", tiny_dec_dir, "--k", 16)
    assert code == 0, err
    return d


@pytest.fixture(scope="session")
def passages(small_corpus):
    with open(small_corpus, encoding="utf-8") as fh:
        return [line.strip() for line in fh]


def first_question_about(passages, i=0):
    name = passages[i].split(" ", 1)[0]
    return name, f"What is known about {name}?"


def load_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---- a real `refrag.py serve` process on loopback (tests/test_serve.py, tests/test_web.py) ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "refrag.py"), "serve", "--port", str(port), *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            raise AssertionError("serve exited: " + proc.stdout.read())
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise AssertionError("serve did not come up")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_dec_dir):
    d = tmp_path_factory.mktemp("runs")
    code, out, err = run_cli("cpt_recon", "--dec", tiny_dec_dir, "--train_json", os.path.join(DATA, "cpt_eval.jsonl"),
                             "--eval_json", "", "--k", 8, "--max_chunks", 2, "--steps", 4, "--batch_size", 2,
                             "--log_every", 1, "--out_dir", d / "cpt_recon")
    assert code == 0, err
    (d / "bench_like").mkdir()
    (d / "bench_like" / "results.json").write_text(json.dumps({"results": [{"mode": "full", "em": 0.5}]}))
    return d


@pytest.fixture(scope="module")
def server(tiny_index, tiny_dec_dir, tiny_baseline_dir, runs_dir):
    """serve with an untrained tiny model in refrag mode and another tiny decoder as the full-mode reader."""
    proc, url = start_server("--index_dir", tiny_index, "--embed_model", refrag.MINILM_ID, "--dec", tiny_dec_dir,
                             "--untrained", "--baseline", tiny_baseline_dir, "--runs_dir", runs_dir, "--max_new", 6,
                             "--topk", 4, "--max_passages", 4)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
