"""``MegatronTrainer``: the policy trainer of ``--train-backend megatron``, with ``PolicyTrainer``'s
methods (step, weight transports, HF export, checkpoints) over a Megatron-core ``GPTModel``.

One step, the same objective as the HF learner (``policies.loss``, ``policies.correction``): GRPO
advantages per group; the batch split into micro-batches (``--max-tokens-per-gpu`` budget, else
``--micro-batch-size`` samples), each right-padded; per-token log-probs and entropies from the
chunked vocab-parallel head (``logprobs``); PPO-clip against the detached log-probs (one step per
batch: proximal = current), times the bounded decoupled weight with ``--use-tis``, plus KL and
entropy terms. Every term is summed over trained tokens and divided by the WHOLE step's trained
token count, so gradients accumulated over micro-batches (and data-parallel ranks) are those of
the whole batch at once, whatever the split.

Two drivers of the micro-batches, because megatron's DDP, distributed optimizer and pipeline
schedules allocate on CUDA unconditionally:
- GPU: megatron's ``DistributedDataParallel`` (fp32 grad buffers), its distributed optimizer (Adam,
  sharded over data-parallel ranks), its forward/backward schedule (``get_forward_backward_func``:
  1F1B under pipeline parallelism), bf16 autocast over fp32 master weights as the HF learner.
- CPU: the same model, loss and data; a plain loop of forward/backward and torch's AdamW, gradients
  summed over data-parallel ranks with one all-reduce. Tensor parallelism works as on GPU (gloo).
  What the CPU cannot run: pipeline parallelism and activation recompute (refused, one line).

Data parallelism: every rank receives the whole batch and computes the same plan; DP rank r trains
micro-batches r, r + dp, ... (the plan is padded to a multiple of dp with empty ones, which run as
zero-weight passes so collectives pair up).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from megatron.core import parallel_state as ps

from buffers.types import Group
from policies import weight_sync
from policies.advantages import grpo_advantages
from policies.correction import bucket_stats
from policies.lr_schedule import LrSchedule
from policies.megatron import checkpoint, parallel, publish
from policies.megatron.logprobs import DEFAULT_CHUNK_TOKENS, token_logp_entropy
from policies.megatron.model import Parallelism, build, check_supported
from policies.megatron.optim import MegatronOptim
from policies.objective import policy_terms
from policies.trainer import StepStats, TokenBatch, collate


class MegatronTrainer:
    """Keyword arguments as ``PolicyTrainer``'s, plus ``parallelism`` (Miles's TP/PP/CP/EP/SP and
    recompute flags), ``micro_batch_size`` / ``max_tokens_per_gpu`` (the micro-batch rule),
    ``chunk_tokens`` (the output head's chunk), ``dtype`` (of the weights; float32 default) and
    ``rank`` / ``world_size`` / ``dist_url`` (this rank of a multi-rank host: TP x PP x CP x DP)."""

    def __init__(self, model_path: str | Path, *, grpo, optim, temperature: float, pad_id: int, threads: int = 1,
                 device: str = "cpu", version: int = 0, ref_path: str | Path | None = None,
                 parallelism: Parallelism | None = None, micro_batch_size: int | None = None,
                 max_tokens_per_gpu: int | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1, dist_url: str | None = None):
        torch.set_num_threads(threads)
        parallelism = parallelism or Parallelism()
        self.hf_config = transformers.AutoConfig.from_pretrained(str(model_path))
        check_supported(self.hf_config, parallelism)
        on_gpu = device.startswith("cuda")
        if not on_gpu and (parallelism.pipeline_model_parallel_size > 1 or parallelism.recompute_granularity):
            raise ValueError("pipeline parallelism and activation recompute need CUDA (megatron's schedules and "
                             "recompute are CUDA-only)")
        self.grpo, self.pad_id, self.par = grpo, pad_id, parallelism
        self.temperature = temperature if temperature > 0 else 1.0  # greedy engines score plain logits
        self.version, self.dtype, self.chunk_tokens = version, dtype, chunk_tokens
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens_per_gpu
        self._created_group = parallel.init(parallelism, device="cuda" if on_gpu else "cpu", rank=rank,
                                            world_size=world_size, dist_url=dist_url)
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.model = self._load(model_path).train()
        self.ref = self._load(ref_path or model_path).eval() if grpo.use_kl_loss else None
        self.opt = MegatronOptim(self.model, optim, on_gpu=on_gpu)
        self.lr_schedule = LrSchedule(lr=optim.lr, min_lr=optim.min_lr, style=optim.lr_decay_style,
                                      warmup_iters=optim.lr_warmup_iters, decay_iters=optim.lr_decay_iters)
        self.weights = publish.HfWeights(self.model, self.hf_config)  # the bare stage, not DDP
        self._sender: publish.Sender | None = None
        self._weight_store = weight_sync.HostedStore()  # the weight-update group's rendezvous (rank 0)
        self._exporter = None  # weight_ipc.Exporter, from the first ipc sync on

    def _load(self, path: str | Path) -> torch.nn.Module:
        pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        model = build(self.hf_config, self.par, dtype=self.dtype, on_gpu=self.device.type == "cuda",
                      pre_process=stage == 0, post_process=stage == pp - 1)
        checkpoint.load_hf(model, Path(path), self.hf_config)
        if self.device.type == "cuda" and self.par.recompute_granularity:
            autocast_recomputed_layers(model)
        return model

    # -- one step ------------------------------------------------------------------------------
    def step(self, batch: list[Group], version: int) -> StepStats:
        """One optimizer step on ``batch`` at policy ``version`` (dates each token's staleness)."""
        samples, advs = [], []
        for g in batch:
            advs += grpo_advantages(g.rewards, [s.trainable for s in g.samples],
                                    normalize_std=self.grpo.normalize_advantage_std)
            samples += g.samples
        denom = max(sum(sum(s.loss_mask) for s in samples), 1)  # the WHOLE step's trained tokens
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        plan = micro_batches([len(s.prompt_ids) + len(s.response_ids) for s in samples],
                             max_tokens=self.max_tokens, micro_batch_size=self.micro_batch_size, world_size=dp)
        mine = [collate([samples[i] for i in idx], [advs[i] for i in idx], self.pad_id, version=version)
                if idx else None for idx in plan[rank::dp]]
        lr = self.lr_schedule.apply(self.opt.optimizer, version)
        parts = self.opt.forward_backward(mine, self._forward, lambda tb, out: self._loss(tb, out, denom))
        grad_norm = self.opt.step()
        self.version = version + 1
        return _stats(parts, grad_norm=grad_norm, lr=lr, n_samples=len(samples))

    def _forward(self, model: torch.nn.Module, tb: TokenBatch) -> torch.Tensor:
        ids = tb.input_ids.to(self.device)
        pos = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return model(input_ids=ids, position_ids=pos, attention_mask=None)

    def _logp(self, model: torch.nn.Module, tb: TokenBatch, hidden: torch.Tensor):
        ids = tb.input_ids.to(self.device)
        targets = torch.nn.functional.pad(ids[:, 1:], (0, 1))  # position j scores token j + 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            lp, ent = token_logp_entropy(hidden, _unwrap(model).output_weight(), targets,
                                         temperature=self.temperature, sequence_parallel=self.par.sequence_parallel,
                                         chunk_tokens=self.chunk_tokens)
        return lp[:, :-1], ent[:, :-1]

    def _loss(self, tb: TokenBatch | None, hidden: torch.Tensor, denom: int) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the step's loss (sum over its trained tokens / ``denom``)
        and its partial sums for the step's figures. ``tb`` None: an empty pass (weight 0)."""
        if tb is None:
            return hidden.sum() * 0.0, {}
        tb = tb.to(self.device)
        logp, entropy = self._logp(self.model, tb, hidden)
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp, _ = self._logp(self.ref, tb, self._forward(self.ref, tb))
        t = policy_terms(self.grpo, logp, entropy, tb, ref_logp=ref_logp)
        kl = torch.zeros_like(logp) if t.kl is None else t.kl.detach()
        m = tb.mask
        loss = (t.per_token * m).sum() / denom
        on = m > 0
        sums = {"loss": loss.detach(), "clipped": (t.clipped * m).sum(), "w": (t.weight * m).sum(),
                "bounded": (t.bounded * m).sum(), "kl": (kl * m).sum(),
                "entropy": (entropy.detach() * m).sum(), "tokens": m.sum(),
                "tok_w": t.weight[on].detach(), "tok_bounded": t.bounded[on], "tok_stale": tb.staleness[on]}
        return loss, sums

    # -- weights out ---------------------------------------------------------------------------
    def weight_group_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]:
        return self._weight_store.endpoint(host)  # a store already listening (weight_sync.HostedStore)

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, backend: str,
                          group_name: str, timeout_s: float, dtype: str, bucket_bytes: int) -> list[bytes]:
        """Rank 0 joins the engines' group; every rank holds a ``Sender`` (its gathers are
        collectives). Returns the bucket plan, msgpack-encoded, as ``PolicyTrainer``."""
        import msgspec

        self.destroy_weight_group()
        pg = weight_sync.new_group(backend=backend, master_address=master_address, master_port=master_port,
                                   rank=0, world_size=world_size, group_name=group_name, timeout_s=timeout_s,
                                   store=self._weight_store.take(master_port)) if torch.distributed.get_rank() == 0 \
            else None
        self._sender = publish.Sender(pg, self.weights, dtype=weight_sync.dtype_of(dtype), bucket_bytes=bucket_bytes)
        return [msgspec.msgpack.encode(m) for m in self._sender.plan]

    def broadcast_weights(self) -> int:
        if self._sender is None:
            raise RuntimeError("broadcast_weights before init_weight_group")
        self._sender.send()
        return self.version

    def destroy_weight_group(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def ipc_weights(self, dtype: str) -> bytes:
        """The same-GPU transport: one flat bucket of the HF tensors (``weight_ipc``), the buffer this
        trainer's for life (the engines keep its handle), refilled from freshly gathered tensors."""
        import msgspec

        from policies import weight_ipc
        tensors = list(self.weights.tensors())
        if self._exporter is None or self._exporter.meta.dtypes[0] != dtype:
            self._exporter = weight_ipc.Exporter(tensors, dtype=weight_sync.dtype_of(dtype))
        else:
            self._exporter.retarget(tensors)
        export = weight_ipc.Export(self.version, self._exporter.meta, self._exporter.serialize())
        return msgspec.msgpack.encode(export)

    # -- files ---------------------------------------------------------------------------------
    def save_weights(self, out_dir: Path) -> Path:
        """HF safetensors (+ config.json) that engines and transformers load."""
        return checkpoint.save_hf(self.weights, self.hf_config, out_dir)

    def save_checkpoint(self, out_dir: Path) -> None:
        checkpoint.save(self, out_dir)

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        checkpoint.load(self, ckpt_dir)

    def close(self) -> None:
        self.destroy_weight_group()
        parallel.destroy(self._created_group)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def micro_batches(lengths: list[int], *, max_tokens: int | None, micro_batch_size: int | None,
                  world_size: int) -> list[list[int]]:
    """Sample indices per micro-batch: longest first into the lightest micro-batch with room (a
    token budget, or a sample count), as few as the rule allows, padded with empty ones to a
    multiple of ``world_size``. Padded rows cost what their longest sample costs, so similar
    lengths share a micro-batch: order by length, fill greedily."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    width = 0  # the current bin's padded width
    for i in order:
        fits = bins and (max_tokens is None or width * (len(bins[-1]) + 1) <= max_tokens) \
            and (micro_batch_size is None or max_tokens is not None or len(bins[-1]) < micro_batch_size)
        if fits:
            bins[-1].append(i)
        else:
            bins.append([i])
            width = lengths[i]
    bins += [[] for _ in range(-len(bins) % world_size)]
    return [sorted(b) for b in bins]


def _stats(parts: list[dict], *, grad_norm: float, lr: float, n_samples: int) -> StepStats:
    parts = [p for p in parts if p]
    total = {k: sum(float(p[k]) for p in parts) for k in ("loss", "clipped", "w", "bounded", "kl", "entropy",
                                                          "tokens")}
    total = parallel.sum_over_data_parallel(total)
    n = max(total["tokens"], 1.0)
    tokens = {k: torch.cat([p[k].detach().double().cpu() for p in parts]) if parts else torch.zeros(0)
              for k in ("tok_w", "tok_bounded", "tok_stale")}
    correction = bucket_stats(tokens["tok_w"], tokens["tok_bounded"].bool(), tokens["tok_stale"].long(),
                              torch.ones_like(tokens["tok_w"])) if parts else {}
    return StepStats(loss=total["loss"], pg_clipfrac=total["clipped"] / n, tis_mean=total["w"] / n,
                     tis_clipfrac=total["bounded"] / n, kl=total["kl"] / n, entropy=total["entropy"] / n,
                     grad_norm=grad_norm, n_tokens=int(total["tokens"]), n_samples=n_samples, lr=lr,
                     correction=correction)


def autocast_recomputed_layers(model: torch.nn.Module) -> None:
    """Each decoder layer (and its core attention) enters bf16 autocast itself.

    Why: megatron's activation recompute reruns layers in backward, on autograd's own thread, where
    the step's autocast context (thread-local) is gone, and its CheckpointFunction does not restore
    it as torch.utils.checkpoint does: the rerun multiplied bf16 activations by the fp32 master
    weights and failed (measured on the lent H200). Entering autocast again inside the forward
    changes nothing when it is already on, so the recomputed values equal the first ones."""
    for layer in _unwrap(model).decoder.layers:
        layer.forward = torch.autocast("cuda", dtype=torch.bfloat16)(layer.forward)
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if core is not None:
            core.forward = torch.autocast("cuda", dtype=torch.bfloat16)(core.forward)
