"""Mixture-of-Experts layer, split into routing, dispatch, expert compute and combine.

Shape legend (suffixes on tensor names):
    B: sequences, S: tokens per sequence, T = B*S: tokens, D: model dim,
    E: experts in the layer, e: experts held by this rank, K: experts per token (top_k),
    N: routed token copies (T*K locally, or whatever arrives from other ranks), H: expert
    hidden dim.

``MoE.forward`` runs four separate callables, so that a disaggregated runtime can put them
on different ranks and a parallel one can swap the dispatcher:
    1. ``router(x_TD, expert_bias_E) -> Routing``            (which experts, what weights)
    2. ``dispatcher.dispatch(x_TD, routing) -> (x_ND, tokens_per_expert_e, state)``
    3. ``experts(x_ND, tokens_per_expert_e) -> y_ND``         (grouped GEMM)
    4. ``dispatcher.combine(y_ND, state) -> y_TD``           (weight and sum per token)
Shared experts run on the un-dispatched tokens and are added at the end. A dispatcher
with ``dispatch_compute_combine(x_TD, routing, experts, shared_experts) -> out_TD``
runs steps 2-4 and the shared experts itself (to overlap communication with compute).

Parameter and buffer names match torchtitan 0.2.2's MoE (``experts.w1``,
``router.gate.weight``, ``shared_experts.w1.weight``, ``expert_bias``), so its state-dict
adapters and checkpoints interoperate. Unlike torchtitan we count tokens with ``bincount``
(``histc`` on integers is not implemented on CPU) and keep fp32 in grouped GEMM when the
inputs are fp32 (parity tests need exact fp32; torchtitan casts to bf16).
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .activation_checkpoint import is_recomputing


@dataclass(kw_only=True)
class MoEArgs:
    num_experts: int = 8
    num_shared_experts: int = 0
    top_k: int = 2
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_norm: bool = True
    """Renormalise the top-k weights of each token to sum to one."""
    route_scale: float = 1.0

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k = {self.top_k} must be in [1, num_experts = {self.num_experts}]")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func = {self.score_func!r}; allowed: ['softmax', 'sigmoid']")


class Routing(NamedTuple):
    """The router's decision for T tokens."""

    weights_TK: torch.Tensor
    """fp32 weight of each chosen expert (after normalisation and scale)."""
    expert_ids_TK: torch.Tensor
    """int64 index of each chosen expert, in [0, E)."""
    probs_TE: torch.Tensor
    """fp32 router probabilities of all experts (for the auxiliary balance loss)."""


def count_tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 histogram of expert ids, shape (num_experts,); works on CPU and GPU."""
    return torch.bincount(expert_ids.reshape(-1), minlength=num_experts)[:num_experts]


class TokenChoiceTopKRouter(nn.Module):
    """Each token picks its top-k experts by router score (plus an optional balance bias)."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.gate = nn.Linear(dim, args.num_experts, bias=False)
        self.num_experts = args.num_experts
        self.top_k = args.top_k
        self.score_func = args.score_func
        self.route_norm = args.route_norm
        self.route_scale = args.route_scale

    def forward(self, x_TD: torch.Tensor, expert_bias_E: torch.Tensor | None = None) -> Routing:
        # Scores in fp32 whatever the activation dtype: routing is sensitive to rounding.
        logits_TE = self.gate(x_TD).float()
        if self.score_func == "softmax":
            probs_TE = F.softmax(logits_TE, dim=-1)
        else:
            probs_TE = torch.sigmoid(logits_TE)
        # The bias only changes which experts are chosen, never the weights (DeepSeek-V3).
        choice_TE = probs_TE if expert_bias_E is None else probs_TE + expert_bias_E
        _, expert_ids_TK = torch.topk(choice_TE, k=self.top_k, dim=-1)
        weights_TK = probs_TE.gather(-1, expert_ids_TK)
        if self.route_norm:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights_TK * self.route_scale, expert_ids_TK, probs_TE)


class _MaterializeGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm`` rejects gradients with zero strides (e.g. from ``out.sum()``).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_supported(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands (else: per-expert loop)."""
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False  # CUDA grouped GEMM kernels are bf16
    # The kernels need 16-byte aligned row strides for the model and hidden dims.
    return all(d * x.element_size() % 16 == 0 for d in w1.shape[1:])


class GroupedExperts(nn.Module):
    """SwiGLU experts stored as stacked weights: w1, w3 (E, H, D) and w2 (E, D, H)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.use_grouped_mm = use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's expert weights as plain tensors (expert parallelism makes them DTensors)."""
        ws = (self.w1, self.w2, self.w3)
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in ws)  # type: ignore[return-value]

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_e: torch.Tensor) -> torch.Tensor:
        """Run each local expert on its contiguous block of tokens.

        Args:
            x_ND: tokens grouped by local expert (expert 0's block first).
            tokens_per_expert_e: int64 block sizes, shape (e,), summing to N.

        Returns:
            y_ND: expert outputs in the same order (not yet weighted).
        """
        w1, w2, w3 = self.local_weights()
        # Mixed precision (components/mixed_precision.py): compute in autocast's dtype, or in
        # the input's when FSDP2's policy made it bf16 but left these weights fp32 (EP).
        dtype = (torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type)
                 else x_ND.dtype)
        if dtype != w1.dtype and dtype in (torch.bfloat16, torch.float16):
            w1, w2, w3, x_ND = w1.to(dtype), w2.to(dtype), w3.to(dtype), x_ND.to(dtype)
        if self.use_grouped_mm and _grouped_mm_supported(x_ND, w1):
            if torch.compiler.is_compiling() and x_ND.dtype != torch.bfloat16:
                # Inductor's shape rules for _grouped_mm accept bf16 only, although the
                # eager CPU kernel runs fp32: run this piece eagerly (one graph break).
                return _experts_grouped_mm_eager(w1, w2, w3, x_ND, tokens_per_expert_e)
            return _experts_grouped_mm(w1, w2, w3, _MaterializeGrad.apply(x_ND), tokens_per_expert_e)
        return _experts_for_loop(w1, w2, w3, x_ND, tokens_per_expert_e)


def _experts_grouped_mm(w1, w2, w3, x_ND, tokens_per_expert_e):
    offsets_e = torch.cumsum(tokens_per_expert_e, dim=0, dtype=torch.int32)
    x_ND = x_ND.to(w1.dtype)
    h_NH = F.silu(torch._grouped_mm(x_ND, w1.transpose(-2, -1), offs=offsets_e))
    h_NH = h_NH * torch._grouped_mm(x_ND, w3.transpose(-2, -1), offs=offsets_e)
    out = torch._grouped_mm(h_NH, w2.transpose(-2, -1), offs=offsets_e)
    return _MaterializeGrad.apply(out)


@torch.compiler.disable
def _experts_grouped_mm_eager(w1, w2, w3, x_ND, tokens_per_expert_e):
    return _experts_grouped_mm(w1, w2, w3, _MaterializeGrad.apply(x_ND), tokens_per_expert_e)


def _experts_for_loop(w1, w2, w3, x_ND, tokens_per_expert_e):
    # .tolist() syncs with the device; acceptable for the reference path.
    splits = tokens_per_expert_e.tolist()
    outs = []
    for i, x_expert in enumerate(torch.split(x_ND, splits, dim=0)):
        h = F.silu(x_expert @ w1[i].T) * (x_expert @ w3[i].T)
        outs.append(h @ w2[i].T)
    return torch.cat(outs, dim=0) if outs else x_ND.new_zeros(0, w2.shape[1])


class FeedForward(nn.Module):
    """SwiGLU MLP: dense FFN layers and shared experts."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TokenDispatcher(Protocol):
    """Moves routed token copies to the experts that own them and back."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, object]:
        ...

    def combine(self, y_ND: torch.Tensor, state: object) -> torch.Tensor:
        ...


class LocalDispatchState(NamedTuple):
    order_N: torch.Tensor
    """Position in the flattened (token, k) list of each sorted copy."""
    weights_TK: torch.Tensor
    num_tokens: int


def sort_by_expert(x_TD: torch.Tensor, routing: Routing, num_experts: int):
    """Local permute: one copy of each token per chosen expert, grouped by expert id.

    Returns:
        x_ND (N = T*K), tokens_per_expert_E, order_N (see LocalDispatchState).
    """
    top_k = routing.expert_ids_TK.shape[-1]
    flat_ids_N = routing.expert_ids_TK.reshape(-1)
    order_N = torch.argsort(flat_ids_N, stable=True)  # stable: deterministic order within an expert
    x_ND = x_TD[order_N // top_k]
    return x_ND, count_tokens_per_expert(flat_ids_N, num_experts), order_N


def unsort_and_combine(y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Local unpermute: put copies back in (token, k) order, weight them, sum over k."""
    num_tokens, top_k = weights_TK.shape
    y_unsorted_ND = torch.empty_like(y_ND)
    y_unsorted_ND[order_N] = y_ND
    y_TKD = y_unsorted_ND.view(num_tokens, top_k, -1)
    # Weighted sum in fp32 as a batched matmul: deterministic on CPU and GPU (no atomics).
    out_T1D = torch.bmm(weights_TK.unsqueeze(1), y_TKD.float())
    return out_T1D.squeeze(1).to(y_ND.dtype)


class LocalTokenDispatcher:
    """All experts live on this rank: dispatch and combine are local permutations."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD, routing):
        x_ND, tokens_per_expert_E, order_N = sort_by_expert(x_TD, routing, self.num_experts)
        return x_ND, tokens_per_expert_E, LocalDispatchState(order_N, routing.weights_TK, x_TD.shape[0])

    def combine(self, y_ND, state: LocalDispatchState):
        return unsort_and_combine(y_ND, state.order_N, state.weights_TK)


class AuxLossInjector(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient ``scale`` into ``aux_loss``.

    The balance loss then trains the router without being added to (and logged as part
    of) the language-model loss, and without threading it through pipeline stages.
    """

    @staticmethod
    def forward(ctx, x, aux_loss, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


def sequence_balance_loss(routing: Routing, batch_size: int, top_k: int) -> torch.Tensor:
    """Sequence-wise balance loss sum_e f_e * P_e, averaged over sequences.

    Per sequence (not per batch) so that the mean over data-parallel ranks equals the
    loss of one process holding all sequences: layouts give identical gradients.
    """
    num_experts = routing.probs_TE.shape[-1]
    probs_BSE = routing.probs_TE.view(batch_size, -1, num_experts)
    seq_len = probs_BSE.shape[1]
    ids_BN = routing.expert_ids_TK.view(batch_size, -1)
    counts_BE = torch.zeros(batch_size, num_experts, device=ids_BN.device)
    counts_BE.scatter_add_(1, ids_BN, torch.ones_like(ids_BN, dtype=counts_BE.dtype))
    f_BE = counts_BE * (num_experts / (top_k * seq_len))
    p_BE = (probs_BSE / probs_BSE.sum(-1, keepdim=True)).mean(dim=1)
    return (f_BE * p_BE).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts (+ optional shared experts) replacing the FFN of a block."""

    def __init__(self, args: MoEArgs, dim: int, hidden_dim: int):
        super().__init__()
        self.args = args
        self.router = TokenChoiceTopKRouter(dim, args)
        self.experts = GroupedExperts(dim, hidden_dim, args.num_experts)
        self.shared_experts = (
            FeedForward(dim, hidden_dim * args.num_shared_experts) if args.num_shared_experts > 0 else None
        )
        # Aux-loss-free balancing (arXiv 2408.15664): the bias is updated outside the model
        # from the tokens counted here, after all micro-batches of a step (see
        # components/load_balance.py). Persistent so that it is checkpointed.
        self.register_buffer("expert_bias", torch.zeros(args.num_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts), persistent=False)
        self.dispatcher: TokenDispatcher = LocalTokenDispatcher(args.num_experts)
        self.use_expert_bias = True
        self.aux_loss_coeff = 0.0
        self.aux_loss_scale = 1.0
        self.last_aux_loss: torch.Tensor | None = None

    def init_buffers(self) -> None:
        # A disaggregated expert rank drops the router and its buffers (split_model).
        for name in ("expert_bias", "tokens_per_expert"):
            if getattr(self, name, None) is not None:
                getattr(self, name).zero_()

    def route(self, x_TD: torch.Tensor) -> Routing:
        """Step 1: choose experts for each token and count them for load balancing."""
        routing = self.router(x_TD, self.expert_bias if self.use_expert_bias else None)
        if not is_recomputing():  # activation checkpointing re-runs this in backward
            with torch.no_grad():
                self.tokens_per_expert += count_tokens_per_expert(routing.expert_ids_TK, self.args.num_experts)
        return routing

    def attach_aux_loss(self, out: torch.Tensor, routing: Routing, batch_size: int) -> torch.Tensor:
        """Make backward through ``out`` also train the router on the balance loss."""
        if self.aux_loss_coeff > 0 and torch.is_grad_enabled():
            aux = self.aux_loss_coeff * sequence_balance_loss(routing, batch_size, self.args.top_k)
            self.last_aux_loss = aux.detach()
            out = AuxLossInjector.apply(out, aux, self.aux_loss_scale)
        return out

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Route, dispatch, run experts, combine; input and output are (B, S, D)."""
        batch_size, _, dim = x_BSD.shape
        x_TD = x_BSD.reshape(-1, dim)
        routing = self.route(x_TD)
        fused = getattr(self.dispatcher, "dispatch_compute_combine", None)
        if fused is not None:
            # A dispatcher that overlaps its communication with the expert (and shared
            # expert) compute runs them itself, in its own order; same result.
            out_TD = fused(x_TD, routing, self.experts, self.shared_experts)
        else:
            x_ND, tokens_per_expert_e, state = self.dispatcher.dispatch(x_TD, routing)
            y_ND = self.experts(x_ND, tokens_per_expert_e)
            out_TD = self.dispatcher.combine(y_ND, state)
            if self.shared_experts is not None:
                out_TD = out_TD + self.shared_experts(x_TD)
        out_TD = self.attach_aux_loss(out_TD, routing, batch_size)
        return out_TD.view_as(x_BSD)
