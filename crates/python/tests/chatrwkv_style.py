"""A ChatRWKV-style script, written against the official `rwkv` package's API, that runs on
either package: `python chatrwkv_style.py rwkv|rwkv_rs MODEL TOKENIZER OUT.json` writes a JSON
object of everything it generated (the official package prints to stdout as it loads). With the same model and tokenizer both packages must print the
same (tests/fixtures/python/ holds the official package's output).

It uses what ChatRWKV and the package's own examples use: `RWKV(model, strategy)`,
`model.forward` with a carried state and `copy.deepcopy` to fork it, `PIPELINE.encode`,
`decode`, `sample_logits` and `generate` with `PIPELINE_ARGS` (penalties, bans, stop tokens,
small chunks) and a callback. Sampling is greedy (`top_p=0`), so the text is determined, but
for one seeded run with the default arguments.
"""

import copy
import json
import os
import sys

os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"

package, model_path, tokenizer, out_path = sys.argv[1:5]
if package == "rwkv":
    from rwkv.model import RWKV
    from rwkv.utils import PIPELINE, PIPELINE_ARGS
else:
    from rwkv_rs.model import RWKV
    from rwkv_rs.utils import PIPELINE, PIPELINE_ARGS

model = RWKV(model=model_path, strategy="cpu fp32")
pipeline = PIPELINE(model, tokenizer)
result = {}

# 1. PIPELINE.generate with penalties, a ban and a callback.
pieces = []
args = PIPELINE_ARGS(temperature=1.0, top_p=0.0, top_k=0, alpha_frequency=0.25,
                     alpha_presence=0.25, alpha_decay=0.996, token_ban=[0], token_stop=[],
                     chunk_len=256)
result["generate"] = pipeline.generate("ROMEO:\n", token_count=200, args=args,
                                       callback=pieces.append)
result["callback"] = "".join(pieces)

# 2. A prompt in small chunks, stopping at the end of the next speaker's name.
args = PIPELINE_ARGS(temperature=1.0, top_p=0.0, alpha_frequency=0.0, alpha_presence=0.0,
                     token_stop=pipeline.encode(":"), chunk_len=4)
context = pipeline.refine_context("  First Citizen:\n  Before we proceed any further, hear me speak.\n\n")
result["refined_context"] = context
result["chunked"] = pipeline.generate(context + "\n\n", token_count=120, args=args)

# 3. A conversation: the prompt's state kept, forked for two speakers, continued token by
# token with model.forward and sample_logits.
out, state = model.forward(pipeline.encode("KING HENRY:\nOnce more unto the breach, dear friends."), None)
saved = copy.deepcopy(state)
result["forks"] = []
for speaker in ["\nGLOUCESTER:\n", "\nEXETER:\n"]:
    fork = copy.deepcopy(saved)
    out, fork = model.forward(pipeline.encode(speaker), fork)
    tokens = []
    for _ in range(80):
        token = pipeline.sample_logits(out, temperature=1.0, top_p=0.0)
        tokens.append(token)
        out, fork = model.forward([token], fork)
    result["forks"].append(pipeline.decode(tokens))

# 4. full_output: the most likely next token at every position of a prompt.
out, _ = model.forward(pipeline.encode("To be, or not to be"), None, full_output=True)
result["argmax"] = [int(row.argmax()) for row in out]

# 5. Sampled text: `sample_logits` draws with NumPy's global generator in both packages, so
# the same seed gives the same text.
import numpy as np

np.random.seed(20240601)
result["sampled"] = pipeline.generate("JULIET:\n", token_count=150, args=PIPELINE_ARGS())

with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
    f.write("\n")
