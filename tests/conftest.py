"""Shared fixtures: a tiny Llama decoder (a few hundred thousand parameters, random weights, the
data/ tokenizer) and a small index built by `refrag.py index` with the packaged MiniLM encoder."""
import json
import os
import sys

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
