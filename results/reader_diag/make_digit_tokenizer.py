"""A byte-level BPE like data/tokenizer.json but with every digit its own token (as Llama's tokenizer
splits numbers), trained on the training split only (training entities' passages of corpus_small and
rag_train questions + answers). Writes DIR/tokenizer.json and copies tokenizer_config.json from SRC.
Usage: python results/reader_diag/make_digit_tokenizer.py SRC_DECODER_DIR OUT_DIR"""
import os, shutil, sys
sys.path.insert(0, ".")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
import refrag as R

src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
shutil.copy(os.path.join(src, "tokenizer_config.json"), out)
P = R.read_corpus("data/corpus_small.txt")
tr = R.read_rag("data/rag_train.jsonl", "--rag_json")
names = {r["entity"] for r in tr}
texts = [p for p in P if p.split(" ", 1)[0] in names] + [r["question"] + " " + r["answers"][0] for r in tr]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False)])
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
    vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok.save(os.path.join(out, "tokenizer.json"))
t = R.load_tokenizer(out)
print(len(t), t.tokenize(" City_2134 lasted 75 days."))
