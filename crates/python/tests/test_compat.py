"""Code written for the official package runs unchanged on `rwkv_rs` and gives its text."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BUILT_IN, FIXTURES, ROOT, fixture
from rwkv_rs.model import RWKV, strategy_format
from rwkv_rs.utils import PIPELINE, PIPELINE_ARGS

HERE = Path(__file__).resolve().parent
TOKENIZER = ROOT / "tests" / "fixtures" / "python" / "bytes-tokenizer.json"


def test_chatrwkv_style_script_gives_the_official_text(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, str(HERE / "chatrwkv_style.py"), "rwkv_rs", str(BUILT_IN),
         str(TOKENIZER), str(out)],
        check=True,
    )
    want = (ROOT / "tests" / "fixtures" / "python" / "chatrwkv-official.json").read_text()
    got = out.read_text()
    if got != want:
        got, want = json.loads(got), json.loads(want)
        for key in want:
            assert got[key] == want[key], key
    assert got == want


def test_model_name_without_suffix_and_args(tmp_path):
    link = tmp_path / "fixture.pth"
    link.symlink_to(FIXTURES / "v7" / "model.pth")
    model = RWKV(model=str(tmp_path / "fixture"), strategy="cpu fp32", verbose=False)
    assert model.version == 7
    assert (model.args.n_layer, model.args.n_embd, model.args.vocab_size) == (2, 128, 300)
    assert model.args.MODEL_NAME.endswith("fixture.pth")


def test_official_state_list_is_accepted(generation):
    meta, exp = fixture(generation)
    tokens, k = meta["sequences"]["seq0"]["tokens"], meta["sequences"]["seq0"]["split_at"]
    model = RWKV(model=str(FIXTURES / generation / "model.pth"), strategy="cpu fp32",
                 verbose=False)
    n = len(model.native.new_state())
    official_state = [exp[f"seq0.split.state_a.{j}"] for j in range(n)]
    out, state = model.forward(tokens[k:], official_state, full_output=True)
    np.testing.assert_allclose(out, exp["seq0.split.logits_b"], atol=1e-3, rtol=1e-4)
    for j, t in enumerate(state.to_list()):
        np.testing.assert_allclose(t, exp[f"seq0.split.state_b.{j}"], atol=1e-3, rtol=1e-4)


def test_strategies():
    assert strategy_format("cpu fp32") is None, "as stored: bf16 and f16 widen exactly"
    assert strategy_format("cpu bf16") == "bf16"
    assert strategy_format("cpu fp32i8 *10 -> cpu fp32") == "int8"
    for bad in ["cuda fp16", "cpu", "cpu fp8", ""]:
        with pytest.raises(ValueError):
            strategy_format(bad)


def test_pipeline_world_tokenizer_and_seeded_sampling():
    model = RWKV(model=str(BUILT_IN), strategy="cpu fp32", verbose=False)
    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
    assert pipeline.encode("Hello world") == [33155, 40213]
    assert pipeline.decode([33155, 40213]) == "Hello world"
    pipeline = PIPELINE(model, "bytes")
    runs = []
    for _ in range(2):
        np.random.seed(7)
        runs.append(pipeline.generate("ROMEO:", token_count=40, args=PIPELINE_ARGS()))
    assert runs[0] == runs[1] and len(runs[0]) > 0
    out, state = model.forward(pipeline.encode("ROMEO:"), None)
    kept = copy.deepcopy(state)
    a, _ = model.forward([10], state)
    b, _ = model.forward([10], kept)
    np.testing.assert_array_equal(a, b)


def test_tokens_as_int_list_or_array():
    model = RWKV(model=str(FIXTURES / "v7" / "model.pth"), strategy="cpu fp32", verbose=False)
    a, _ = model.forward(5, None)
    b, _ = model.forward([5], None)
    c, _ = model.forward(np.array([5], dtype=np.int64), None)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(TypeError):
        model.forward("5", None)
