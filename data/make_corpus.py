"""Deterministic generator of refrag's demo data (see data/README_DATA.md).

    python data/make_corpus.py                      # rewrites the shipped files in data/
    python data/make_corpus.py --n 100000 --out_dir /tmp/big    # scale tests: only corpus_100000.txt
    python data/make_corpus.py --extra 2000 --out_dir runs/extra  # more training data (fresh entities)

Every fact is drawn from a seeded RNG (never computed from the entity id), so a decoder can only
know it by reading the passage. The entities asked about in rag_eval.jsonl and cpt_eval.jsonl are
held out: they are in the corpora but in no training text (rag_train, cpt_train, tokenizer.json).
The same seed always gives byte-identical files.

--extra N writes more *training* data about N fresh entities (ids from 100,000 up, disjoint from every
shipped id and from any --n corpus), drawn by a separately seeded generator with its own name pools:
extra_corpus.txt (their passages; extra questions get their own index), extra_rag_train.jsonl (4
questions each) and extra_cpt_train.jsonl (texts of 5-9 of them). A drawn entity whose passage holds a
held-out entity id or any answer of the shipped rag_eval.jsonl is drawn again, so none of those strings
is in any extra file; the shipped files are not touched.
"""
import argparse
import json
import os
import random
import re
import tempfile

KINDS = ("City", "Alloy", "Person", "Event")
SEED = 20250901
N_SMALL, N_MEDIUM, N_LARGE = 500, 2000, 3000
N_EVAL_ENTITIES = 100            # held-out entities (25 per kind), all in corpus_small
TRAIN_QUESTIONS_PER_ENTITY = 4   # 400 train entities -> 1600 questions
EVAL_QUESTIONS_PER_ENTITY = 3    # 100 eval entities -> 300 questions
N_CPT_TRAIN, N_CPT_EVAL = 480, 60
CPT_PASSAGES = (5, 9)            # passages per cpt text (inclusive range)
CPT_MAX_O = 256                  # at most this many continuation tokens
TOKENIZER_VOCAB = 4096
CONV_TURNS = 3                   # questions about each entity of a conversation (conv_train / conv_eval.jsonl)
CONV_ENTITIES = 2                # entities per conversation, one after the other (6 turns)
CONV_SEED_OFFSET = 34            # the conversations' generator: seed + 34 (the other files keep their bytes)
ANAPHORA = {"City": "that city", "Alloy": "that alloy", "Person": "that researcher", "Event": "that event"}
DESCRIBE = "Tell me everything the context says about {e}."  # describe_eval.jsonl: answers copied from a passage
MAX_PER_KIND = 30_000            # make_ids draws from 42,099 ids per kind; near that it would take forever

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
          "kr", "st", "tr", "th", "sh", "ch", "w", "h"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "sk"]
METALS = ["iron", "nickel", "cobalt", "copper", "tin", "zinc", "chromium", "titanium", "aluminium",
          "manganese", "molybdenum", "tungsten", "vanadium", "niobium", "silver", "magnesium"]
USES = ["turbine blades", "bridge cables", "surgical tools", "ship propellers", "rail tracks",
        "reactor vessels", "bicycle frames", "watch springs", "satellite antennas", "drill bits",
        "pressure valves", "church bells", "aircraft landing gear", "heat exchangers"]
FIELDS = ["astronomy", "metallurgy", "linguistics", "oceanography", "botany", "number theory",
          "glaciology", "economics", "virology", "seismology", "cartography", "acoustics",
          "robotics", "paleontology", "crystallography", "epidemiology"]
TOPICS = ["tidal models", "ancient scripts", "lichen growth", "prime gaps", "ice cores",
          "trade routes", "sound barriers", "fossil birds", "crystal defects", "river deltas",
          "solar flares", "bird migration", "coral reefs", "volcanic ash", "desert winds"]
INDUSTRIES = ["shipbuilding", "textiles", "glassmaking", "fishing", "tea trading", "printing",
              "clockmaking", "salt mining", "paper milling", "wine making", "silk weaving"]
OUTCOMES = ["a peace treaty", "a new constitution", "a trade agreement", "a royal marriage",
            "the founding of a library", "a change of dynasty", "a border settlement",
            "the abolition of a tax", "a shared calendar", "a general amnesty"]
EVENT_TYPES = ["a rebellion", "a naval battle", "a great fire", "a council", "a siege",
               "a flood", "a festival", "a migration", "a strike", "a coronation"]
FOREIGN = [  # sentence in another language appended to about a quarter of the passages
    "Según los archivos locales, {e} es conocido en toda la región.",
    "{e} aparece en muchos libros de historia.",
    "{e} 在当地非常有名。",
    "很多学生研究过{e}。",
    "Selon les archives, {e} reste célèbre dans la région.",
    "{e} wird in vielen alten Chroniken erwähnt.",
]
FILLERS = {
    "City": ["Visitors often describe {e} as quiet in winter.",
             "The old market of {e} opens every morning.",
             "Many streets in {e} are paved with grey stone.",
             "A stone bridge in {e} is older than the town hall.",
             "The public gardens of {e} are crowded in spring.",
             "Local newspapers in {e} report mostly on the harbour."],
    "Alloy": ["Engineers value {e} for its stability under load.",
              "Samples of {e} are kept in several museums.",
              "{e} resists corrosion better than plain steel.",
              "Early batches of {e} were brittle and hard to cast.",
              "The recipe for {e} was published in a short report.",
              "Workshops still test {e} with simple bending trials."],
    "Person": ["Colleagues describe {e} as patient and precise.",
               "{e} has supervised many doctoral students.",
               "{e} often gives public lectures on science.",
               "Several textbooks cite the results of {e}.",
               "{e} spent two years working abroad.",
               "The notebooks of {e} are kept in an archive."],
    "Event": ["Historians still debate the causes of {e}.",
              "Few written records of {e} survive today.",
              "{e} is remembered in several folk songs.",
              "Paintings of {e} hang in the national gallery.",
              "School children learn about {e} at an early age.",
              "Later writers often exaggerated the scale of {e}."],
}


def make_word(rng, syllables):
    w = ""
    for i in range(syllables):
        w += rng.choice(ONSETS) + rng.choice(VOWELS) + (rng.choice(CODAS) if i == syllables - 1 else "")
    return w.capitalize()


def make_pool(rng, n, syllables=(2, 3)):
    pool = set()
    while len(pool) < n:
        pool.add(make_word(rng, rng.randint(*syllables)))
    return sorted(pool)


def make_ids(rng, n):
    """n distinct ids with near-identical families (7, 70, 71, 714...) adjacent in the list."""
    ids, seen = [], set()
    while len(ids) < n:
        base = rng.randint(1, 420)
        family = [base, base * 10 + rng.randint(0, 9)]
        if rng.random() < 0.3:
            family.append(family[1] * 10 + rng.randint(0, 9))
        for x in family:
            if x not in seen and len(ids) < n:
                seen.add(x)
                ids.append(x)
    return ids


def make_entity(rng, kind, num, pools):
    """Draw the facts of one entity; return (name, facts dict, {fact: (question, answer)})."""
    e = f"{kind}_{num}"
    if kind == "City":
        f = dict(country=rng.choice(pools["country"]), river=rng.choice(pools["river"]),
                 year=str(rng.randint(800, 1950)), univ="University of " + rng.choice(pools["univ"]),
                 population=str(rng.randint(2, 950) * 1000), industry=rng.choice(INDUSTRIES))
        sents = [f"{e} is a city in {f['country']}.",
                 f"The {f['river']} River flows through {e}.",
                 f"{e} was founded in {f['year']}.",
                 f"{e} is home to the {f['univ']}.",
                 f"About {f['population']} people live in {e}.",
                 f"The main industry of {e} is {f['industry']}."]
        qa = dict(country=(f"In which country is {e}?", f["country"]),
                  river=(f"Which river flows through {e}?", f["river"]),
                  year=(f"In which year was {e} founded?", f["year"]),
                  univ=(f"Which university is in {e}?", f["univ"]),
                  population=(f"How many people live in {e}?", f["population"]),
                  industry=(f"What is the main industry of {e}?", f["industry"]))
    elif kind == "Alloy":
        m1, m2 = rng.sample(METALS, 2)
        f = dict(metals=f"{m1} and {m2}", melting=str(rng.randint(420, 3100)),
                 year=str(rng.randint(1700, 2020)), univ="University of " + rng.choice(pools["univ"]),
                 use=rng.choice(USES), density=f"{rng.randint(20, 199) / 10:.1f}")
        sents = [f"{e} is an alloy of {f['metals']}.",
                 f"{e} melts at {f['melting']} degrees Celsius.",
                 f"{e} was first produced in {f['year']}.",
                 f"{e} was developed at the {f['univ']}.",
                 f"{e} is mainly used for {f['use']}.",
                 f"The density of {e} is {f['density']} grams per cubic centimetre."]
        qa = dict(metals=(f"Which metals make up {e}?", f["metals"]),
                  melting=(f"What is the melting point of {e} in degrees Celsius?", f["melting"]),
                  year=(f"In which year was {e} first produced?", f["year"]),
                  univ=(f"Where was {e} developed?", f["univ"]),
                  use=(f"What is {e} mainly used for?", f["use"]),
                  density=(f"What is the density of {e}?", f["density"]))
    elif kind == "Person":
        f = dict(field=rng.choice(FIELDS), year=str(rng.randint(1890, 2000)),
                 country=rng.choice(pools["country"]), univ="University of " + rng.choice(pools["univ"]),
                 award=rng.choice(pools["award"]) + " Prize", topic=rng.choice(TOPICS))
        sents = [f"{e} is a researcher in {f['field']}.",
                 f"{e} was born in {f['year']} in {f['country']}.",
                 f"{e} works at the {f['univ']}.",
                 f"{e} received the {f['award']}.",
                 f"{e} is best known for work on {f['topic']}."]
        qa = dict(field=(f"In which field does {e} work?", f["field"]),
                  year=(f"In which year was {e} born?", f["year"]),
                  country=(f"In which country was {e} born?", f["country"]),
                  univ=(f"Where does {e} work?", f["univ"]),
                  award=(f"Which prize did {e} receive?", f["award"]),
                  topic=(f"What is {e} best known for?", f["topic"]))
    else:
        f = dict(type=rng.choice(EVENT_TYPES), year=str(rng.randint(1000, 1990)),
                 country=rng.choice(pools["country"]), river=rng.choice(pools["river"]),
                 leader=rng.choice(pools["first"]) + " " + rng.choice(pools["last"]),
                 days=str(rng.randint(2, 400)), outcome=rng.choice(OUTCOMES))
        sents = [f"{e} was {f['type']}.",
                 f"{e} took place in {f['year']}.",
                 f"{e} happened in {f['country']}, near the {f['river']} River.",
                 f"{e} was led by {f['leader']}.",
                 f"{e} lasted {f['days']} days.",
                 f"{e} ended with {f['outcome']}."]
        qa = dict(year=(f"In which year did {e} take place?", f["year"]),
                  country=(f"In which country did {e} happen?", f["country"]),
                  river=(f"Near which river did {e} happen?", f["river"]),
                  leader=(f"Who led {e}?", f["leader"]),
                  days=(f"How many days did {e} last?", f["days"]),
                  outcome=(f"How did {e} end?", f["outcome"]))
    body = sents[1:]
    rng.shuffle(body)
    fillers = rng.sample(FILLERS[kind], len(FILLERS[kind]))
    n_fill = rng.randint(2, 4)
    for j, s in enumerate(fillers):  # fillers go between facts, never first; at least 60 words
        if j >= n_fill and len(" ".join([sents[0]] + body).split()) >= 62:
            break
        body.insert(rng.randint(1, len(body)), s.format(e=e))
    words = [sents[0]] + body
    if rng.random() < 0.25:
        words.append(rng.choice(FOREIGN).format(e=e))
    text = " ".join(words)
    n_words = len(text.split())
    assert 60 <= n_words <= 120, (e, n_words)
    return e, text, qa


def conversations(rng, entities, idx, prefix):
    """Conversations about CONV_ENTITIES entities each (idx shuffled, taken in groups), CONV_TURNS questions about
    different facts of each in turn: the first names the entity, the follow-ups call it "that city" (or alloy,
    researcher, event), so only the conversation says which; a turn's "entity" is the one it asks about."""
    idx = list(idx)
    rng.shuffle(idx)
    rows = []
    for g in range(0, len(idx) - CONV_ENTITIES + 1, CONV_ENTITIES):
        turns = []
        for i in idx[g:g + CONV_ENTITIES]:
            e, _, qa = entities[i]
            for t, fact in enumerate(rng.sample(sorted(qa), CONV_TURNS)):
                q, a = qa[fact]
                turns.append({"question": q if t == 0 else q.replace(e, ANAPHORA[e.split("_")[0]]), "answers": [a],
                              "entity": e, "fact": fact})
        rows.append({"id": f"{prefix}-{len(rows):05d}", "turns": turns})
    return rows


def atomic_write(path, text):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def train_tokenizer(texts, vocab_size, split_digits=False):
    """Byte-level BPE for the demo decoder, trained on training-split text only; split_digits: every
    digit its own token, as Llama's tokenizer splits numbers (results/reader_diag, binding runs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


EXTRA_SEED = 20261207
EXTRA_ID_BASE = 100_000          # every shipped or --n id is below 42,100
MAX_EXTRA = 20_000


def held_out_strings(data_dir):
    """The shipped rag_eval.jsonl's entities and answers: what no extra file may contain."""
    entities, answers = set(), set()
    with open(os.path.join(data_dir, "rag_eval.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            entities.add(rec["entity"])
            answers.update(a.strip() for a in rec["answers"])
    return entities, answers


def write_extra(n, seed, out_dir):
    """--extra: n fresh training entities from their own generator (see the module docstring)."""
    entities_out, answers = held_out_strings(os.path.dirname(os.path.abspath(__file__)))
    banned = re.compile("|".join(r"(?<!\w)" + re.escape(x) + r"(?!\w)"
                                 for x in sorted(entities_out | answers, key=len, reverse=True)))
    rng = random.Random(seed)
    pools = dict(country=make_pool(rng, 40), river=make_pool(rng, 80), univ=make_pool(rng, 60),
                 award=make_pool(rng, 30), first=make_pool(rng, 50, (2, 2)), last=make_pool(rng, 50))
    per_kind = -(-n // len(KINDS))
    ids = {k: [EXTRA_ID_BASE + x for x in make_ids(rng, per_kind)] for k in KINDS}
    entities = []
    for k, num in [(k, ids[k][i]) for i in range(per_kind) for k in KINDS][:n]:
        while True:  # drawn again until no held-out string is in the passage (it holds every answer too)
            e = make_entity(rng, k, num, pools)
            if not banned.search(e[1]):
                break
        entities.append(e)
    questions = []
    for e, _, qa in entities:
        for fact in rng.sample(sorted(qa), TRAIN_QUESTIONS_PER_ENTITY):
            q, a = qa[fact]
            questions.append({"id": f"extra-train-{len(questions):06d}", "question": q, "answers": [a],
                              "entity": e, "fact": fact})
    rng.shuffle(questions)
    texts = []
    for j in range(max(1, n * N_CPT_TRAIN // 400)):  # as many texts per entity as the shipped split has
        parts = [entities[i][1] for i in rng.sample(range(n), min(n, rng.randint(*CPT_PASSAGES)))]
        texts.append({"id": f"extra-cpt-{j:06d}", "text": "\n".join(parts), "entities": [p.split(" ", 1)[0] for p in parts]})
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.json"))
    for rec in texts:  # the shipped split rule (s: all passages but the last two, o: at most 256 tokens)
        parts = rec["text"].split("\n")
        s = len(tok.encode("\n".join(parts[:-2])).ids) if len(parts) > 2 else len(tok.encode(parts[0]).ids) // 2
        rec["split"] = {"s": max(1, s), "o": min(len(tok.encode(rec["text"]).ids) - max(1, s), CPT_MAX_O)}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "extra_corpus.txt"), "".join(t + "\n" for _, t, _ in entities))
    atomic_write(os.path.join(out_dir, "extra_rag_train.jsonl"), jsonl(questions))
    atomic_write(os.path.join(out_dir, "extra_cpt_train.jsonl"), jsonl(texts))
    print(f"wrote extra_corpus {len(entities)}, extra_rag_train {len(questions)}, extra_cpt_train {len(texts)} "
          f"to {out_dir} (seed {seed})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--n", type=int, default=0, help="write only corpus_<n>.txt with n passages (scale tests; "
                    f"at most {MAX_PER_KIND * len(KINDS)})")
    ap.add_argument("--corpus_only", action="store_true", help="(implied by --n; kept for older command lines)")
    ap.add_argument("--extra", type=int, default=0, help="write only extra training data about this many fresh "
                    f"entities (at most {MAX_EXTRA})")
    ap.add_argument("--extra_seed", type=int, default=EXTRA_SEED, help="seed of the extra data's generator")
    args = ap.parse_args()
    if args.extra:
        if not 1 <= args.extra <= MAX_EXTRA or args.n:
            ap.error(f"--extra {args.extra}: between 1 and {MAX_EXTRA}, without --n")
        return write_extra(args.extra, args.extra_seed, args.out_dir)
    if not 0 <= args.n <= MAX_PER_KIND * len(KINDS):
        ap.error(f"--n {args.n}: between 1 and {MAX_PER_KIND * len(KINDS)} passages")
    rng = random.Random(args.seed)
    n_total = max(N_LARGE, args.n)
    pools = dict(country=make_pool(rng, 40), river=make_pool(rng, 80), univ=make_pool(rng, 60),
                 award=make_pool(rng, 30), first=make_pool(rng, 50, (2, 2)), last=make_pool(rng, 50))
    per_kind = -(-n_total // len(KINDS))
    ids = {k: make_ids(rng, per_kind) for k in KINDS}
    # interleave kinds so every prefix of the entity list (small < medium < large) is balanced
    order = [(k, ids[k][i]) for i in range(per_kind) for k in KINDS][:n_total]
    entities = [make_entity(rng, k, num, pools) for k, num in order]
    names = [e for e, _, _ in entities]
    assert len(set(names)) == len(names)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.n:  # only the large corpus: the other files come from the default run (another n draws other ids)
        atomic_write(os.path.join(args.out_dir, f"corpus_{args.n}.txt"),
                     "".join(t + "\n" for _, t, _ in entities[:args.n]))
        return
    for name, n in (("small", N_SMALL), ("medium", N_MEDIUM), ("large", N_LARGE)):
        atomic_write(os.path.join(args.out_dir, f"corpus_{name}.txt"),
                     "".join(t + "\n" for _, t, _ in entities[:n]))

    # held-out split: 25 entities of each kind from corpus_small
    small = list(range(N_SMALL))
    eval_idx = set()
    for kind in KINDS:
        of_kind = [i for i in small if names[i].startswith(kind + "_")]
        eval_idx.update(rng.sample(of_kind, N_EVAL_ENTITIES // len(KINDS)))
    train_idx = [i for i in small if i not in eval_idx]
    eval_idx = sorted(eval_idx)

    def qa_rows(idx, per_entity, prefix):
        rows = []
        for i in idx:
            e, _, qa = entities[i]
            for fact in rng.sample(sorted(qa), per_entity):
                q, a = qa[fact]
                rows.append({"id": f"{prefix}-{len(rows):05d}", "question": q, "answers": [a],
                             "entity": e, "fact": fact})
        return rows
    rag_train = qa_rows(train_idx, TRAIN_QUESTIONS_PER_ENTITY, "train")
    rag_eval = qa_rows(eval_idx, EVAL_QUESTIONS_PER_ENTITY, "eval")
    rng.shuffle(rag_train)

    # tokenizer: trained on the training split only (no held-out entity text)
    cpt_pool = [i for i in range(N_LARGE) if i not in set(eval_idx)]
    tok_texts = [entities[i][1] for i in cpt_pool] + [r["question"] + " " + r["answers"][0] for r in rag_train]
    tok_texts += ["Context:\nQuestion: Answer:"] * 10
    tok = train_tokenizer(tok_texts, TOKENIZER_VOCAB)

    def cpt_rows(pool, n, prefix):
        rows = []
        for j in range(n):
            m = rng.randint(*CPT_PASSAGES)
            parts = [entities[i][1] for i in rng.sample(pool, m)]
            text = "\n".join(parts)
            n_tok = len(tok.encode(text).ids)
            s = len(tok.encode("\n".join(parts[:-2])).ids)  # context: all but the last two passages
            o = min(n_tok - s, CPT_MAX_O)
            rows.append({"id": f"{prefix}-{j:05d}", "text": text, "split": {"s": s, "o": o},
                         "entities": [p.split(" ", 1)[0] for p in parts]})
        return rows
    cpt_train = cpt_rows(cpt_pool, N_CPT_TRAIN, "cpt-train")
    cpt_eval = cpt_rows(eval_idx, N_CPT_EVAL, "cpt-eval")
    # the same byte-level BPE with one token per digit (Llama's convention), trained on corpus_small's
    # training split (its passages, rag_train's questions and answers): the tokenizer with which the
    # demo decoder learns to bind names (README, "Why several passages defeat the demo reader")
    tok_digits = train_tokenizer([entities[i][1] for i in train_idx] +
                                 [r["question"] + " " + r["answers"][0] for r in rag_train],
                                 TOKENIZER_VOCAB, split_digits=True)

    atomic_write(os.path.join(args.out_dir, "rag_train.jsonl"), jsonl(rag_train))
    atomic_write(os.path.join(args.out_dir, "rag_eval.jsonl"), jsonl(rag_eval))
    atomic_write(os.path.join(args.out_dir, "cpt_train.jsonl"), jsonl(cpt_train))
    atomic_write(os.path.join(args.out_dir, "cpt_eval.jsonl"), jsonl(cpt_eval))
    atomic_write(os.path.join(args.out_dir, "tokenizer.json"), tok.to_str(pretty=False))
    atomic_write(os.path.join(args.out_dir, "tokenizer_digits.json"), tok_digits.to_str(pretty=False))
    # conversations and the long-answer task draw from their own generator: the files above keep their bytes
    crng = random.Random(args.seed + CONV_SEED_OFFSET)
    atomic_write(os.path.join(args.out_dir, "conv_train.jsonl"), jsonl(conversations(crng, entities, train_idx, "conv-train")))
    atomic_write(os.path.join(args.out_dir, "conv_eval.jsonl"), jsonl(conversations(crng, entities, eval_idx, "conv-eval")))
    atomic_write(os.path.join(args.out_dir, "describe_eval.jsonl"), jsonl(
        [{"id": f"describe-{j:05d}", "question": DESCRIBE.format(e=entities[i][0]), "answers": [entities[i][1]],
          "entity": entities[i][0]} for j, i in enumerate(eval_idx)]))
    print(f"wrote corpora {N_SMALL}/{N_MEDIUM}/{N_LARGE}, rag_train {len(rag_train)}, rag_eval {len(rag_eval)}, "
          f"cpt_train {len(cpt_train)}, cpt_eval {len(cpt_eval)}, conv_train {len(train_idx) // CONV_ENTITIES}, "
          f"conv_eval {len(eval_idx) // CONV_ENTITIES}, "
          f"describe_eval {len(eval_idx)}, tokenizer vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
