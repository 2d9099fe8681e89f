"""Large tensors travel as 1 MiB chunks under the 8 MiB message limit, both ways."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve import mlp
from gradserve.transfer import MAX_MESSAGE_BYTES

BIG_SPEC = mlp(4096, [4096], 16)  # 16.8M float32 parameters: 67 MB


@pytest.mark.slow
def test_big_model_create_pull_and_gradients(client, executor):
    rng = np.random.default_rng(0)
    params = {
        "fc1.weight": rng.standard_normal((4096, 4096), dtype=np.float32) * 0.01,
        "fc1.bias": np.zeros(4096, np.float32),
        "logits.weight": rng.standard_normal((4096, 16), dtype=np.float32) * 0.01,
        "logits.bias": np.zeros(16, np.float32),
    }
    assert sum(p.nbytes for p in params.values()) > 8 * MAX_MESSAGE_BYTES
    session = client.create_session(BIG_SPEC, params, num_workers=1)
    try:
        version, pulled = client.pull_parameters(session)
        assert version == 0
        for name, value in params.items():
            np.testing.assert_array_equal(pulled[name], value)
        x = rng.standard_normal((4, 4096), dtype=np.float32)
        y = np.arange(4) % 16
        remote = client.compute_gradients(BIG_SPEC, params, x, y)
        local = executor.compute_gradients(BIG_SPEC, params, x, y)
        for name, gradient in local["grads"].items():
            np.testing.assert_array_equal(remote.gradients[name], gradient)
    finally:
        client.close_session(session)


def test_large_batch_is_chunked(client, executor):
    spec = mlp(1024, [8], 4)
    rng = np.random.default_rng(1)
    from gradserve_services.engine import Model

    params = Model(spec).init_parameters(seed=0)
    x = rng.standard_normal((3000, 1024)).astype(np.float32)  # 12 MB: above the message limit
    y = np.arange(3000) % 4
    remote = client.compute_gradients(spec, params, x, y)
    assert remote.count == 3000
    assert remote.loss == executor.compute_gradients(spec, params, x, y)["loss"]
