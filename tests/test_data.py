"""The shipped demo data: aligned, held out, deterministic, and readable by refrag's loaders."""
import filecmp
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import DATA, ROOT
import refrag

ENTITY_RE = re.compile(r"^(City|Alloy|Person|Event)_(\d+)$")

SHIPPED = ["corpus_small.txt", "corpus_medium.txt", "corpus_large.txt", "rag_train.jsonl", "rag_eval.jsonl",
           "cpt_train.jsonl", "cpt_eval.jsonl", "tokenizer.json", "tokenizer_digits.json", "conv_train.jsonl",
           "conv_eval.jsonl", "describe_eval.jsonl"]


def corpus(name):
    return refrag.read_corpus(os.path.join(DATA, f"corpus_{name}.txt"))


def by_name(passages):
    return {p.split(" ", 1)[0]: p for p in passages}


def test_corpus_sizes_nesting_and_lengths():
    small, medium, large = corpus("small"), corpus("medium"), corpus("large")
    assert (len(small), len(medium), len(large)) == (500, 2000, 3000)
    assert medium[:500] == small and large[:2000] == medium
    for p in large:
        assert 60 <= len(p.split()) <= 120
        assert ENTITY_RE.match(p.split(" ", 1)[0])
    kinds = {p.split("_", 1)[0] for p in small}
    assert kinds == {"City", "Alloy", "Person", "Event"}
    assert sum(bool(re.search(r"[\u4e00-\u9fff]|según|aparece|selon|wird", p)) for p in small) > 50


def test_near_identical_names_exist():
    names = set(by_name(corpus("small")))
    near = [n for n in names if n + "0" in names or any(n + str(d) in names for d in range(10))]
    assert len(near) >= 20  # e.g. City_12 and City_120 are both in corpus_small


def test_every_answer_is_verbatim_in_its_entity_passage():
    passages = by_name(corpus("small"))
    for split, minimum in (("train", 1200), ("eval", 300)):
        rows = refrag.read_rag(os.path.join(DATA, f"rag_{split}.jsonl"), "--rag_json")
        assert len(rows) >= minimum
        for r in rows:
            assert r["entity"] in passages, r
            assert r["entity"] in r["question"]
            for a in r["answers"]:
                assert a in passages[r["entity"]], r


def test_held_out_entities_appear_in_no_training_text():
    train = refrag.read_rag(os.path.join(DATA, "rag_train.jsonl"), "--rag_json")
    evals = refrag.read_rag(os.path.join(DATA, "rag_eval.jsonl"), "--eval_json")
    held = {r["entity"] for r in evals}
    assert len(held) == 100
    with open(os.path.join(DATA, "cpt_eval.jsonl"), encoding="utf-8") as fh:
        cpt_eval_entities = {e for line in fh for e in json.loads(line)["entities"]}
    assert cpt_eval_entities <= held
    pat = re.compile(r"\b(" + "|".join(map(re.escape, sorted(held))) + r")(?![0-9])")
    for r in train:
        assert not pat.search(r["question"]), r
    with open(os.path.join(DATA, "cpt_train.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            assert not pat.search(json.loads(line)["text"])
    held_in_small = by_name(corpus("small"))
    assert held <= set(held_in_small)  # retrievable from every corpus


def test_cpt_records_and_splits(tok):
    for split, minimum in (("train", 400), ("eval", 1)):
        rows = refrag.read_cpt(os.path.join(DATA, f"cpt_{split}.jsonl"), "--train_json")
        assert len(rows) >= minimum
        for r in rows[:60]:
            n = len(refrag.encode_text(tok, r["text"]))
            assert r["s"] + r["o"] <= n


def test_cpt_reader_accepts_old_field_name_and_reports_bad_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": 1, "tokens": "a b c", "split": {"s": 1, "o": 1}}\n{"id": 2, "text": "x"}\n')
    with pytest.raises(refrag.RefragError, match=r"c.jsonl:2: 'split'"):
        refrag.read_cpt(str(p), "--train_json")
    p.write_text('{"id": 1, "tokens": "a b c", "split": {"s": 1, "o": 1}}\n')
    assert refrag.read_cpt(str(p), "--train_json")[0]["text"] == "a b c"
    p.write_text('{"question": "q", "answers": []}\n')
    with pytest.raises(refrag.RefragError, match=r"--rag_json .*c.jsonl:1: 'answers'"):
        refrag.read_rag(str(p), "--rag_json")
    p.write_text('{not json\n')
    with pytest.raises(refrag.RefragError, match=r"c.jsonl:1: invalid JSON"):
        refrag.read_rag(str(p), "--rag_json")


def test_generator_is_deterministic_and_matches_shipped_files(tmp_path):
    subprocess.run([sys.executable, os.path.join(DATA, "make_corpus.py"), "--out_dir", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    for f in SHIPPED:
        assert filecmp.cmp(os.path.join(DATA, f), str(tmp_path / f), shallow=False), f


def test_a_large_corpus_run_writes_only_that_corpus_and_refuses_what_it_cannot_make(tmp_path):
    """--n writes corpus_<n>.txt alone (it rewrote every demo file with other data, in data/ by default);
    an --n beyond the entity ids available is refused at once (it never ended)."""
    gen = [sys.executable, os.path.join(DATA, "make_corpus.py"), "--out_dir", str(tmp_path)]
    subprocess.run(gen + ["--n", "4000"], check=True, capture_output=True, cwd=ROOT, timeout=300)
    assert os.listdir(tmp_path) == ["corpus_4000.txt"]
    assert len(open(tmp_path / "corpus_4000.txt", encoding="utf-8").read().splitlines()) == 4000
    out = subprocess.run(gen + ["--n", "170000"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "--n 170000: between 1 and 120000 passages" in out.stderr


def test_extra_training_data_is_fresh_and_leaves_the_shipped_files_alone(tmp_path):
    """make_corpus --extra: more training text and questions from its own generator. The shipped files keep
    their bytes, no held-out entity id or held-out answer is in any extra file, no extra id is a shipped one,
    and every extra answer stands in its entity's passage."""
    import hashlib
    digest = lambda: {f: hashlib.sha256(open(os.path.join(DATA, f), "rb").read()).hexdigest() for f in SHIPPED}  # noqa: E731
    before = digest()
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        proc = subprocess.run([sys.executable, os.path.join(DATA, "make_corpus.py"), "--extra", "120", "--out_dir",
                               str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert digest() == before
    files = ["extra_corpus.txt", "extra_rag_train.jsonl", "extra_cpt_train.jsonl"]
    assert all(filecmp.cmp(outs[0] / f, outs[1] / f, shallow=False) for f in files)  # deterministic
    passages = by_name(refrag.read_corpus(str(outs[0] / files[0])))
    qa = refrag.read_rag(str(outs[0] / files[1]), "--rag_json")
    cpt = refrag.read_cpt(str(outs[0] / files[2]), "--train_json")
    assert len(passages) == 120 and len(qa) == 480 and len(cpt) >= 100
    for r in qa:
        assert r["answers"][0] in passages[r["entity"]]
    shipped_ids = {int(ENTITY_RE.match(p.split(" ", 1)[0]).group(2)) for p in corpus("large")}
    extra_ids = {int(ENTITY_RE.match(name).group(2)) for name in passages}
    assert min(extra_ids) >= 100_000 > max(shipped_ids)
    held = {r["entity"] for r in refrag.read_rag(os.path.join(DATA, "rag_eval.jsonl"), "x")}
    held |= {a for r in refrag.read_rag(os.path.join(DATA, "rag_eval.jsonl"), "x") for a in r["answers"]}
    text = "\n".join(list(passages.values()) + [r["question"] + "\n" + r["answers"][0] + "\n" + r["entity"] for r in qa]
                     + [r["text"] for r in cpt])  # what a model reads (not the files' split counts and line ids)
    leaked = [s for s in held if re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", text)]
    assert not leaked, leaked[:5]
    proc = subprocess.run([sys.executable, os.path.join(DATA, "make_corpus.py"), "--extra", "30000", "--out_dir",
                           str(tmp_path / "c")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--extra 30000" in proc.stderr and not (tmp_path / "c").exists()


def test_conversations_follow_up_without_names_and_keep_the_held_out_split():
    passages = by_name(corpus("small"))
    held = {r["entity"] for r in refrag.read_rag(os.path.join(DATA, "rag_eval.jsonl"), "x")}
    for split, n in (("train", 200), ("eval", 50)):
        convs = refrag.read_conv(os.path.join(DATA, f"conv_{split}.jsonl"), "--eval_json")
        assert len(convs) == n
        for c in convs:
            assert len(c["turns"]) == 6 and len({t["entity"] for t in c["turns"]}) == 2
            for j, t in enumerate(c["turns"]):
                assert (t["entity"] in held) == (split == "eval") and t["answers"][0] in passages[t["entity"]]
                assert (t["entity"] in t["question"]) == (j % 3 == 0)  # the first question about an entity names it
                assert j % 3 == 0 or "that " in t["question"]
    describe = refrag.read_rag(os.path.join(DATA, "describe_eval.jsonl"), "x")
    assert len(describe) == 100 and all(r["answers"] == [passages[r["entity"]]] and r["entity"] in held for r in describe)
