"""Model pieces: the prompt layout, compress-anywhere, the all-expanded equivalence, selection."""
import numpy as np
import pytest
import torch

import refrag


@pytest.fixture(scope="module")
def dec(tiny_dec_dir):
    return refrag.load_decoder(tiny_dec_dir, torch.device("cpu"), torch.float32)


def test_split_chunks_per_passage():
    assert refrag.split_chunks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert refrag.split_chunks(np.arange(3, dtype=np.int32), 8) == [[0, 1, 2]]


def test_plain_prompt_template_has_one_bos_and_shared_separator(tok):
    prefix, sep, suffix = refrag.prompt_pieces(tok, "Who led Event_1?")
    assert prefix[0] == tok.bos_token_id and tok.bos_token_id not in prefix[1:] + sep + suffix
    ids = prefix + refrag.encode_text(tok, "City_1 is a city.") + sep + refrag.encode_text(tok, "City_2 is a city.") + suffix
    assert tok.decode(ids) == ("<s>" + refrag.INSTRUCTION + "\nContext:\nCity_1 is a city.\nCity_2 is a city.\n"
                               "Question: Who led Event_1?\nAnswer:")
    ans = refrag.answer_ids(tok, "Tarn")
    assert ans[-1] == tok.eos_token_id and tok.decode(ans[:-1]) == " Tarn"


def test_all_chunks_expanded_equals_plain_decoder(dec, tok):
    """Equivalence (STYLE 12): with every chunk expanded, the REFRAG input path gives the plain
    decoder's logits on the same prompt."""
    passages = ["City_7 is a city in Tarn. The Velo River flows through City_7.", "Alloy_3 melts at 900 degrees."]
    prefix, sep, suffix = refrag.prompt_pieces(tok, "Which river flows through City_7?")
    segments, plain = [("tokens", prefix)], list(prefix)
    for i, p in enumerate(passages):
        if i:
            segments.append(("tokens", sep))
            plain += sep
        for c in refrag.split_chunks(refrag.encode_text(tok, p), 4):
            segments.append(("tokens", c))
            plain += c
    segments.append(("tokens", suffix))
    plain += suffix
    layout = refrag.build_layout(segments)
    proj = refrag.Projector(8, dec.config.hidden_size)
    with torch.no_grad():
        a = dec(inputs_embeds=refrag.layout_embeds(layout, dec, proj)).logits
        b = dec(input_ids=torch.tensor([plain])).logits
    assert layout.tok_ids.tolist() == plain
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def tiny_other_decoder(arch: str, tok):
    """A random-weight decoder of another architecture whose forward changes the logits after its LM head."""
    import transformers
    cls, extra = {"gemma2": ("Gemma2", dict(head_dim=8, final_logit_softcapping=1.0)),
                  "cohere": ("Cohere", dict(logit_scale=0.25)), "granite": ("Granite", dict(logits_scaling=4.0))}[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls + "Config")(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                pad_token_id=tok.pad_token_id, **extra)
    return getattr(transformers, cls + "ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere", "granite"])
def test_training_loss_with_every_chunk_expanded_equals_plain_decoder_loss(dec, tok, arch):
    """Equivalence on the training path: make_batch + RefragModel (batch_layouts and splice_embeds, the
    code inference uses too) with every chunk expanded give the plain decoder's loss on the same tokens,
    and targets_nll (the inference scorer) gives each row's mean NLL; also for decoders that scale or
    soft-cap their logits after the LM head (scoring read the LM head directly and missed that)."""
    dec = dec if arch == "llama" else tiny_other_decoder(arch, tok)
    prefix, sep, suffix = refrag.prompt_pieces(tok, "Which river flows through City_7?")
    ctxs = [refrag.encode_text(tok, "City_7 is a city in Tarn. The Velo River flows through City_7."),
            refrag.encode_text(tok, "Alloy_3 melts at 900 degrees.")]
    samples = [{"pieces": [("tokens", prefix)] + refrag.chunk_pieces(c, 4, set(range(100))) + [("tokens", suffix)],
                "target": refrag.answer_ids(tok, a)} for c, a in zip(ctxs, ["Velo River", "900"])]
    batch = refrag.make_batch(samples, tok.pad_token_id)
    assert batch["chunks"] == [] and (batch["slot"] == -1).all()
    rows = [prefix + c + suffix + s["target"] for c, s in zip(ctxs, samples)]
    T = max(map(len, rows))
    ids = torch.full((2, T), tok.pad_token_id)
    att, labels = torch.zeros(2, T, dtype=torch.long), torch.full((2, T), -100)
    for b, (x, s) in enumerate(zip(rows, samples)):
        ids[b, :len(x)], att[b, :len(x)] = torch.tensor(x), 1
        labels[b, len(x) - len(s["target"]):len(x)] = torch.tensor(s["target"])  # HF shifts them itself
    model = refrag.RefragModel(None, refrag.Projector(8, dec.config.hidden_size), dec, tok)
    with torch.no_grad():
        loss = model(batch)
        ref = dec(input_ids=ids, attention_mask=att, labels=labels).loss
        per_row = refrag.targets_nll(dec, None, [refrag.build_layout(s["pieces"]) for s in samples],
                                     [s["target"] for s in samples])
        ref_rows = [dec(input_ids=ids[b:b + 1], attention_mask=att[b:b + 1], labels=labels[b:b + 1]).loss
                    for b in range(2)]
    assert batch["tok_ids"][0, :len(rows[0])].tolist() == rows[0]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_row, torch.stack(ref_rows), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_row[0], per_row[1])  # two different rows: the check has teeth


def test_compress_anywhere_places_projected_chunks_at_their_slots(dec):
    proj = refrag.Projector(8, dec.config.hidden_size)
    c1, c2 = torch.randn(8), torch.randn(8)
    layout = refrag.build_layout([("tokens", [5, 6]), ("chunk", c1), ("tokens", [7]), ("chunk", c2), ("tokens", [8])])
    assert layout.tok_ids.tolist() == [5, 6, -1, 7, -1, 8] and layout.slot.tolist() == [-1, -1, 0, -1, 1, -1]
    with torch.no_grad():
        x = refrag.layout_embeds(layout, dec, proj)[0]
        emb = dec.get_input_embeddings()
        torch.testing.assert_close(x[2], proj(c1))
        torch.testing.assert_close(x[4], proj(c2))
        torch.testing.assert_close(x[3], emb(torch.tensor(7)))
        out = dec(inputs_embeds=x[None], use_cache=True, logits_to_keep=1)
    assert out.logits.shape[1] == 1 and out.past_key_values.get_seq_length() == 6  # one position per chunk


def test_projector_is_two_layer_mlp_with_hidden_equal_to_output():
    p = refrag.Projector(384, 256)
    assert (p.fc1.in_features, p.fc1.out_features, p.fc2.in_features, p.fc2.out_features) == (384, 256, 256, 256)


def test_select_expand_budget_and_order():
    g = torch.Generator().manual_seed(0)
    ppl = torch.tensor([1.0, 5.0, 3.0, 0.5, 4.0])
    assert refrag.select_expand(5, 0.0, "ppl_desc", ppl, g) == []
    assert refrag.select_expand(5, 1.0, "random", None, g) == [0, 1, 2, 3, 4]
    assert refrag.select_expand(5, 0.4, "ppl_desc", ppl, g) == [1, 4]      # highest perplexity expanded
    assert refrag.select_expand(5, 0.4, "ppl_asc", ppl, g) == [0, 3]       # lowest perplexity expanded
    assert refrag.select_expand(10, 0.3, "rank", None, g) == [0, 1, 2]    # the leading chunks (best-ranked passages)
    r = refrag.select_expand(10, 0.3, "random", None, g)
    assert len(r) == 3 and len(set(r)) == 3


def test_chunk_perplexities_match_a_direct_computation(dec, tok):
    ids = [refrag.encode_text(tok, "City_7 is a city in Tarn."), refrag.encode_text(tok, "Alloy_3 melts.")]
    got = refrag.chunk_perplexities(dec, ids, 3, torch.device("cpu"), tok.pad_token_id)
    with torch.no_grad():
        logits = dec(input_ids=torch.tensor([ids[0]])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[0][1:]), reduction="none")
    assert len(got[0]) == len(refrag.split_chunks(ids[0], 3)) and len(got[1]) == len(refrag.split_chunks(ids[1], 3))
    torch.testing.assert_close(got[0][0], nll[0:2].mean(), rtol=1e-4, atol=1e-4)  # first token unscored
    torch.testing.assert_close(got[0][1], nll[2:5].mean(), rtol=1e-4, atol=1e-4)


def test_sampling_greedy_and_top_p():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert refrag.sample_next(logits, 0.0, 1.0, None) == 1
    g = torch.Generator().manual_seed(0)
    assert {refrag.sample_next(logits, 1.0, 0.5, g) for _ in range(20)} == {1}  # nucleus keeps only the top token


def test_lr_schedule_warmup_then_cosine():
    lrs = [refrag.lr_at(s, 100, 1.0, 0.04) for s in range(100)]
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_metrics_normalisation_and_empty_answers():
    assert refrag.exact_match("The Tarnell.", ["tarnell"]) == 1.0
    assert refrag.exact_match("", [""]) == 0.0 and refrag.exact_match("   ", ["x"]) == 0.0
    assert refrag.token_f1("University of Gestuve", ["University of Botabeand"]) == pytest.approx(2 / 3)
    assert refrag.token_f1("", ["x"]) == 0.0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_index_types_find_the_nearest_passage(kind):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index, built = refrag.build_faiss(len(emb), emb.shape[1], kind, np.array_split(emb, 7), emb)  # added in batches
    assert built == kind
    q = emb[[7, 1234, 2999]] + 0.01 * rng.standard_normal((3, 32)).astype(np.float32)
    _, ids = index.search(q, 1)
    assert ids[:, 0].tolist() == [7, 1234, 2999]
    assert refrag.build_faiss(50, 32, kind, [emb[:50]], emb[:50])[1] == "flat"  # small corpora: exact search
