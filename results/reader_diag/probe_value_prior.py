"""Log-probability of each of two river names as the whole answer, for both orders of two
one-sentence passages and both questions: a reader that binds the question to its entity prefers
the asked city's river; one that does not prefers the same name whatever is asked.
Usage: python results/reader_diag/probe_value_prior.py DECODER"""
import sys
sys.path.insert(0, ".")
import torch
import refrag as R

torch.set_grad_enabled(False)
dec_dir = sys.argv[1]
tok = R.load_tokenizer(dec_dir)
dec = R.load_decoder(dec_dir, torch.device("cpu"), torch.float32).eval()


def answer_logprob(prompt: list[int], value: str) -> float:
    a = R.answer_ids(tok, value)
    lp = torch.log_softmax(dec(input_ids=torch.tensor([prompt + a])).logits[0, len(prompt) - 1:-1], -1)
    return float(lp[torch.arange(len(a)), torch.tensor(a)].sum())


for a, va, b, vb in [("City_312", "Bruma", "City_845", "Tidruzith"), ("City_57", "Tidruzith", "City_2190", "Shaichoshea")]:
    sents = [f"The {va} River flows through {a}.", f"The {vb} River flows through {b}."]
    for order in [(0, 1), (1, 0)]:
        for ent in (a, b):
            prefix, sep, suffix = R.prompt_pieces(tok, f"Which river flows through {ent}?")
            ids = list(prefix)
            for i, j in enumerate(order):
                ids += (sep if i else []) + R.encode_text(tok, sents[j])
            ids += suffix
            print(f"passages {' / '.join(sents[j] for j in order)} | asked {ent}: "
                  f"log p({va}) = {answer_logprob(ids, va):.2f}, log p({vb}) = {answer_logprob(ids, vb):.2f}")
