"""The micro-batch driver and optimizer of the Megatron trainer: megatron's on GPU, torch's on CPU.

``forward_backward(micro_batches, forward, loss)`` runs every micro-batch's forward, ``loss`` on
the last pipeline stage, and backward, accumulating gradients; it returns each micro-batch's
partial sums (the dicts ``loss`` returns). ``step()`` clips and applies the gradients and returns
the gradient norm.

GPU: megatron's ``DistributedDataParallel`` + distributed optimizer + ``get_forward_backward_func``.
Two scalings of megatron's are undone, because our loss is already the whole step's per-token mean
(each micro-batch returns its sum / the step's token count): the schedule divides each
micro-batch's loss by the number of micro-batches, and DDP averages gradients over data-parallel
ranks; the loss handed to backward is multiplied by both counts, so the gradient is the sum.

CPU (megatron's DDP buffers, optimizer and schedules allocate on CUDA): the plain loop and
``torch.optim.AdamW`` (decoupled weight decay on every parameter, as the HF learner), with one
all-reduce of the gradients over data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronOptim:
    def __init__(self, model: torch.nn.Module, optim, *, on_gpu: bool):
        self.on_gpu, self.clip_grad = on_gpu, optim.clip_grad
        if on_gpu:
            self.module, self.optimizer = _megatron_ddp_and_optimizer(model, optim)
        else:
            self.module = model
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                                               betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)

    def forward_backward(self, micro_batches: list, forward: Callable, loss: Callable) -> list[dict]:
        if self.on_gpu:
            return self._megatron_schedule(micro_batches, forward, loss)
        self.optimizer.zero_grad(set_to_none=False)
        parts = []
        for mb in micro_batches:
            value, part = loss(mb, forward(self.module, mb) if mb is not None else _zero(self.module))
            value.backward()
            parts.append(part)
        if ps.get_data_parallel_world_size() > 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
        if ps.get_tensor_model_parallel_world_size() > 1:
            # q/k layernorms are replicated but each TP rank normalises only its own heads: their
            # gradients are partial sums (megatron's finalize_model_grads sums them on GPU)
            for name, p in self.module.named_parameters():
                if p.grad is not None and ("q_layernorm" in name or "k_layernorm" in name):
                    dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        return parts

    def _megatron_schedule(self, micro_batches: list, forward: Callable, loss: Callable) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()
        scale = len(micro_batches) * ps.get_data_parallel_world_size(with_context_parallel=True)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            # an empty micro-batch (padding of the plan) still runs a pass so collectives pair up
            out = forward(model, mb) if mb is not None else _zero(model)

            def loss_func(output):
                value, part = loss(mb, output)
                return value * scale, part

            return out, loss_func

        first = next((mb for mb in micro_batches if mb is not None), None)
        seq = first.input_ids.shape[1] if first is not None else 1
        parts = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.module],
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=1, forward_only=False)
        return list(parts or [])

    def step(self) -> float:
        if self.on_gpu:
            _, grad_norm, _ = self.optimizer.step()
            return float(grad_norm or 0.0)
        grad_norm = _clip_model_parallel(list(self.module.parameters()), self.clip_grad)
        self.optimizer.step()
        return grad_norm


def _clip_model_parallel(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over the whole model when its weights are split among TP ranks: a TP
    shard counts on its rank, a replicated weight (a norm) once (megatron's duplicate rule), the
    squares summed over the model-parallel group; then every rank scales by the same factor."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    grads = [p.grad for p in params if p.grad is not None]
    owned = [p.grad for p in params if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    sq = torch.zeros((), dtype=torch.float64)
    for g in owned:
        sq += g.detach().double().pow(2).sum()
    if ps.get_model_parallel_group() is not None and dist.get_world_size(ps.get_model_parallel_group()) > 1:
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def _zero(model: torch.nn.Module) -> torch.Tensor:
    """A pass that contributes nothing: a zero tied to every parameter's graph is not needed,
    only a tensor the loss can sum (gradients of an empty micro-batch are zero)."""
    return next(model.parameters()).sum() * 0.0


def _megatron_ddp_and_optimizer(model: torch.nn.Module, optim):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=True))
    model.config.finalize_model_grads_func = finalize_model_grads  # DP reduce, PP tied-embedding sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                        clip_grad=optim.clip_grad if optim.clip_grad > 0 else 0.0, bf16=False, fp16=False,
                        params_dtype=torch.float32, use_distributed_optimizer=True),
        [ddp])
    return ddp, optimizer
