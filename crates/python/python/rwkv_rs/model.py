"""`RWKV`, the official package's model class (`rwkv.model.RWKV`), on this engine.

    from rwkv_rs.model import RWKV          # was: from rwkv.model import RWKV
    model = RWKV(model="RWKV-x070-World-0.1B", strategy="cpu fp32")
    out, state = model.forward([187, 510], None)

The differences: logits are NumPy float32 arrays (`torch.from_numpy(out)` makes a tensor of
them without a copy), states are `rwkv_rs.State` objects (a state list of the official layout
is accepted as input; `state.to_list()` gives one back), and only CPU strategies run.
"""

import os
import sys
from types import SimpleNamespace

import numpy as np

from ._native import Model, State

# The official strategy's data types, by the weight format this engine converts to at load.
# `fp32` keeps the weights as stored: the kernels widen bf16 and f16 to f32 exactly, so the
# numbers are those of the official package's f32 copy, without the copy (or its memory
# traffic per token).
_FORMATS = {
    "fp32": None,
    "fp16": "f16",
    "bf16": "bf16",
    "fp32i8": "int8",
    "fp16i8": "int8",
    "bf16i8": "int8",
}

_VERSIONS = {"v4": 4, "v5.2": 5.2, "v6.0": 6.0, "v7": 7}


def strategy_format(strategy):
    """The weight format of an official strategy string (`"cpu fp32"`, `"cpu bf16"`,
    `"cpu fp32i8"`, ...): the first layer group's type, `None` (as stored) for `fp32`. A device
    other than `cpu` is a `ValueError`: this engine runs on the CPU."""
    groups = [g.strip() for g in str(strategy).split("->") if g.strip()]
    if not groups:
        raise ValueError(f"strategy {strategy!r}: empty (expected e.g. 'cpu fp32')")
    formats = []
    for g in groups:
        words = g.split()
        if len(words) < 2 or words[0] != "cpu" or words[1] not in _FORMATS:
            raise ValueError(
                f"strategy {strategy!r}: {g!r} is not 'cpu' with one of "
                f"{', '.join(_FORMATS)} (this engine runs on the CPU only)"
            )
        formats.append(_FORMATS[words[1]])
    return formats[0]


def _as_float32(t):
    """A float32 NumPy array of a state tensor given as a NumPy array or a torch tensor."""
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


class RWKV:
    """The official `RWKV(model, strategy)`; `model` may omit `.pth` as in the official
    package, and may be a `.safetensors` file. `threads` (not in the official package) gives
    the model a thread pool of its own."""

    def __init__(self, model, strategy="cpu fp32", verbose=True,
                 convert_and_save_and_exit=None, threads=None):
        if convert_and_save_and_exit:
            raise ValueError(
                "convert_and_save_and_exit: converted files are not needed here "
                "(use `rwkv convert IN OUT --quant int8|q4` to write one)"
            )
        path = os.fspath(model)
        if not os.path.exists(path) and os.path.exists(path + ".pth"):
            path += ".pth"
        self.strategy = strategy
        self._model = Model(path, quant=strategy_format(strategy), threads=threads)
        m = self._model
        self.version = _VERSIONS[m.generation]
        self.args = SimpleNamespace(
            MODEL_NAME=path,
            n_layer=m.n_layer,
            n_embd=m.n_embd,
            n_head=m.n_head,
            head_size=m.head_size,
            n_att=m.n_embd,
            n_ffn=m.ffn_dim,
            vocab_size=m.vocab_size,
        )
        if verbose:
            print(f"RWKV {m.generation} {path} ({strategy}, {m.weight_format} weights)",
                  file=sys.stderr)

    @property
    def native(self):
        """The `rwkv_rs.Model` underneath."""
        return self._model

    def forward(self, tokens, state, full_output=False):
        """`(logits, state)` after `tokens`; `state=None` starts fresh, a `State` is advanced
        in place and returned, an official state list is read into a new `State`."""
        if state is not None and not isinstance(state, State):
            state = State.from_list(self._model, [_as_float32(t) for t in state])
        # The official package takes one token as an int, several as a list.
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self._model.forward(tokens, state, full_output)

    __call__ = forward
