"""Per-layer, per-micro-batch costs: FLOPs, kernel times, and bytes on the wire.

Everything the AF-Pipe estimate, the baselines and the simulator need, from one place:

- Forward FLOPs per token of each layer (``LayerCost``): attention projections
  (2 x attention parameters), the causal score/value products (2 x heads x (d_qk + d_v) x
  mean keys; MLA and GQA through ``attention_score_dims``, banded layers through
  ``models.mean_keys``), router (2 D E), shared experts and dense FFN layers (2 x 3 D H),
  routed experts (2 x 3 D H per routed copy, K copies per token), head (2 D V). Backward
  = 2 x forward; full activation recomputation adds one more forward. The sum over layers
  equals ``args.flops_per_token`` (a unit test holds them together).
- Kernel time = max(FLOPs / (peak x efficiency), weight bytes / (HBM bandwidth x
  efficiency)): a roofline per kernel. The HBM floor is what makes tiny micro-batches
  (few tokens per expert) slow.
- Bytes: M2N dispatch rows (D elem + 4K weights + 8(K+1) ids and token index), N2M combine
  rows (D elem + 8), their gradients (D elem + 4K and D elem), one row per (token, expert
  rank) with the expected distinct ranks from ``routing``; the residual hand-off (D elem per
  token, p > 1); colocated EP all-to-all: the routed copies that leave the rank.

Shape/unit legend: t tokens of one micro-batch on one rank, D model dim, K top-k, E
experts, H expert hidden dim, V vocab; times in seconds, bytes per second per direction.
"""

from dataclasses import dataclass

from torchtitan_disagmoe.models.args import MoETransformerArgs

from .clusters import Cluster
from .models import mean_keys
from .routing import RoutingModel


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of the peaks. Defaults are typical Hopper figures; override them
    (CLI ``--gemm-eff`` ...) or calibrate them with measured runs."""

    gemm: float = 0.65
    """BF16 GEMMs of these sizes reach ~600-700 of 989 TFLOP/s with cuBLAS on H100/H800."""
    attention: float = 0.5
    """FlashAttention-3 reports ~75% of peak forward on H100, FA2 ~35-45%; backward is
    slower than forward, so 0.5 for forward + backward."""
    network: float = 0.8
    """NCCL/DeepEP reach ~40-46 GB/s of a 50 GB/s NIC and ~150-160 GB/s of H800 NVLink."""
    hbm: float = 0.8
    comm_sm_tax: float = 0.15
    """Compute slowdown while communication kernels run beside it: DeepSeek-V3 (arXiv
    2412.19437, sec. 3.2.2) gives 20 of 132 H800 SMs to communication (= 0.15)."""
    intra_layer_exposed: float = 0.1
    """ep_overlap: fraction of each layer's all-to-all that chunked intra-layer overlap
    cannot hide (the first dispatch chunk and the last combine chunk)."""

    def __post_init__(self):
        for name in ("gemm", "attention", "network", "hbm"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"efficiency {name} = {getattr(self, name)} must be in (0, 1]")
        for name in ("comm_sm_tax", "intra_layer_exposed"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1)")


@dataclass(frozen=True)
class LayerCost:
    """Forward work of one layer per token, split by where it runs in AF-Pipe."""

    moe: bool
    gemm_flops: float
    """Attention-side GEMMs: projections, router, shared experts or the dense FFN."""
    attn_flops: float
    """Causal score and value products."""
    routed_flops: float
    """Routed experts: all K copies of a token (0 for dense layers)."""
    a_params: int
    """Parameters the attention side reads (attention, norms, router, shared/dense FFN)."""


class ModelCosts:
    """Costs of one model at one sequence length on one cluster."""

    def __init__(self, args: MoETransformerArgs, seq_len: int, cluster: Cluster,
                 eff: Efficiency | None = None, routing: RoutingModel | None = None):
        self.args, self.seq_len, self.cluster = args, seq_len, cluster
        self.eff = eff or Efficiency()
        moe = args.moe
        self.routing = routing or RoutingModel(moe.num_experts, moe.top_k)
        self.dim, self.top_k, self.num_experts = args.dim, moe.top_k, moe.num_experts
        self.expert_params = 3 * args.dim * args.moe_inter_dim
        self.layers = [self._layer(i) for i in range(args.n_layers)]
        self.head_flops = 2 * args.dim * args.vocab_size
        self.head_params = args.dim * args.vocab_size + args.dim
        self.embed_params = args.dim * args.vocab_size
        e = cluster.elem_bytes
        self.dispatch_row = args.dim * e + 4 * self.top_k + 8 * (self.top_k + 1)
        self.combine_row = args.dim * e + 8
        self.dispatch_grad_row = args.dim * e + 4 * self.top_k
        self.combine_grad_row = args.dim * e
        self.residual_row = args.dim * e

    def _layer(self, layer_id: int) -> LayerCost:
        args = self.args
        qk_dim, v_dim = args.attention_score_dims()
        attn = 2 * args.n_heads * (qk_dim + v_dim) * mean_keys(args, layer_id, self.seq_len)
        total, active = args.ffn_params(layer_id)
        norms = 2 * args.dim
        if not args.is_moe_layer(layer_id):
            a_params = args.attention_params() + norms + total
            return LayerCost(False, 2 * (args.attention_params() + active), attn, 0.0, a_params)
        routed_active = self.top_k * self.expert_params
        routed_total = self.num_experts * self.expert_params
        a_side = active - routed_active  # router and shared experts (and biases)
        a_params = args.attention_params() + norms + total - routed_total
        return LayerCost(True, 2 * (args.attention_params() + a_side), attn, 2 * routed_active, a_params)

    # ---- counts ------------------------------------------------------------------------
    def forward_flops_per_token(self) -> float:
        return sum(lc.gemm_flops + lc.attn_flops + lc.routed_flops for lc in self.layers) + self.head_flops

    def model_flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), what MFU divides by."""
        return self.args.flops_per_token(self.seq_len)

    @property
    def expert_param_total(self) -> int:
        return sum(self.num_experts * self.expert_params for lc in self.layers if lc.moe)

    # ---- kernel times ------------------------------------------------------------------
    def _roofline(self, gemm_flops: float, attn_flops: float, weight_bytes: float) -> float:
        c = self.cluster
        compute = gemm_flops / (c.peak_flops * self.eff.gemm) + attn_flops / (c.peak_flops * self.eff.attention)
        return max(compute, weight_bytes / (c.hbm_bw * self.eff.hbm))

    def _fwd_bwd(self, gemm: float, attn: float, params: float, recompute: bool) -> tuple[float, float]:
        """(forward, backward) time; backward = 2x FLOPs, reads weights twice and
        read-modify-writes fp32 gradients."""
        e = self.cluster.elem_bytes
        fwd = self._roofline(gemm, attn, params * e)
        bwd = self._roofline(2 * gemm, 2 * attn, params * (2 * e + 8))
        return fwd, bwd + (fwd if recompute else 0.0)

    def attention_stage(self, layer: LayerCost, tokens: float, recompute: bool = False) -> tuple[float, float]:
        """A-stage of one layer for ``tokens`` tokens: attention, router, shared/dense FFN."""
        return self._fwd_bwd(layer.gemm_flops * tokens, layer.attn_flops * tokens, layer.a_params, recompute)

    def expert_stage(self, copies: float, local_experts: int, recompute: bool = False) -> tuple[float, float]:
        """Routed experts of one layer on one rank: ``copies`` (token, expert) pairs."""
        flops = copies * 2 * self.expert_params
        return self._fwd_bwd(flops, 0.0, local_experts * self.expert_params, recompute)

    def colocated_layer(self, layer: LayerCost, tokens: float, ep: int,
                        recompute: bool = False) -> tuple[tuple[float, float], tuple[float, float]]:
        """((attention fwd, bwd), (experts fwd, bwd)) of one layer on a colocated EP rank."""
        attn = self.attention_stage(layer, tokens, recompute)
        if not layer.moe:
            return attn, (0.0, 0.0)
        copies = tokens * self.top_k * self.routing.imbalance(ep)
        return attn, self.expert_stage(copies, self.num_experts // ep, recompute)

    def head_stage(self, tokens: float, recompute: bool = False) -> tuple[float, float]:
        return self._fwd_bwd(self.head_flops * tokens, 0.0, self.head_params, recompute)

    # ---- bytes -------------------------------------------------------------------------
    def distinct_ranks(self, ep: int) -> float:
        return self.routing.distinct_ranks(ep)

    def af_bytes_per_token(self, ep: int) -> tuple[float, float]:
        """(out, in) bytes of an attention rank per token per MoE layer, forward + backward:
        out = dispatch + combine-grad rows, in = combine + dispatch-grad rows. An expert
        group moves the same totals the other way."""
        n = self.distinct_ranks(ep)
        return n * (self.dispatch_row + self.combine_grad_row), n * (self.combine_row + self.dispatch_grad_row)

    def ep_copies_leaving(self, ep: int, dedup: str = "copy") -> float:
        """Rows per token that leave a colocated EP rank in one all-to-all.

        ``copy``: one per routed (token, expert) copy on another rank (Megatron/torchtitan
        all-to-all); ``rank``: once per (token, rank), as AF-Pipe's dispatch.
        """
        if ep == 1:
            return 0.0
        per_token = self.top_k if dedup == "copy" else self.distinct_ranks(ep)
        return per_token * (ep - 1) / ep

    def ep_a2a_bytes_per_token(self, ep: int, dedup: str = "copy") -> tuple[float, float]:
        """(intra-node, inter-node) bytes per token per MoE layer, per direction, of the
        four all-to-alls (dispatch, combine and their gradients) of a colocated EP rank.
        The EP group spans consecutive GPUs, so min(ep, gpus_per_node) - 1 of the ep - 1
        other ranks are in the same node."""
        rows = self.ep_copies_leaving(ep, dedup)
        if rows == 0:
            return 0.0, 0.0
        g = self.cluster.gpus_per_node
        intra_share = (min(ep, g) - 1) / (ep - 1)
        total = 4 * rows * self.dim * self.cluster.elem_bytes
        return total * intra_share, total * (1 - intra_share)

    # ---- link times --------------------------------------------------------------------
    def link_time(self, intra_bytes: float, inter_bytes: float, messages: float = 0.0,
                  inter_bw: float | None = None) -> float:
        """NVLink and NIC traffic run concurrently; ``messages`` add one latency each."""
        c = self.cluster
        bw = inter_bw if inter_bw is not None else c.inter_bw
        t = max(intra_bytes / (c.intra_bw * self.eff.network), inter_bytes / (bw * self.eff.network))
        latency = c.inter_latency if inter_bytes else c.intra_latency
        return t + messages * latency

    def overlapped(self, compute: float, comm: float) -> float:
        """Compute and communication on separate streams: the slower wins, and compute
        pays the SM tax for the part of it that runs beside communication."""
        taxed = compute + self.eff.comm_sm_tax * min(compute, comm)
        return max(taxed, comm)
