"""Training over a real slow link: two Ray worker nodes, each in a network namespace of its own
behind a tc token bucket (bench/links_site.py over tests/support/netns.py), the coordinator and
the parameter servers on this machine. Sync and local rounds both train the same task; what the
links carried (their interface counters) shows local rounds moving parameters and deltas once a
round, the batches' rows every step; the namespaces are gone afterwards. Skipped, with the reason,
where namespaces cannot be made."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve import mlp
from gradserve_services.bench.links_site import SiteUnavailable, far_site, harness
from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.cluster.config import OUTER_OPTIMIZER
from gradserve_services.engine import Model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = mlp(32, [256], 4)  # 9,476 parameters: 37 KB a copy
ROWS, H, ROUNDS = 64, 8, 3  # samples per inner step, inner steps per round, rounds
RATE_MBIT = 20.0


def _batches(count, seed=0):
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((32, 4))
    out = []
    for _ in range(count):
        x = rng.standard_normal((ROWS, 32)).astype(np.float32)
        out.append((x, np.argmax(x @ teacher, axis=1).astype(np.int64)))
    return out


def _train(executor, site, config, steps):
    params = Model(SPEC).init_parameters(seed=0, dtype="float32")
    trainer = executor.create_trainer(config, params)
    try:
        before = site.link_bytes()
        results = [trainer.step(index, *batch) for index, batch in enumerate(steps)]
        return results, site.link_bytes() - before, trainer.parameters()[1]
    finally:
        trainer.close()


def test_sync_and_local_rounds_over_shaped_links():
    netns, _ = harness()
    others = set(netns.namespace_names())
    try:
        with far_site(workers=2, rate_mbit=RATE_MBIT) as site:
            made = set(netns.namespace_names()) - others
            executor = RayExecutor(address=site.address, num_workers=2)
            try:
                inner = _batches(H * ROUNDS)
                sync, sync_link, _ = _train(
                    executor, site, TrainerConfig(SPEC, {"name": "adamw", "lr": 0.01}, num_workers=2),
                    inner)
                rounds = [(np.concatenate([x for x, _ in inner[r * H:(r + 1) * H]]),
                           np.concatenate([y for _, y in inner[r * H:(r + 1) * H]])) for r in range(ROUNDS)]
                local, local_link, params = _train(
                    executor, site,
                    TrainerConfig(SPEC, OUTER_OPTIMIZER, consistency="local", local_steps=H,
                                  inner_optimizer={"name": "adamw", "lr": 0.01}, num_workers=2),
                    rounds)
            finally:
                executor.shutdown()
    except SiteUnavailable as reason:
        pytest.skip(str(reason))
    assert len(made) == 2 and not made & set(netns.namespace_names())  # removed after
    assert [r.version for r in local] == [1, 2, 3] and local[-1].loss < local[0].loss
    assert all(np.isfinite(value).all() for value in params.values())
    samples = ROWS * H * ROUNDS
    assert sum(r.samples for r in sync) == sum(r.samples for r in local) == samples
    # sync: parameters down and a gradient up per worker and step; local: once per round
    assert sum(r.bytes_compressed for r in local) * H == sum(r.bytes_compressed for r in sync)
    params_bytes = 9476 * 4
    assert sync_link > 2 * 2 * params_bytes * H * ROUNDS  # both workers, both ways, every step
    assert local_link < sync_link / 2
