"""Placement: what the learner and each engine take from the cluster, as placement-group bundles.

Miles's flags say how many GPUs: ``--actor-num-nodes`` x ``--actor-num-gpus-per-node`` for the
learner (one data-parallel rank per GPU; on CPU ``--actor-num-cpu-ranks`` ranks), ``--rollout-num-gpus``
for all engines at ``--rollout-num-gpus-per-engine`` each, and ``--colocate`` to put the engines on
the learner's GPUs. Two layouts, with R learner ranks:

    disaggregated (default)    bundle r < R: learner rank r      bundle R+i: engine i
                               separate resources; generation and training run at the same time;
                               a bundle per rank, so Ray gives each rank a whole GPU of its own
    colocated (--colocate)     bundle 0: learner (R = 1) + every engine
                               on a GPU they share it (each takes a fraction of it in Ray's books;
                               the device is the same, time-sliced)

CPU-only: every GPU count is 0 and a bundle holds the CPUs its actors' threads use
(``--learner-threads``, ``--engine-threads``). Pure: no Ray here; ``runtime.backend_ray`` turns
a ``Layout`` into a placement group and checks it against the cluster with ``misfit``.
"""

from __future__ import annotations

import dataclasses

from runtime.config import PlacementConfig

COLOCATED_LEARNER_SHARE = 0.5  # of each shared GPU, in Ray's books; the engines split the rest


@dataclasses.dataclass(frozen=True)
class Seat:
    """Where one actor sits: a bundle of the placement group, and what it takes from that bundle."""

    bundle: int
    num_cpus: float
    num_gpus: float


@dataclasses.dataclass(frozen=True)
class Layout:
    bundles: list[dict[str, float]]  # the placement group's bundles, e.g. {"CPU": 1, "GPU": 1}
    learners: list[Seat]  # rank r's seat
    engines: list[Seat]
    colocated: bool

    @property
    def learner(self) -> Seat:
        """Rank 0's seat (each rank's is the same size)."""
        return self.learners[0]

    @property
    def name(self) -> str:
        return "colocated" if self.colocated else "disaggregated"

    def asks(self) -> dict[str, float]:
        """Resources of every bundle together."""
        total: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0) + v
        return total

    def describe(self) -> str:
        """``learner 1 CPU + 1 GPU, 2 engines x (1 CPU + 1 GPU)``."""
        e, seat = self.engines[0], _amounts(self.learner.num_cpus, self.learner.num_gpus)
        learner = f"{len(self.learners)} x ({seat})" if len(self.learners) > 1 else seat
        return (f"learner {learner}, {len(self.engines)} "
                f"engine{'s' if len(self.engines) > 1 else ''} x ({_amounts(e.num_cpus, e.num_gpus)})")


def plan(p: PlacementConfig, *, num_engines: int, learner_threads: int, engine_threads: int) -> Layout:
    """The layout for ``p`` (already checked by ``runtime.config.check``)."""
    learner_gpus, ranks = p.learner_gpus, p.learner_ranks
    engine_gpus = p.rollout_num_gpus_per_engine if p.rollout_num_gpus else 0
    if not p.colocate:
        per_rank = learner_gpus // ranks
        bundles = [_bundle(learner_threads, per_rank)] * ranks + [_bundle(engine_threads, engine_gpus)] * num_engines
        engines = [Seat(ranks + i, engine_threads, engine_gpus) for i in range(num_engines)]
        learners = [Seat(r, learner_threads, per_rank) for r in range(ranks)]
        return Layout(bundles, learners, engines, colocated=False)
    share = COLOCATED_LEARNER_SHARE if learner_gpus else 0.0
    engine_share = learner_gpus * (1 - share) / num_engines
    bundle = _bundle(learner_threads + num_engines * engine_threads, learner_gpus)
    engines = [Seat(0, engine_threads, engine_share) for _ in range(num_engines)]
    return Layout([bundle], [Seat(0, learner_threads, learner_gpus * share)], engines, colocated=True)


def misfit(layout: Layout, nodes: list[dict[str, float]]) -> str | None:
    """Why ``layout`` cannot be placed on a cluster whose nodes have these total resources, in one
    line saying what was asked and what exists; None when it fits."""
    asked = layout.asks()
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    short = [k for k, v in asked.items() if v > have.get(k, 0.0) + 1e-9]
    unplaceable = [b for b in layout.bundles if not any(_holds(n, b) for n in nodes)]
    if not short and not unplaceable:
        return None
    why = (f"{_amounts(asked.get('CPU', 0), asked.get('GPU', 0))} in all" if short else
           f"a bundle of {_amounts(unplaceable[0].get('CPU', 0), unplaceable[0].get('GPU', 0))} on one node")
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    return (f"the {layout.name} layout ({layout.describe()}) needs {why}; the cluster has "
            f"{_amounts(have['CPU'], have['GPU'])} on {len(nodes)} node{'s' if len(nodes) != 1 else ''} "
            f"(largest: {_amounts(largest.get('CPU', 0), largest.get('GPU', 0))})")


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _amounts(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU + {gpus:g} GPU"
