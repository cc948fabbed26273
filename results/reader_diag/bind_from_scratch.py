"""Can the demo decoder's shape learn to bind a question to its entity's passage at all, when that
is all it trains on? A fresh decoder trains on binding contexts only (ReaderData.sample with
same_fact=True: 2..N one-sentence passages that all state the asked fact, names renamed to fresh
near-identical ids, one question per context, so no answer can be had by elimination) and is scored
every --eval_every steps on fixed held-back binding contexts of 2 and 4 passages: the fraction whose
whole answer is argmax-correct under teacher forcing (1 / n_ctx = the name ignored).
Usage: python results/reader_diag/bind_from_scratch.py --tok runs/demo_decoder_ct [--steps 600] [--layers 4] ..."""
import argparse, json, random, re, sys, time
sys.path.insert(0, ".")
import torch
import refrag as R

ap = argparse.ArgumentParser()
ap.add_argument("--tok", default="runs/demo_decoder_ct")
ap.add_argument("--init_from", default=None)
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--hidden", type=int, default=256)
ap.add_argument("--heads", type=int, default=8)
ap.add_argument("--bf16", action="store_true", help="bf16 autocast (AMX on recent Xeons: 1.3x at d = 256, 3x at d = 512)")
ap.add_argument("--max_ctx", type=int, default=4)
ap.add_argument("--n_sent", type=int, default=1)
ap.add_argument("--ctx_weight", type=float, default=0.1)
ap.add_argument("--eval_every", type=int, default=100)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--save", default=None)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--near", default="mixed", choices=["mixed", "same_length"],
                help="distractor ids: ReaderData's (n*10+d, n//10, n+d: mostly prefixes of each other) or n+d of the same length")
ap.add_argument("--id_ramp", type=float, default=0.0,
                help="curriculum: the largest fresh training id grows from 9 to 4299 (log scale) over this fraction of "
                     "the steps (0: 1..4299 throughout); the scored contexts always use the full range")
ap.add_argument("--copy_warmup", type=int, default=0,
                help="first steps of random-token copy batches (pretrain's warm-up: induction heads), counted in --steps")
ap.add_argument("--q_first", action="store_true", help="also put the question before the context (query-aware layout)")
args = ap.parse_args()

torch.manual_seed(args.seed)
torch.set_num_threads(args.threads)
tok = R.load_tokenizer(args.tok)
if args.q_first:
    _qa = R.qa_example

    def qa_first(tok, passages, question, answer):
        ids, mask = _qa(tok, passages, question, answer)
        bos = R.bos_ids(tok)
        q = R.encode_text(tok, f"Question: {question}\n")
        return bos + q + ids[len(bos):], [0] * (len(bos) + len(q)) + mask[len(bos):]
    R.qa_example = qa_first
if args.near == "same_length":  # near-identical ids that are never a prefix of each other: n + 1..9 only
    _fresh = R.ReaderData._fresh_id

    def fresh_same_length(self, kind, near=None):
        if near is None:
            return _fresh(self, kind)
        for _ in range(100):
            n = near + self.rng.randint(1, 9)
            if len(str(n)) == len(str(near)) and n not in self.used_ids.get(kind, ()):
                return n
        return _fresh(self, kind)
    R.ReaderData._fresh_id = fresh_same_length
P = R.read_corpus("data/corpus_small.txt")
tr = R.read_rag("data/rag_train.jsonl", "--rag_json")
data = R.ReaderData(P, tr, tok, args.max_ctx, random.Random(args.seed))
ev = R.ReaderData(P, tr, tok, args.max_ctx, random.Random(12345))
evsets = {n: [ev.sample(n_ctx=n, n_questions=1, same_fact=True, n_sent=args.n_sent) for _ in range(200)] for n in (2, 4)}
progress = [0.0]  # fraction of the id ramp done, set by the training loop
if args.id_ramp:  # short ids first: fewer digits to bind on
    _fresh_ramp = R.ReaderData._fresh_id

    def fresh_short(self, kind, near=None):
        if near is not None:
            return _fresh_ramp(self, kind, near)
        return self.rng.randint(1, int(round(9 * (4299 / 9) ** min(1.0, progress[0]))))
    R.ReaderData._fresh_id = fresh_short
if args.init_from:
    model = R.load_decoder(args.init_from, torch.device("cpu"), torch.float32)
else:
    model = R.build_demo_decoder(tok, "tiny", num_hidden_layers=args.layers, hidden_size=args.hidden,
                                 intermediate_size=3 * args.hidden, num_attention_heads=args.heads,
                                 num_key_value_heads=args.heads)
print(json.dumps({"args": vars(args), "params_M": sum(p.numel() for p in model.parameters()) / 1e6}), flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)


def prefix_names(example) -> int:
    """How many of the context's ids match the asked id when an id's end is ignored (one is a
    prefix of the other, e.g. Alloy_244 / Alloy_2447), the asked id included."""
    text = tok.decode(example[0])
    context, question = text.split("Question:", 1)
    q = re.search(r"[A-Z][a-z]+_\d+", question).group(0)
    names = set(re.findall(r"[A-Z][a-z]+_\d+", context))
    return sum(x.startswith(q) or q.startswith(x) for x in names)


# a reader that finds the asked id's passage but cannot tell where an id ends scores mean(1 / prefix_names)
n_prefix = {n: [prefix_names(e) for e in evsets[n]] for n in evsets}
print(json.dumps({"contexts_with_prefix_ids": {n: sum(m > 1 for m in v) / len(v) for n, v in n_prefix.items()},
                  "prefix_blind_bound": {n: sum(1 / m for m in v) / len(v) for n, v in n_prefix.items()}}), flush=True)


@torch.no_grad()
def score(n):
    """Whole-answer argmax accuracy on evsets[n]: all, contexts with and without prefix-related ids."""
    model.eval()
    hit = []
    for i in range(0, len(evsets[n]), 50):
        ids, ans, att = R.pad_batch(evsets[n][i:i + 50], tok.pad_token_id)
        pred = model(input_ids=ids, attention_mask=att).logits[:, :-1].argmax(-1)
        m = ans[:, 1:].bool()
        hit += ((pred == ids[:, 1:]) | ~m).all(1).tolist()
    model.train()
    pre = [h for h, m in zip(hit, n_prefix[n]) if m > 1]
    other = [h for h, m in zip(hit, n_prefix[n]) if m == 1]
    return (sum(hit) / len(hit), round(sum(pre) / max(1, len(pre)), 3), round(sum(other) / max(1, len(other)), 3))


t0 = time.perf_counter()
for step in range(args.steps):
    for g in opt.param_groups:
        g["lr"] = R.lr_at(step, args.steps, args.lr, 0.04)
    progress[0] = max(0, step - args.copy_warmup) / max(1, args.id_ramp * (args.steps - args.copy_warmup))
    is_copy = step < args.copy_warmup
    n = data.rng.randint(2, args.max_ctx)
    ex = ([R.copy_example(tok, data.rng) for _ in range(args.batch)] if is_copy else
          [data.sample(n_ctx=n, n_questions=1, same_fact=True, n_sent=args.n_sent) for _ in range(args.batch)])
    ids, ans, att = R.pad_batch(ex, tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        loss, nll = R.reader_loss(model, ids, ans, att, 0.0 if is_copy else args.ctx_weight)  # pretrain's loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
        a_loss = ((nll.detach() * ans[:, 1:]).sum() / ans[:, 1:].sum()).item()
        print(json.dumps({"step": step + 1, "s": round(time.perf_counter() - t0), "answer_loss": round(a_loss, 4),
                          **{f"bind{n}{part}": v for n in (2, 4) for part, v in zip(("", "_prefix", "_other"), score(n))}}),
          flush=True)
if args.save:
    R.save_hf_model(model, tok, args.save, {"preset": "custom", "steps": args.steps})
