"""Disaggregated layout pieces that need no process group: rank arithmetic, the
attention-side cut of the model, and M2N/N2M compute round trips."""

import pytest
import torch

from torchtitan_disagmoe.distributed.af_stages import run_local_experts, split_by_expert_rank
from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims, Role
from torchtitan_disagmoe.distributed.disagg_model import split_model
from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models.moe import MoE, MoEArgs


def test_dims_arithmetic():
    dims = DisaggDims(attention_ranks=4, expert_ranks=2, pipeline_depth=2, num_layers=4, num_experts=8)
    dims.validate(6)
    assert (dims.dp, dims.ep, dims.head_group) == (2, 1, 0)
    assert dims.attention_group_ranks(1) == [2, 3] and dims.expert_group_ranks(1) == [5]
    assert dims.role(3) == Role("attention", 1, 1) and dims.role(4) == Role("expert", 0, 0)
    assert dims.layers_of_group(1) == [1, 3] and dims.attention_rank(1, 0) == 2
    assert list(dims.expert_range(0)) == list(range(8))
    odd = DisaggDims(attention_ranks=3, expert_ranks=3, pipeline_depth=3, num_layers=3, num_experts=8)
    assert odd.head_group == 0 and odd.group_of_layer(2) == 2


def test_expert_replicas_arithmetic():
    """A4 F4 p1 with 2 expert replicas: experts rows [4, 5] and [6, 7]; attention index d
    dispatches to row d mod 2."""
    dims = DisaggDims(attention_ranks=4, expert_ranks=4, pipeline_depth=1, num_layers=4, num_experts=8,
                      expert_replicas=2)
    dims.validate(8)
    assert (dims.dp, dims.expert_group_size, dims.ep) == (4, 4, 2)
    assert dims.role(6) == Role("expert", 0, 2)
    assert dims.expert_replica_ranks(0, 0) == [4, 5] and dims.expert_replica_ranks(0, 1) == [6, 7]
    assert [dims.replica_of(d) for d in range(4)] == [0, 1, 0, 1]
    assert dims.attention_ranks_of_replica(0, 1) == [1, 3]
    assert list(dims.expert_range(1)) == [4, 5, 6, 7]
    for replicas in (3, 8):  # must divide the expert group (4) and the attention group (4)
        with pytest.raises(ValueError, match="disagmoe.expert_replicas"):
            DisaggDims(4, 4, 1, 4, 8, expert_replicas=replicas).validate(8)
    with pytest.raises(ValueError, match="disagmoe.expert_replicas"):
        DisaggDims(1, 2, 1, 4, 8, expert_replicas=2).validate(3)  # one attention rank: one replica idle


@pytest.mark.parametrize("ep,top_k", [(1, 2), (2, 2), (4, 2), (2, 6), (8, 1)])
def test_dispatch_rows_and_expert_side_equal_the_moe_layer(ep, top_k):
    """Splitting routed tokens by expert rank, running each rank's experts on its rows and
    summing the returned rows per token gives the MoE layer's routed output and gradients."""
    torch.manual_seed(0)
    moe = MoE(MoEArgs(num_experts=8, top_k=top_k, route_norm=True), dim=16, hidden_dim=32)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x_TD = torch.randn(12, 16, requires_grad=True)
    reference = moe(x_TD.view(1, 12, 16)).view(12, 16)
    grad = torch.randn_like(reference)
    ref_grads = torch.autograd.grad(reference, [x_TD, moe.router.gate.weight, moe.experts.w1], grad)

    per_rank = 8 // ep
    routing = moe.route(x_TD)
    out_TD = torch.zeros_like(x_TD)
    rows = split_by_expert_rank(x_TD, routing, ep, per_rank)
    for j, r in enumerate(rows):
        assert len(set(r.token_idx_n.tolist())) == len(r.token_idx_n), "once per (token, rank)"
        assert ((r.local_ids_nK >= 0).sum(1) >= 1).all()
        block = torch.nn.Module()
        block.w1 = moe.experts.w1[j * per_rank:(j + 1) * per_rank]
        block.w2 = moe.experts.w2[j * per_rank:(j + 1) * per_rank]
        block.w3 = moe.experts.w3[j * per_rank:(j + 1) * per_rank]
        experts = _SlicedExperts(block, moe.experts)
        out_TD = out_TD.index_add(0, r.token_idx_n, run_local_experts(experts, r.x_nD, r.weights_nK, r.local_ids_nK))
    torch.testing.assert_close(out_TD, reference, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out_TD, [x_TD, moe.router.gate.weight, moe.experts.w1], grad)
    for g, ref in zip(got, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


class _SlicedExperts(torch.nn.Module):
    """A view of some experts of a GroupedExperts (what one expert rank holds)."""

    def __init__(self, block, full):
        super().__init__()
        self.block, self.full = block, full

    def local_weights(self):
        return self.block.w1, self.block.w2, self.block.w3

    def forward(self, x, counts):
        from torchtitan_disagmoe.models.moe import _experts_for_loop

        return _experts_for_loop(self.block.w1, self.block.w2, self.block.w3, x, counts)


def test_attention_rank_keeps_its_layers_with_colocated_names():
    spec = get_model_spec("deepseek_moe")
    args = spec.get_flavor("debug")
    dims = DisaggDims(attention_ranks=2, expert_ranks=2, pipeline_depth=2, num_layers=args.n_layers,
                      num_experts=args.moe.num_experts)
    with torch.device("meta"):
        full_names = set(dict(spec.model_cls(args).named_parameters()))
        parts = {}
        for rank in (0, 1):
            model = spec.model_cls(args)
            assert split_model(model, dims, rank) == []
            parts[rank] = set(dict(model.named_parameters()))
    assert parts[0] <= full_names and parts[1] <= full_names and not parts[0] & parts[1]
    assert "tok_embeddings.weight" in parts[0] and "output.weight" in parts[0]  # head: layer L=4 -> group 0
    assert all(not n.startswith(("layers.1.", "layers.3.")) for n in parts[0])
    assert "layers.1.moe.router.gate.weight" in parts[1] and "layers.1.moe.shared_experts.w1.weight" in parts[1]
    assert "layers.0.feed_forward.w1.weight" in parts[0]  # dense layer 0 lives wholly on attention
    experts = {n for n in full_names if ".moe.experts." in n}
    assert experts == full_names - parts[0] - parts[1]  # the rest is exactly the experts
