"""RWKV-4 to RWKV-7 on the CPU: the engine of the `rwkv` toolkit, from Python.

The native classes:

- `Model(path, quant=None, threads=None)`: a `.pth` or `.safetensors` checkpoint of any
  generation; `forward(tokens, state=None, full_output=False) -> (logits, state)` and
  `forward_batch(...)`;
- `State`: the recurrent state (copy it to fork; `save`, `load`, `to_list`, `from_list`);
- `Tokenizer("world" | "bytes" | path)`, `Sampler`, `distribution`.

Code written for the official `rwkv` package runs on this engine with its imports changed:
`from rwkv_rs.model import RWKV` and `from rwkv_rs.utils import PIPELINE, PIPELINE_ARGS`.
"""

from ._native import Model, Sampler, State, Tokenizer, __version__, distribution

__all__ = ["Model", "State", "Tokenizer", "Sampler", "distribution", "__version__"]
