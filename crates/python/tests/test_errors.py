"""Bad input raises Python exceptions with the command line's one-line messages."""

import subprocess

import pytest
import rwkv_rs
from conftest import FIXTURES, ROOT
from rwkv_rs.model import RWKV
from rwkv_rs.utils import PIPELINE

V7 = FIXTURES / "v7" / "model.safetensors"


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        rwkv_rs.Model(tmp_path / "nope.pth")


def test_truncated_and_foreign_files(tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(V7.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.safetensors"):
        rwkv_rs.Model(cut)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match="notes.pth"):
        rwkv_rs.Model(text)


def test_bad_tokens_and_states():
    model = rwkv_rs.Model(V7)
    with pytest.raises(ValueError, match="token id 300 is out of range"):
        model.forward([1, 300], None)
    with pytest.raises(ValueError, match="token id -1"):
        model.forward([-1], None)
    with pytest.raises(ValueError, match="empty"):
        model.forward([], None)
    v4 = rwkv_rs.Model(FIXTURES / "v4" / "model.safetensors")
    with pytest.raises(ValueError, match="state is for a v4 model"):
        model.forward([1], v4.new_state())
    with pytest.raises(ValueError, match=r"tokens\[1\]: token id 999"):
        model.forward_batch([[1], [999]])


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown weight format 'q9'"):
        rwkv_rs.Model(V7, quant="q9")
    with pytest.raises(ValueError, match="threads"):
        rwkv_rs.Model(V7, threads=0)
    with pytest.raises(ValueError, match="CPU only"):
        RWKV(model=str(V7), strategy="cuda fp16", verbose=False)
    with pytest.raises(ValueError, match="top_p"):
        rwkv_rs.Sampler(300, top_p=2.0)
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer.json"):
        rwkv_rs.Tokenizer("no-such-tokenizer.json")
    with pytest.raises(ValueError, match="cl100k_base"):
        PIPELINE(None, "cl100k_base")


def test_messages_are_the_command_lines(tmp_path):
    """The same one-line message as `rwkv` prints for the same bad file."""
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(V7.read_bytes()[:5000])
    with pytest.raises(ValueError) as err:
        rwkv_rs.Model(cut)
    binary = ROOT / "target" / "debug" / "rwkv"
    if not binary.exists():
        pytest.skip("the rwkv binary is not built")
    run = subprocess.run([str(binary), "info", str(cut)], capture_output=True, text=True)
    assert run.returncode == 2
    assert str(err.value) in run.stderr
