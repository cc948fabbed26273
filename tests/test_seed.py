"""The community version's quickstart command lines (refrag_quickstart_auto_accel.sh of the seed), flag
for flag, with local paths in place of hub ids: index, generate, cpt_recon, cpt_next, train_policy, then
generate with the policy (`--load_dir runs/policy`) and with the CPT checkpoint. Three deviations, all
deliberate: `index` is given the decoder (a chunk is k tokens of the decoder's tokenizer, so the index must
know it), one k is used throughout (a projector trained for k=64 is refused at k=32), and the two generate
lines that read an untrained projector (before any training, and with the policy trained against it) are
refused with a one-line error unless they add --untrained (their answers would be noise)."""
import json
import os

import refrag
from conftest import DATA, run_cli


def test_community_quickstart_runs_with_local_paths(tiny_dec_dir, small_corpus, tmp_path):
    enc, emb, dec, k = refrag.MINILM_ID, refrag.MINILM_ID, tiny_dec_dir, 16
    index, cpt, rag = tmp_path / "index", tmp_path / "cpt_train.jsonl", tmp_path / "rag_train.jsonl"
    with open(os.path.join(DATA, "cpt_eval.jsonl"), encoding="utf-8") as fh:
        cpt.write_text("".join(next(fh) for _ in range(4)))
    names = {line.split(" ", 1)[0] for line in open(small_corpus, encoding="utf-8")}
    with open(os.path.join(DATA, "rag_train.jsonl"), encoding="utf-8") as fh:
        rows = [r for r in map(json.loads, fh) if r["entity"] in names][:4]
    rag.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = lambda name: str(tmp_path / name)  # noqa: E731
    q = "Who discovered penicillin?"
    steps = [
        ["index", "--corpus", small_corpus, "--index_dir", index, "--embed_model", emb, "--dec", dec],
        ["generate", "--index_dir", index, "--embed_model", emb, "--enc", enc, "--dec", dec, "--question", q,
         "--topk", 4, "--k", k, "--p", 0.25, "--ctx_max", 1024, "--max_new", 4, "--temperature", 0.0],
        ["cpt_recon", "--train_json", cpt, "--enc", enc, "--dec", dec, "--k", k, "--steps", 2, "--lr", 2e-5,
         "--log_every", 20, "--out_dir", runs("cpt_recon")],
        ["cpt_next", "--train_json", cpt, "--enc", enc, "--dec", dec, "--k", k, "--steps", 2, "--lr", 2e-5,
         "--expand_frac", 0.25, "--log_every", 20, "--load_dir", runs("cpt_recon"), "--out_dir", runs("cpt_next")],
        ["train_policy", "--rag_json", rag, "--index_dir", index, "--embed_model", emb, "--enc", enc, "--dec", dec,
         "--k", k, "--steps", 2, "--lr", 1e-4, "--p", 0.25, "--topk", 4, "--log_every", 20, "--out_dir", runs("policy")],
        ["generate", "--index_dir", index, "--embed_model", emb, "--enc", enc, "--dec", dec, "--load_dir",
         runs("policy"), "--question", q, "--topk", 4, "--k", k, "--p", 0.25, "--max_new", 4],
        ["generate", "--index_dir", index, "--embed_model", emb, "--enc", enc, "--dec", dec, "--load_dir",
         runs("cpt_next"), "--question", q, "--topk", 4, "--k", k, "--p", 0.25, "--max_new", 4],
    ]
    errs = []
    for i, argv in enumerate(steps):
        if i in (1, 5):  # the untrained projector: refused as written, run with --untrained
            code, out, err = run_cli(*argv)
            assert code == 2 and err.strip().splitlines()[-1].startswith("error: --load_dir: refrag mode needs a "
                                                                          "trained checkpoint") and "--untrained" in err
            argv = argv + ["--untrained"]
        code, out, err = run_cli(*argv)
        assert code == 0, (argv[0], err)
        errs.append(err)
    assert all("[refrag] TTFT" in errs[i] for i in (1, 5, 6))
    assert "read as --policy" in errs[5] and "(policy)" in errs[5] and "(policy)" not in errs[6]
    assert json.load(open(os.path.join(runs("cpt_next"), "config.json")))["dec"] == dec
    assert json.load(open(os.path.join(runs("policy"), "config.json")))["kind"] == "refrag_policy"
