"""The update split over threads is bitwise the one-thread update: parameters, optimizer state,
the reported norm, the parts' products and the update ratios, for every optimizer and dtype."""

import threading

import numpy as np
import pytest

from gradserve_services.optim import OPTIMIZER_NAMES, Optimizer
from gradserve_services.optim.blocks import BLOCK_ELEMENTS, block_count, parameter_blocks
from gradserve_services.optim import parallel

# sizes straddling block edges (the loop is split from any size here: see `_run`)
SHAPES = {"a.weight": (300, 500), "a.bias": (500,), "b.weight": (3, BLOCK_ELEMENTS + 7),
          "c.weight": (BLOCK_ELEMENTS,)}


def _setup(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}
    parts = [{name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}
             for _ in range(3)]
    return params, parts


def _run(name, dtype, threads, monkeypatch, steps=3, **config):
    monkeypatch.setenv("GRADSERVE_APPLY_THREADS", str(threads))
    monkeypatch.setattr(parallel, "PARALLEL_MIN_ELEMENTS", 0)
    params, parts = _setup(dtype)
    optimizer = Optimizer({"name": name, "lr": 0.01, "weight_decay": 0.01, **config}, params)
    reports = []
    for _ in range(steps):
        ratios, products = {}, {}
        info = optimizer.step(params, parts, grad_scale=1 / 96, update_ratios=ratios, products=products)
        reports.append((info, ratios, products))
    return params, optimizer.state, reports


def test_the_walk_is_split_over_threads(monkeypatch):
    runs = []  # (thread, first block, stop)
    run = parallel._update_run

    def recording(config, params, grad_parts, state, plan, first, stop, *flags):
        runs.append((threading.get_ident(), first, stop))
        return run(config, params, grad_parts, state, plan, first, stop, *flags)

    monkeypatch.setattr(parallel, "_update_run", recording)
    _run("sgd", "float32", 3, monkeypatch, steps=1)
    spans = sorted((first, stop) for _, first, stop in runs)
    assert len(spans) == 3 and spans[0][0] == 0 and spans[-1][1] == block_count(_setup("float32")[0])
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous runs cover the walk
    assert {thread for thread, _, _ in runs} - {threading.get_ident()}  # some ran on another thread
    assert parallel.PARALLEL_MIN_ELEMENTS <= 1 << 20  # the 784-1024-1024-10 MLP (1.8M) is split


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_threads_give_the_one_thread_result_bitwise(name, dtype, monkeypatch):
    one = _run(name, dtype, 1, monkeypatch)
    for threads in (2, 3):
        many = _run(name, dtype, threads, monkeypatch)
        for key in SHAPES:
            assert np.array_equal(one[0][key], many[0][key])
            for slot, value in one[1][key].items():
                assert np.array_equal(value, many[1][key][slot])
        assert one[2] == many[2]  # norms, lr, products and ratios: the same floats


def test_clipped_updates_agree_too(monkeypatch):
    one = _run("adam", "float64", 1, monkeypatch, clip_norm=0.5)
    many = _run("adam", "float64", 2, monkeypatch, clip_norm=0.5)
    assert all(np.array_equal(one[0][key], many[0][key]) for key in SHAPES) and one[2] == many[2]


def test_a_run_of_blocks_is_that_part_of_the_whole_walk():
    params, parts = _setup("float32")
    state = {name: {} for name in params}
    whole = [(name, grad.copy()) for name, _, grad, _, _ in parameter_blocks(params, parts, state)]
    assert len(whole) == block_count(params)
    cuts = [0, 5, 6, 40, len(whole)]
    pieces = [(name, grad.copy()) for first, stop in zip(cuts, cuts[1:])
              for name, _, grad, _, _ in parameter_blocks(params, parts, state, first=first, stop=stop)]
    assert [name for name, _ in pieces] == [name for name, _ in whole]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(whole, pieces))
