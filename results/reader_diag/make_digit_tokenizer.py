"""A byte-level BPE like data/tokenizer.json but with every digit its own token (as Llama's tokenizer
splits numbers), trained on the training split only (training entities' passages of corpus_small and
rag_train questions + answers). Writes DIR/tokenizer.json and copies tokenizer_config.json from SRC.
Usage: python results/reader_diag/make_digit_tokenizer.py SRC_DECODER_DIR OUT_DIR"""
import os, shutil, sys
sys.path[:0] = [".", "data"]
import refrag as R
from make_corpus import train_tokenizer

src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
shutil.copy(os.path.join(src, "tokenizer_config.json"), out)
P = R.read_corpus("data/corpus_small.txt")
tr = R.read_rag("data/rag_train.jsonl", "--rag_json")
names = {r["entity"] for r in tr}
texts = [p for p in P if p.split(" ", 1)[0] in names] + [r["question"] + " " + r["answers"][0] for r in tr]
tok = train_tokenizer(texts, 4096, split_digits=True)
tok.save(os.path.join(out, "tokenizer.json"))
t = R.load_tokenizer(out)
print(len(t), t.tokenize(" City_2134 lasted 75 days."))
