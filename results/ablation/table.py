"""Gather issue 32's ablation rows into results/ablation/{rows.json, table.md, em_vs_minutes.png}.

Rows come from three scripts, all run on the same machine: results/recon_facts/run.sh (cpt_recon alone, the
fact-value metric), results/quick_variants/run.sh (whole quick chains) and results/ablation/run.sh (finetune
variants and the trend with minutes; its raw folders are runs/abl/<row>/, of which the small files are copied
here). Minutes are training minutes: the trainer's own per-step times for cpt_recon rows, the stages' wall
times for chains, and the wall time of the finetune command (model loading included) for runs/abl rows, to
which REFRAG rows add their shared cpt_recon + cpt_next (runs/q_mlr, 5.6 min).
Run from the repository root: python results/ablation/table.py
"""
import json
import os
import shutil

HERE = "results/ablation"


def load(path):
    with open(path) as f:
        return json.load(f)


def machine():
    model, flags = "?", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    return f"{os.cpu_count()}-core {model}, " + ("AVX512-BF16, bf16 autocast" if "avx512_bf16" in flags
                                                  else "no AVX512-BF16, fp32")


def recon_minutes(metrics_path):
    mins, prev = 0.0, 0
    with open(metrics_path) as f:
        for line in f:
            m = json.loads(line)
            if "ms_per_step" in m:
                mins += m["ms_per_step"] * (m["step"] - prev) / 60000
                prev = m["step"]
    return mins


def qa(results, p, expanded_only=False, selection=None):
    for r in results:
        if r.get("mode") == "refrag" and r.get("p") == p and bool(r.get("drop_compressed")) == expanded_only \
                and (selection is None or r.get("selection") == selection):
            return r
    return None


def raw_top1(d):
    """{"raw_top1_em": ...} when the row's decoder was also scored reading raw passages (full mode, top 1)."""
    path = f"{d}/eval_raw1/results.json"
    return {"raw_top1_em": load(path)["results"][0]["em"]} if os.path.exists(path) else {}


def main():
    rows = []
    # cpt_recon alone: held-out fact values from one chunk of 16 (no context 0.127, raw-token ceiling 0.797)
    for name, factor in [("base", "one shared rate 2e-4 (before per-module rates)"),
                         ("mlr", "per-module rates: encoder 5e-5, projector 5e-3 (the default)"),
                         ("dec8", "per-module + --enc decoder:8"),
                         ("extra", "per-module + 6x training text (--extra 2000)"),
                         ("mlr1000", "per-module, 1,000 steps instead of 250")]:
        d = f"results/recon_facts/{name}"
        facts = load(f"{d}/facts.json")["facts"] if name == "base" else load(f"{d}/eval.json")["facts"]
        rows.append(dict(row=f"recon_{name}", group="cpt_recon (cpu preset stage, 250 steps)", factor=factor,
                         minutes=None if name == "base" else recon_minutes(f"{d}/metrics.jsonl"),
                         fact_value=facts["value"]["chunk"], fact_value_ci95=facts["value"]["chunk_ci95"],
                         entity_id=facts["id"]["chunk"], source=d))
    # whole quick chains (results/quick_variants)
    shared = 0.0
    for name, factor in [("mlr", "quick chain, MiniLM, per-module recon rates (finetune 100 steps)"),
                         ("dec8", "quick chain, --enc decoder:8")]:
        c = load(f"results/quick_variants/{name}/chain.json")
        st = {k: v["seconds"] for k, v in c["stages"].items()}
        mins = (st["cpt_recon"] + st["cpt_next"] + st["finetune"]) / 60
        if name == "mlr":
            shared = (st["cpt_recon"] + st["cpt_next"]) / 60
        r0 = qa(c["summary"]["qa"], 0.0)
        rows.append(dict(row=f"quick_{name}", group="refrag", factor=factor, minutes=mins,
                         fact_value=c["summary"]["recon_facts"]["value"]["chunk"], p0_em=r0["em"], p0_f1=r0["f1"],
                         ttft_ms=1000 * r0["ttft_s"], source=f"results/quick_variants/{name}"))
        if name == "dec8":
            full_s = st["finetune_full"]
            by = {b["topk"]: b for b in c["summary"]["full_ft_by_topk"]}
            rows.append(dict(row="full100", group="full", factor="full-context baseline, 100 steps at top 4",
                             minutes=full_s / 60, em_top8=by[8]["em"], f1_top8=by[8]["f1"], em_top1=by[1]["em"],
                             em_top4=by[4]["em"], ttft_top8_ms=1000 * by[8]["ttft_s"],
                             ttft_top1_ms=1000 * by[1]["ttft_s"], source="results/quick_variants/dec8"))
    kd = load("results/quick_variants/dec8_kd/eval/results.json")["results"]
    rows.append(dict(row="quick_dec8_kd", group="refrag", factor="dec8 + finetune distilling the baseline, "
                     "p0_share 0.5", minutes=None, p0_em=qa(kd, 0.0)["em"], p0_f1=qa(kd, 0.0)["f1"],
                     ttft_ms=1000 * qa(kd, 0.0)["ttft_s"], source="results/quick_variants/dec8_kd"))
    # runs/abl rows (results/ablation/run.sh)
    abl = [("ft50", "refrag", "finetune 50 steps"), ("ft200", "refrag", "finetune 200 steps"),
           ("ft400", "refrag", "finetune 400 steps"),
           ("ft100_mlr", "refrag", "finetune 100 steps, per-module rates (encoder 2.5e-5, projector 2.5e-3)"),
           ("ft100_p0only", "refrag", "finetune 100 steps, every sample at p = 0 (--p0_share 1)"),
           ("ft100_lora", "refrag", "finetune 100 steps, the decoder through LoRA adapters (--lora 16)"),
           ("ft100_lora_lr1e-3", "refrag", "finetune 100 steps, LoRA adapters (--lora 16) at --lr_dec 1e-3"),
           ("ft100_recon20", "refrag", "finetune 100 steps, 20% reconstruction samples (--recon_share 0.2)"),
           ("ft200_mlr", "refrag", "finetune 200 steps, per-module rates (encoder 2.5e-5, projector 2.5e-3)"),
           ("full25", "full", "full-context baseline, 25 steps at top 4"),
           ("full50", "full", "full-context baseline, 50 steps at top 4")]
    for name, group, factor in abl:
        src = f"runs/abl/{name}"
        dst = f"{HERE}/{name}"
        if os.path.exists(f"{src}/train_s"):  # copy the small files of a finished row into results/
            os.makedirs(dst, exist_ok=True)
            shutil.copy(f"{src}/train_s", dst)
            for sub in ("eval", "eval_top1", "eval_top4", "eval_top8", "eval_raw1"):
                if os.path.exists(f"{src}/{sub}/results.json"):
                    os.makedirs(f"{dst}/{sub}", exist_ok=True)
                    for fn in ("results.json", "results.md"):
                        shutil.copy(f"{src}/{sub}/{fn}", f"{dst}/{sub}/")
            for sub in ("sft", "sft_full"):
                if os.path.exists(f"{src}/{sub}/log.txt"):
                    shutil.copy(f"{src}/{sub}/log.txt", f"{dst}/{sub}_log.txt")
        if not os.path.exists(f"{dst}/train_s"):
            continue
        with open(f"{dst}/train_s") as f:
            mins = int(f.read()) / 60
        if group == "refrag":
            if not os.path.exists(f"{dst}/eval/results.json"):
                continue
            res = load(f"{dst}/eval/results.json")["results"]
            r0, r25, tw = qa(res, 0.0), qa(res, 0.25, selection="ppl_desc"), qa(res, 0.25, True, "ppl_desc")
            rows.append(dict(row=name, group=group, factor=factor, minutes=shared + mins, p0_em=r0["em"],
                             p0_f1=r0["f1"], ttft_ms=1000 * r0["ttft_s"], p25_em=r25["em"],
                             p25_twin_em=tw["em"], p25_ttft_ms=1000 * r25["ttft_s"], source=dst,
                             **raw_top1(dst)))
        else:
            if not all(os.path.exists(f"{dst}/eval_top{t}/results.json") for t in (1, 4, 8)):
                continue
            by = {t: load(f"{dst}/eval_top{t}/results.json")["results"][0] for t in (1, 4, 8)}
            rows.append(dict(row=name, group=group, factor=factor, minutes=mins, em_top8=by[8]["em"],
                             f1_top8=by[8]["f1"], em_top1=by[1]["em"], em_top4=by[4]["em"],
                             ttft_top8_ms=1000 * by[8]["ttft_s"], ttft_top1_ms=1000 * by[1]["ttft_s"], source=dst))
    # how the quickstart's fully fine-tuned REFRAG decoder reads raw passages (runs/abl/quick_mlr/eval_raw1)
    src = "runs/abl/quick_mlr/eval_raw1"
    if os.path.exists(f"{src}/results.json"):
        os.makedirs(f"{HERE}/quick_mlr/eval_raw1", exist_ok=True)
        for fn in ("results.json", "results.md"):
            shutil.copy(f"{src}/{fn}", f"{HERE}/quick_mlr/eval_raw1/")
    for r in rows:
        if r["row"] == "quick_mlr":
            r.update(raw_top1(f"{HERE}/quick_mlr"))
    # quick_mlr is the trend's 100-step REFRAG point, full100 the baseline's
    out = dict(machine=machine(), rows=rows)
    with open(f"{HERE}/rows.json", "w") as f:
        json.dump(out, f, indent=1)

    def fmt(x, nd=3):
        return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    lines = [f"Machine: {out['machine']}. 50 held-out questions, top 8, greedy, 16 answer tokens.", "",
             "| row | what changed | training min | fact values (1 chunk) | p = 0 EM / F1 | p = 0.25 ppl EM "
             "(expanded-only twin) | TTFT ms p = 0 | its decoder on raw text, top 1 EM | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["group"] == "full":
            continue
        em = "—" if "p0_em" not in r else f"{r['p0_em']:.3f} / {r['p0_f1']:.3f}"
        p25 = "—" if "p25_em" not in r else f"{r['p25_em']:.3f} ({r['p25_twin_em']:.3f})"
        lines.append(f"| {r['row']} | {r['factor']} | {fmt(r.get('minutes'), 1)} | {fmt(r.get('fact_value'))} | "
                     f"{em} | {p25} | {fmt(r.get('ttft_ms'), 1)} | {fmt(r.get('raw_top1_em'))} | {r['source']} |")
    lines += ["", "| baseline | training min | EM top 1 / 4 / 8 | F1 top 8 | TTFT ms top 1 / 8 | source |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["group"] == "full":
            lines.append(f"| {r['factor']} | {r['minutes']:.1f} | {r['em_top1']:.3f} / {r['em_top4']:.3f} / "
                         f"{r['em_top8']:.3f} | {r['f1_top8']:.3f} | {r['ttft_top1_ms']:.0f} / "
                         f"{r['ttft_top8_ms']:.0f} | {r['source']} |")
    with open(f"{HERE}/table.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trend = {"quick_mlr", "ft50", "ft200", "ft400"}
    ref = sorted((r for r in rows if r["row"] in trend), key=lambda r: r["minutes"])
    full = sorted((r for r in rows if r["group"] == "full"), key=lambda r: r["minutes"])
    mlr = sorted((r for r in rows if r["row"] in ("ft100_mlr", "ft200_mlr")), key=lambda r: r["minutes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, fkey, name in ((axes[0], "p0_em", "em_top8", "EM"), (axes[1], "p0_f1", "f1_top8", "F1")):
        ax.plot([r["minutes"] for r in ref], [r[key] for r in ref], "o-", label="REFRAG k=16 p=0, top 8")
        ax.plot([r["minutes"] for r in mlr], [r[key] for r in mlr], "o--", label="REFRAG, per-module finetune rates")
        ax.plot([r["minutes"] for r in full], [r[fkey] for r in full], "s-", label="full context, top 8")
        if key == "p0_em":
            ax.plot([r["minutes"] for r in full], [r["em_top1"] for r in full], "^--", label="full context, top 1")
        ax.set_xlabel("training minutes (this CPU)")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"50 held-out questions against training minutes ({out['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{HERE}/em_vs_minutes.png", dpi=110)


if __name__ == "__main__":
    main()
