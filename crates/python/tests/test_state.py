"""States: forks, files, the official list layout."""

import copy

import numpy as np
import pytest
import rwkv_rs
from conftest import FIXTURES


@pytest.fixture(scope="module")
def model():
    return rwkv_rs.Model(FIXTURES / "v7" / "model.safetensors")


def test_fork_is_independent(model):
    _, state = model.forward([1, 2, 3], None)
    for fork in (state.copy(), copy.copy(state), copy.deepcopy(state)):
        a, _ = model.forward([4, 5], fork)
        b, _ = model.forward([4, 5], state.copy())
        np.testing.assert_array_equal(a, b)
    before = state.to_list()
    model.forward([9], state.copy())
    for x, y in zip(before, state.to_list()):
        np.testing.assert_array_equal(x, y)


def test_save_and_load(model, tmp_path):
    _, state = model.forward([7, 8, 9], None)
    path = tmp_path / "s.safetensors"
    state.save(path)
    loaded = rwkv_rs.State.load(path, model)
    for x, y in zip(state.to_list(), loaded.to_list()):
        np.testing.assert_array_equal(x, y)
    other = rwkv_rs.Model(FIXTURES / "v4" / "model.safetensors")
    with pytest.raises(ValueError, match="v7"):
        rwkv_rs.State.load(path, other)


def test_official_list_layout(model):
    _, state = model.forward([7, 8, 9], None)
    tensors = state.to_list()
    assert [t.shape for t in tensors] == [(128,), (2, 64, 64), (128,)] * 2
    assert all(t.dtype == np.float32 for t in tensors)
    back = rwkv_rs.State.from_list(model, tensors)
    a, _ = model.forward([1], back)
    b, _ = model.forward([1], state)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="entry 1 has shape"):
        rwkv_rs.State.from_list(model, [tensors[0], tensors[0]] + tensors[2:])
    with pytest.raises(ValueError, match="has 5 tensors"):
        rwkv_rs.State.from_list(model, tensors[:5])


def test_state_size_is_constant(model):
    fresh = model.new_state()
    _, state = model.forward(list(range(1, 300)) * 3, None)
    assert state.nbytes == fresh.nbytes == 2 * (128 + 2 * 64 * 64 + 128) * 4
    assert len(state) == 6 and state.generation == "v7"


def test_same_state_twice_in_a_batch(model):
    state = model.new_state()
    with pytest.raises(ValueError, match=r"states\[1\]"):
        model.forward_batch([[1], [2]], [state, state])


def test_the_gil_is_released_while_computing(model):
    """Another Python thread runs while `forward` computes."""
    import threading
    import time

    tokens = list(range(1, 300)) * 60
    ticks, window, done = [], [], threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.01)
    start = time.perf_counter()
    model.forward(tokens, None)
    window = (start, time.perf_counter())
    done.set()
    t.join()
    inside = sum(window[0] < x < window[1] for x in ticks)
    assert inside > 100, f"the other thread ran {inside} times during forward"
