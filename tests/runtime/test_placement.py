"""Placement layouts and their checks, without Ray: what each actor asks for, and the one line a
layout that cannot fit the cluster (or the config) fails with."""

import pytest

from runtime import cli
from runtime.config import PlacementConfig
from runtime.placement import Seat, misfit, plan

CPU_NODE = {"CPU": 2.0, "memory": 1e10}
GPU_NODE = {"CPU": 16.0, "GPU": 2.0}


def test_cpu_only_default_gives_each_actor_a_cpu_bundle_of_its_threads():
    layout = plan(PlacementConfig(), num_engines=2, learner_threads=2, engine_threads=1)
    assert layout.bundles == [{"CPU": 2}, {"CPU": 1}, {"CPU": 1}]
    assert layout.learner == Seat(0, 2, 0) and layout.engines == [Seat(1, 1, 0), Seat(2, 1, 0)]
    assert misfit(layout, [{"CPU": 4.0}]) is None


def test_disaggregated_gpus_put_learner_and_each_engine_on_their_own():
    p = PlacementConfig(actor_num_gpus_per_node=1, rollout_num_gpus=1)
    layout = plan(p, num_engines=1, learner_threads=1, engine_threads=1)
    assert layout.bundles == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert layout.learner.num_gpus == 1 and layout.engines[0] == Seat(1, 1, 1)
    assert misfit(layout, [GPU_NODE]) is None


def test_colocated_engines_share_the_learners_gpu_bundle():
    p = PlacementConfig(actor_num_gpus_per_node=1, colocate=True)
    layout = plan(p, num_engines=2, learner_threads=1, engine_threads=1)
    assert layout.bundles == [{"CPU": 3, "GPU": 1}]
    assert layout.learner == Seat(0, 1, 0.5) and layout.engines == [Seat(0, 1, 0.25)] * 2
    assert misfit(layout, [{"CPU": 4.0, "GPU": 1.0}]) is None


def test_data_parallel_ranks_get_a_bundle_each_before_the_engines():
    p = PlacementConfig(actor_num_gpus_per_node=2, rollout_num_gpus=1)
    layout = plan(p, num_engines=1, learner_threads=1, engine_threads=1)
    assert layout.bundles == [{"CPU": 1, "GPU": 1}] * 3
    assert layout.learners == [Seat(0, 1, 1), Seat(1, 1, 1)] and layout.engines == [Seat(2, 1, 1)]
    assert "learner 2 x (1 CPU + 1 GPU)" in layout.describe()
    cpu = plan(PlacementConfig(actor_num_cpu_ranks=3), num_engines=2, learner_threads=2, engine_threads=1)
    assert cpu.learners == [Seat(r, 2, 0) for r in range(3)] and cpu.engines == [Seat(3, 1, 0), Seat(4, 1, 0)]
    assert misfit(cpu, [{"CPU": 7.0}]) is not None and misfit(cpu, [{"CPU": 8.0}]) is None


def test_a_layout_asking_for_missing_gpus_says_what_was_asked_and_what_exists():
    layout = plan(PlacementConfig(actor_num_gpus_per_node=1), num_engines=1, learner_threads=1, engine_threads=1)
    assert misfit(layout, [CPU_NODE]) == (
        "the disaggregated layout (learner 1 CPU + 1 GPU, 1 engine x (1 CPU + 0 GPU)) needs 2 CPU + 1 GPU in "
        "all; the cluster has 2 CPU + 0 GPU on 1 node (largest: 2 CPU + 0 GPU)")


def test_a_bundle_larger_than_any_node_does_not_fit_even_when_the_totals_do():
    p = PlacementConfig(rollout_num_gpus=2, rollout_num_gpus_per_engine=2)
    layout = plan(p, num_engines=1, learner_threads=1, engine_threads=1)
    why = misfit(layout, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert why is not None and "a bundle of 1 CPU + 2 GPU on one node" in why and "on 2 nodes" in why


@pytest.mark.parametrize("argv, flag", [
    (["--actor-num-nodes", "2", "--actor-num-gpus-per-node", "1"], "--actor-num-nodes"),  # local: one host
    (["--backend", "ray", "--actor-num-nodes", "2"], "--actor-num-nodes"),  # CPU ranks: one node
    (["--actor-num-gpus-per-node", "1", "--actor-num-cpu-ranks", "2"], "--actor-num-cpu-ranks"),
    (["--backend", "ray", "--actor-num-gpus-per-node", "2", "--colocate"], "--colocate"),  # one learner rank
    (["--actor-num-cpu-ranks", "2", "--lora-rank", "8"], "--lora-rank"),
    (["--backend", "ray", "--rollout-num-gpus", "3", "--rollout-num-gpus-per-engine", "2"], "--rollout-num-gpus"),
    (["--backend", "ray", "--rollout-num-gpus", "2"], "--rollout-num-gpus"),  # 2 engines, but 1 asked for
    (["--backend", "ray", "--actor-num-gpus-per-node", "1", "--colocate", "--rollout-num-gpus", "2",
      "--rollout-num-engines", "2"], "--colocate"),
    (["--weight-transport", "nccl"], "--weight-transport"),  # NCCL needs GPUs on both sides
    (["--backend", "slurm"], "--backend"),
])
def test_bad_placement_exits_2_with_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.resolve(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def test_miles_placement_flags_parse():
    cfg = cli.resolve(["--backend", "ray", "--ray-address", "10.0.0.1:6379", "--actor-num-gpus-per-node", "1",
                       "--rollout-num-gpus", "2", "--rollout-num-engines", "2", "--rollout-num-gpus-per-engine", "1"])
    assert cfg.run.backend == "ray" and cfg.run.ray_address == "10.0.0.1:6379"
    assert cfg.placement == PlacementConfig(actor_num_gpus_per_node=1, rollout_num_gpus=2)


def test_the_local_backend_numbers_this_hosts_gpus_and_refuses_a_layout_it_cannot_hold():
    from runtime.config import ConfigError
    from runtime.local_hosts import LocalHosts

    def hosts(have, **flags):
        p = PlacementConfig(**flags)
        return LocalHosts(plan(p, num_engines=2, learner_threads=1, engine_threads=1), p, have=have)

    apart = hosts(5, actor_num_gpus_per_node=1, rollout_num_gpus=4, rollout_num_gpus_per_engine=2)
    assert (apart.learner_gpus, apart.engine_gpus) == ([0], [[1, 2], [3, 4]])
    shared = hosts(1, actor_num_gpus_per_node=1, colocate=True)
    assert (shared.learner_gpus, shared.engine_gpus) == ([0], [[0], [0]])
    with pytest.raises(ConfigError, match="needs 3 GPU\\(s\\) on this host; it has 2"):
        hosts(2, actor_num_gpus_per_node=1, rollout_num_gpus=2)
