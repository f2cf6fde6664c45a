"""The two backends, and the one Ray cluster of the test session.

``backend`` runs a test once on each backend (tests/integration/runs.py). The cluster starts with
the first test that needs it and stops when the session ends: a head started by ``ray.init`` in
this process (its GCS server and raylet are subprocesses that share this process's fate, so a
killed test session leaves no cluster behind, and stopping it ends only what it started), with its
temp files and logs under the session's pytest temp dir, 4 logical CPUs (the largest layout the
tests place: a trainer and two engines) and token authentication (the token is in this process's
environment, inherited by every launcher it starts). Each run is a real ``python -m runtime.launch
--backend ray --ray-address ...`` connecting to it, so a test that kills an actor by name from this
process does what an operator would.
"""

from __future__ import annotations

import logging
import shutil

import pytest

from tests.integration.runs import CLUSTER_CPUS, Backend, assert_ray_released


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory):
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray: pip install -e '.[ray]'")
    from runtime import backend_ray

    base = tmp_path_factory.mktemp("cluster")
    temp = backend_ray.temp_dir(base)  # <base>/ray, or a short /tmp directory linked from there
    with pytest.MonkeyPatch.context() as env:
        env.delenv("RAY_ADDRESS", raising=False)  # ray.init would join that cluster instead of starting one
        address = backend_ray.start_local_cluster(temp, num_cpus=CLUSTER_CPUS, namespace=backend_ray.NAMESPACE,
                                                  logging_level=logging.WARNING,
                                                  runtime_env=backend_ray.runtime_env())
    yield address
    ray.shutdown()
    if not temp.is_relative_to(base):
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(params=["local", "ray"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend("local") if request.param == "local" else request.getfixturevalue("ray_backend")


@pytest.fixture
def ray_backend(ray_address: str):
    yield Backend("ray", ray_address)
    assert_ray_released()


