#!/usr/bin/env python3
"""Writes a small log-likelihood task for lm-evaluation-harness: last-word prediction on the
held-out lines of tiny Shakespeare (the last 10 %, which the built-in model never trained on).

Each document is a line of at least four words, with the line before it as context:
`context` is that line, a newline and the line without its last word; `target` is a space and
the last word. lm-eval scores `target` given `context` by log-likelihood: `acc` is whether
every byte of the word was the model's greedy choice, `perplexity` from the summed
log-probabilities.

Usage: scripts/lm-eval/make_task.py OUTDIR [--docs 200]
Writes OUTDIR/lastword.jsonl and OUTDIR/shakespeare_lastword.yaml (for `--include_path OUTDIR`).
"""
import argparse
import json
import os

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--docs", type=int, default=200)
a = ap.parse_args()
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
text = open(os.path.join(root, "data", "tinyshakespeare.txt"), encoding="utf-8").read()
held_out = text[int(len(text) * 0.9):]
lines = held_out.split("\n")[1:]  # the first may be cut
docs = []
for prev, line in zip(lines, lines[1:]):
    words = line.split(" ")
    if prev.strip() and len(words) >= 4 and words[-1].strip(".,;:!?'-").isalpha():
        docs.append({"context": prev + "\n" + " ".join(words[:-1]), "target": " " + words[-1]})
    if len(docs) == a.docs:
        break
os.makedirs(a.out, exist_ok=True)
data = os.path.abspath(os.path.join(a.out, "lastword.jsonl"))
with open(data, "w", encoding="utf-8") as f:
    for d in docs:
        f.write(json.dumps(d) + "\n")
with open(os.path.join(a.out, "shakespeare_lastword.yaml"), "w", encoding="utf-8") as f:
    f.write(f"""task: shakespeare_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
""")
print(f"{len(docs)} documents in {data}")
