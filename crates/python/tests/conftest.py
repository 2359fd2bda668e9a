"""Shared helpers: the repository's fixtures and a reader of their safetensors files."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures"
GENERATIONS = ["v4", "v5_2", "v6_0", "v7"]
BUILT_IN = ROOT / "assets" / "shakespeare-v7.safetensors"

_DTYPES = {"F32": np.float32, "I64": np.int64}


def read_safetensors(path):
    """The tensors of a safetensors file as NumPy arrays (F32 and I64 only: the fixtures')."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(body[a:b], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


def assert_close(got, want, what):
    """The fixtures' tolerance: |got - want| <= 1e-3 + 1e-4 |want| everywhere."""
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    excess = np.abs(got - want) / (1e-3 + 1e-4 * np.abs(want))
    assert excess.max() <= 1.0, f"{what}: {excess.max():.3g} times the tolerance"


@pytest.fixture(params=GENERATIONS)
def generation(request):
    return request.param


def fixture(gen):
    """`(meta, expected tensors)` of a generation's fixture."""
    d = FIXTURES / gen
    return json.loads((d / "meta.json").read_text()), read_safetensors(d / "expected.safetensors")
