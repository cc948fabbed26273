"""One picture of both evaluate runs of results/conversations/run.sh (REFRAG and the full-context baseline): TTFT and
EM against the number of earlier turns. Run: PYTHONPATH=. python results/conversations/plot.py [RUNS_DIR]"""
import json
import os
import sys

import refrag

runs = sys.argv[1] if len(sys.argv) > 1 else "runs/conversations"
parts = [json.load(open(os.path.join(runs, name, "results.json"))) for name in ("refrag", "full")]
merged = dict(parts[0], decoder="REFRAG runs/quickstart/sft, full context runs/quickstart/sft_full",
              results=[r for p in parts for r in p["results"]])
refrag.plot_turns(merged, os.path.join(os.path.dirname(os.path.abspath(__file__)), "conversation_turns.png"))
