"""The tokenizers and the sampler against the official package's cases."""

import json

import numpy as np
import pytest
import rwkv_rs
from conftest import FIXTURES, ROOT


def test_world_tokenizer_cases():
    cases = json.loads((FIXTURES / "tokenizer" / "cases.json").read_text())
    tok = rwkv_rs.Tokenizer("world")
    for case in cases["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]
    for case in cases["decode_cases"]:
        assert tok.decode_bytes(case["ids"]).hex() == case["bytes_hex"]
        assert tok.decode(case["ids"]) == case["text"]


def test_world_vocab_file_is_the_same_tokenizer():
    a = rwkv_rs.Tokenizer("world")
    b = rwkv_rs.Tokenizer(str(ROOT / "assets" / "world_vocab.txt"))
    text = "Hello, 世界! The quick brown fox.\n\n"
    assert a.encode(text) == b.encode(text)


def test_bytes_tokenizer():
    tok = rwkv_rs.Tokenizer("bytes")
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode([104, 195]) == "\ufffd"
    assert tok.vocab_size == 256
    assert rwkv_rs.Tokenizer.for_vocab(256).name == "bytes"


def test_distribution_cases():
    cases = json.loads((FIXTURES / "sampling" / "cases.json").read_text())["cases"]
    for n, case in enumerate(cases):
        logits = np.array(case["logits"], dtype=np.float32)
        got = rwkv_rs.distribution(logits, case["temperature"], case["top_p"], case["top_k"])
        assert abs(float(got.sum()) - 1.0) < 1e-5
        support = [i for i, p in enumerate(got) if p > 0]
        if case["top_k_boundary_tie"]:
            assert len(support) == len(case["support"]), n
        else:
            assert support == case["support"], n
            np.testing.assert_allclose(got, case["probs"], atol=1e-6, err_msg=str(n))


def test_sampler_is_seeded_and_penalised():
    logits = np.array([0.0, 5.0, 4.9, -1.0], dtype=np.float32)
    draws = lambda seed: [rwkv_rs.Sampler(4, seed=seed, top_p=1.0).sample(logits) for _ in range(1)]
    assert draws(1) == draws(1)
    s = rwkv_rs.Sampler(4, temperature=0.0, presence_penalty=1.0)
    assert s.sample(logits) == 1
    s.accept(1)
    assert s.sample(logits) == 2, "the presence penalty moves greedy off token 1"
    s.reset()
    assert s.sample(logits) == 1
    assert rwkv_rs.Sampler(4, banned=[1], temperature=0.0).sample(logits) == 2
    assert logits[1] == 5.0, "sample does not modify its input"
