"""One rank of a multi-rank Megatron trainer on CPU (gloo), for test_megatron_trainer.py:

    python tests/policies/megatron_rank.py MODEL OUT RANK WORLD DIST_URL TP

Trains one step on test_megatron_trainer's batch, then rank 0 writes the step's figures
(OUT/stats.json) and the HF export of the updated weights (OUT/model). Every rank takes part in
the export (its TP shards are gathered)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgspec  # noqa: E402

from policies.megatron.model import Parallelism  # noqa: E402
from tests.policies.test_megatron_trainer import batch, megatron  # noqa: E402


def main() -> None:
    model, out, rank, world, url, tp = sys.argv[1:7]
    trainer = megatron(Path(model), rank=int(rank), world_size=int(world), dist_url=url, max_tokens_per_gpu=12,
                       parallelism=Parallelism(tensor_model_parallel_size=int(tp)))
    stats = trainer.step(batch(version_of_second=1), 2)
    trainer.save_weights(Path(out) / "model")
    if rank == "0":
        (Path(out) / "stats.json").write_bytes(msgspec.json.encode(stats))
    trainer.close()


if __name__ == "__main__":
    main()
