"""`PIPELINE` and `PIPELINE_ARGS`, the official package's generation helpers
(`rwkv.utils`), on this engine, with the official semantics: the same sampling
(`sample_logits` draws with NumPy's global generator, as the official CPU path does, so
`np.random.seed` reproduces a run), penalties and stop rules.

    from rwkv_rs.utils import PIPELINE, PIPELINE_ARGS   # was: from rwkv.utils import ...
"""

import numpy as np

from ._native import Tokenizer, distribution


class PIPELINE_ARGS:
    """Sampling settings of `PIPELINE.generate`, with the official defaults."""

    def __init__(self, temperature=1.0, top_p=0.85, top_k=0, alpha_frequency=0.2,
                 alpha_presence=0.2, alpha_decay=0.996, token_ban=[], token_stop=[],
                 chunk_len=256):
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.alpha_frequency = alpha_frequency
        self.alpha_presence = alpha_presence
        self.alpha_decay = alpha_decay
        self.token_ban = token_ban
        self.token_stop = token_stop
        self.chunk_len = chunk_len


def _tokenizer(word_name):
    if word_name == "rwkv_vocab_v20230424":
        return Tokenizer("world")
    if word_name == "cl100k_base":
        raise ValueError(
            "tokenizer 'cl100k_base' (tiktoken) is not supported: use "
            "'rwkv_vocab_v20230424', 'bytes' or a tokenizer.json"
        )
    return Tokenizer(str(word_name))


class PIPELINE:
    """`PIPELINE(model, WORD_NAME)`: `WORD_NAME` is `"rwkv_vocab_v20230424"` (World), a
    Hugging Face `tokenizer.json` path, or (not in the official package) `"bytes"`."""

    def __init__(self, model, WORD_NAME):
        self.model = model
        self.tokenizer = _tokenizer(WORD_NAME)
        # The official package decodes a tokenizer.json's tokens as the `tokenizers` library
        # does (each broken UTF-8 sequence replaced), the World vocabulary all or nothing.
        self._lossy = str(WORD_NAME).endswith(".json")

    def refine_context(self, context):
        context = context.strip().split("\n")
        for c in range(len(context)):
            context[c] = context[c].strip().strip("\u3000").strip("\r")
        context = list(filter(lambda c: c != "", context))
        context = "\n" + ("\n".join(context)).strip()
        if context == "":
            context = "\n"
        return context

    def encode(self, x):
        return self.tokenizer.encode(x)

    def decode(self, x):
        if self._lossy:
            return self.tokenizer.decode_bytes(x).decode("utf-8", errors="replace")
        return self.tokenizer.decode(x)

    def sample_logits(self, logits, temperature=1.0, top_p=0.85, top_k=0):
        """A token drawn from the filtered distribution with `np.random.choice`."""
        if hasattr(logits, "detach"):
            logits = logits.detach().float().cpu().numpy()
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        probs = distribution(logits, float(temperature), float(top_p), int(top_k))
        return int(np.random.choice(a=len(probs), p=probs))

    def generate(self, ctx, token_count=100, args=PIPELINE_ARGS(), callback=None, state=None):
        """Up to `token_count` tokens after `ctx`; `callback` receives each piece of text as
        it completes (whole UTF-8 characters). Returns the text."""
        all_tokens = []
        out_last = 0
        out_str = ""
        occurrence = {}
        for i in range(token_count):
            tokens = self.encode(ctx) if i == 0 else [token]
            while len(tokens) > 0:
                out, state = self.model.forward(tokens[: args.chunk_len], state)
                tokens = tokens[args.chunk_len:]

            for n in args.token_ban:
                out[n] = -float("inf")
            for n in occurrence:
                out[n] -= args.alpha_presence + occurrence[n] * args.alpha_frequency

            token = self.sample_logits(out, temperature=args.temperature, top_p=args.top_p,
                                       top_k=args.top_k)
            if token in args.token_stop:
                break
            all_tokens += [token]
            for xxx in occurrence:
                occurrence[xxx] *= args.alpha_decay

            ttt = self.decode([token])
            www = 1
            if ttt in " \t0123456789":
                www = 0
            if token not in occurrence:
                occurrence[token] = www
            else:
                occurrence[token] += www

            tmp = self.decode(all_tokens[out_last:])
            if "\ufffd" not in tmp:
                if callback:
                    callback(tmp)
                out_str += tmp
                out_last = i + 1
        return out_str
