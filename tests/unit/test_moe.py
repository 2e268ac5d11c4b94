"""Unit tests for the MoE layer pieces: experts (grouped GEMM vs loop), local dispatch and
combine, token counting, the router, the sequence balance loss, the aux-loss injector, the
expert-parallel block regrouping, and the whole MoE module against a per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan_disagmoe.distributed.expert_parallel import block_regroup_index
from torchtitan_disagmoe.models.moe import (
    AuxLossInjector,
    GroupedExperts,
    LocalTokenDispatcher,
    MoE,
    MoEArgs,
    Routing,
    TokenChoiceTopKRouter,
    count_tokens_per_expert,
    sequence_balance_loss,
    sort_by_expert,
    unsort_and_combine,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int, unused=()) -> Routing:
    """A hand-made Routing: distinct experts per token (never those in ``unused``), random weights."""
    g = _gen(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in unused])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=g), dim=-1)
    return Routing(weights, ids, probs)


# ---------------------------------------------------------------- experts


def _expert_pair(dim=8, hidden=12, num_experts=4, seed=0):
    g = _gen(seed)
    grouped = GroupedExperts(dim, hidden, num_experts, use_grouped_mm=True)
    loop = GroupedExperts(dim, hidden, num_experts, use_grouped_mm=False)
    with torch.no_grad():
        for w in (grouped.w1, grouped.w2, grouped.w3):
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    loop.load_state_dict(grouped.state_dict())
    return grouped, loop


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [4, 1, 1, 0]])
@pytest.mark.parametrize("reduction", ["sum", "weighted"])
def test_grouped_mm_matches_loop(counts, reduction):
    """torch._grouped_mm experts equal the per-expert loop in fp32, forward and backward, with
    experts that get no tokens; ``out.sum()`` gives a zero-stride gradient, which grouped GEMM
    rejects unless it is made contiguous."""
    grouped, loop = _expert_pair()
    counts_e = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(int(counts_e.sum()), 8, generator=_gen(1))
    g_out = torch.randn(x.shape[0], 8, generator=_gen(2))
    results = []
    for experts in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        out = experts(xi, counts_e)
        loss = out.sum() if reduction == "sum" else (out * g_out).sum()
        loss.backward()
        results.append((out.detach(), xi.grad, [w.grad for w in (experts.w1, experts.w2, experts.w3)]))
    (out_g, dx_g, dw_g), (out_l, dx_l, dw_l) = results
    assert out_g.dtype == torch.float32
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_g, dx_l, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("w1", "w2", "w3"), dw_g, dw_l):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # An expert without tokens gets an exactly zero gradient on both paths.
    for e, c in enumerate(counts):
        if c == 0:
            for a in dw_g:
                assert torch.count_nonzero(a[e]) == 0


def test_grouped_mm_no_tokens_at_all():
    """Zero routed tokens (an idle expert-parallel rank) gives an empty output on both paths."""
    grouped, loop = _expert_pair()
    counts_e = torch.zeros(4, dtype=torch.int64)
    x = torch.zeros(0, 8)
    for experts in (grouped, loop):
        out = experts(x, counts_e)
        assert out.shape == (0, 8)


# ---------------------------------------------------------------- dispatch / combine


def test_count_tokens_per_expert():
    """bincount-based histogram equals a Python count, is int64, and has zeros for unused experts."""
    ids = torch.tensor([[5, 0], [0, 2], [5, 2], [0, 5], [7, 2]])
    counts = count_tokens_per_expert(ids, 9)
    assert counts.dtype == torch.int64
    flat = ids.flatten().tolist()
    assert counts.tolist() == [flat.count(e) for e in range(9)]
    assert counts[[1, 3, 4, 6, 8]].tolist() == [0] * 5


def test_sort_by_expert_groups_tokens():
    """The sorted copies are grouped by expert id in block order, with matching counts."""
    routing = _random_routing(6, 5, 2, seed=3, unused=(1,))
    x = torch.randn(6, 4, generator=_gen(4))
    x_ND, counts, order = sort_by_expert(x, routing, 5)
    assert x_ND.shape == (12, 4)
    assert counts.tolist() == count_tokens_per_expert(routing.expert_ids_TK, 5).tolist()
    assert counts[1] == 0
    sorted_ids = routing.expert_ids_TK.reshape(-1)[order]
    assert torch.equal(sorted_ids, torch.repeat_interleave(torch.arange(5), counts))
    torch.testing.assert_close(x_ND, x[order // 2], rtol=0, atol=0)


def test_dispatch_then_combine_identity_experts():
    """Permute then unpermute gives back the input and its gradient: with identity experts,
    LocalTokenDispatcher dispatch + combine equals x * sum_k w_k, and the gradients of x and
    the weights match the direct computation."""
    T, E, K, D = 7, 5, 3, 6
    routing = _random_routing(T, E, K, seed=5, unused=(2,))
    x0 = torch.randn(T, D, generator=_gen(6))
    g_out = torch.randn(T, D, generator=_gen(7))

    x = x0.clone().requires_grad_(True)
    w = routing.weights_TK.clone().requires_grad_(True)
    dispatcher = LocalTokenDispatcher(E)
    x_ND, counts, state = dispatcher.dispatch(x, Routing(w, routing.expert_ids_TK, routing.probs_TE))
    assert counts.sum() == T * K
    out = dispatcher.combine(x_ND, state)
    (out * g_out).sum().backward()

    x_ref = x0.clone().requires_grad_(True)
    w_ref = routing.weights_TK.clone().requires_grad_(True)
    out_ref = x_ref * w_ref.sum(-1, keepdim=True)
    (out_ref * g_out).sum().backward()

    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_unsort_and_combine_weights_each_copy():
    """unsort_and_combine puts copy (t, k) back and weights it by w[t, k] (distinct values per copy)."""
    T, E, K, D = 5, 4, 2, 3
    routing = _random_routing(T, E, K, seed=8)
    x = torch.randn(T, D, generator=_gen(9))
    x_ND, _, order = sort_by_expert(x, routing, E)
    # Make each sorted copy distinguishable: add a per-expert offset.
    sorted_ids = routing.expert_ids_TK.reshape(-1)[order]
    y_ND = x_ND + 10.0 * sorted_ids[:, None]
    out = unsort_and_combine(y_ND, order, routing.weights_TK)
    ids, w = routing.expert_ids_TK, routing.weights_TK
    expected = torch.stack([
        sum(w[t, k] * (x[t] + 10.0 * ids[t, k]) for k in range(K)) for t in range(T)])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- router


def _router(dim=6, num_experts=5, top_k=2, route_norm=True, route_scale=1.0, score_func="softmax"):
    args = MoEArgs(num_experts=num_experts, top_k=top_k, route_norm=route_norm, route_scale=route_scale,
                   score_func=score_func)
    router = TokenChoiceTopKRouter(dim, args)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(num_experts, dim, generator=_gen(10)))
    return router


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_weights_sum_to_route_scale(score_func):
    """With route_norm, each token's top-k weights sum to route_scale."""
    router = _router(route_scale=2.5, score_func=score_func)
    x = torch.randn(9, 6, generator=_gen(11))
    r = router(x)
    assert r.weights_TK.shape == (9, 2) and r.expert_ids_TK.dtype == torch.int64
    assert r.weights_TK.dtype == torch.float32
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.full((9,), 2.5))
    # Chosen experts are the top-k of the probabilities.
    torch.testing.assert_close(r.expert_ids_TK, r.probs_TE.topk(2, dim=-1).indices)


def test_router_expert_bias_changes_choice_not_weights():
    """The expert bias changes which experts are chosen, but weights are gathered from the
    unbiased probabilities (route_norm off so they can be compared directly)."""
    router = _router(route_norm=False, route_scale=1.5)
    x = torch.randn(9, 6, generator=_gen(12))
    plain = router(x)
    # Favour the expert that is least preferred overall.
    weakest = int(plain.probs_TE.sum(0).argmin())
    bias = torch.zeros(5)
    bias[weakest] = 10.0
    biased = router(x, bias)
    torch.testing.assert_close(biased.probs_TE, plain.probs_TE)
    assert not torch.equal(biased.expert_ids_TK, plain.expert_ids_TK)
    assert (biased.expert_ids_TK == weakest).any(-1).all()
    expected = plain.probs_TE.gather(-1, biased.expert_ids_TK) * 1.5
    torch.testing.assert_close(biased.weights_TK, expected)
    # The biased expert's weight is its small unbiased probability, not prob + bias.
    assert (biased.weights_TK < 1.5).all()


def test_router_expert_bias_with_route_norm():
    """With route_norm, biased weights are the unbiased probabilities of the chosen experts, renormalised."""
    router = _router(route_norm=True)
    x = torch.randn(9, 6, generator=_gen(13))
    bias = torch.tensor([0.0, 5.0, 0.0, -5.0, 0.0])
    r = router(x, bias)
    assert (r.expert_ids_TK == 1).any(-1).all() and not (r.expert_ids_TK == 3).any()
    gathered = r.probs_TE.gather(-1, r.expert_ids_TK)
    torch.testing.assert_close(r.weights_TK, gathered / gathered.sum(-1, keepdim=True))


# ---------------------------------------------------------------- balance loss


def test_sequence_balance_loss_by_hand():
    """Tiny example computed by hand: B=1, S=2, E=3, K=2.

    f_e = count_e * E / (K * S), P_e = mean over tokens of p_e, loss = sum_e f_e P_e.
    """
    probs = torch.tensor([[0.5, 0.3, 0.2],
                          [0.1, 0.6, 0.3]])
    ids = torch.tensor([[0, 1],
                        [1, 2]])
    routing = Routing(torch.full((2, 2), 0.5), ids, probs)
    # counts = [1, 2, 1]; E/(K*S) = 3/4 -> f = [0.75, 1.5, 0.75]
    # P = [0.3, 0.45, 0.25]
    expected = 0.75 * 0.3 + 1.5 * 0.45 + 0.75 * 0.25
    got = sequence_balance_loss(routing, batch_size=1, top_k=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sequence_balance_loss_by_hand_two_sequences():
    """Two sequences are averaged, each with its own counts and probability means."""
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([[0], [0], [0], [1]])
    routing = Routing(torch.ones(4, 1), ids, probs)
    # seq 0: f = [2, 0] * 2/(1*2) = [2, 0]; P = [0.5, 0.5] -> 1.0
    # seq 1: f = [1, 1];                     P = [0.5, 0.5] -> 1.0
    assert sequence_balance_loss(routing, batch_size=2, top_k=1).item() == pytest.approx(1.0)
    ids2 = torch.tensor([[0], [0], [1], [1]])
    # seq 1 now: f = [0, 2]; P = [0.5, 0.5] -> 1.0 ; seq 0 unchanged -> mean 1.0
    probs2 = torch.tensor([[0.8, 0.2], [0.6, 0.4], [1.0, 0.0], [0.0, 1.0]])
    # seq 0: f = [2, 0], P = [0.7, 0.3] -> 1.4 ; seq 1: f = [0, 2], P = [0.5, 0.5] -> 1.0
    got = sequence_balance_loss(Routing(torch.ones(4, 1), ids2, probs2), batch_size=2, top_k=1)
    assert got.item() == pytest.approx(1.2)


def test_sequence_balance_loss_is_dp_invariant():
    """The mean of the loss over two halves of a batch (split by sequences) equals the loss
    of the whole batch: data-parallel layouts see the same balance gradient."""
    B, S, E, K = 4, 6, 5, 2
    g = _gen(14)
    logits = torch.randn(B * S, E, generator=g, requires_grad=True)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(K, dim=-1).indices
    whole = sequence_balance_loss(Routing(torch.ones(B * S, K), ids, probs), B, K)
    half = B * S // 2
    parts = [sequence_balance_loss(Routing(torch.ones(half, K), ids[s], probs[s]), B // 2, K)
             for s in (slice(0, half), slice(half, None))]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole)
    # And the gradients agree too.
    (g_whole,) = torch.autograd.grad(whole, logits, retain_graph=True)
    (g_parts,) = torch.autograd.grad((parts[0] + parts[1]) / 2, logits)
    torch.testing.assert_close(g_parts, g_whole)


# ---------------------------------------------------------------- aux loss injector


def test_aux_loss_injector():
    """Forward is the identity; backward passes the output gradient to x unchanged and adds
    ``scale`` as the aux loss's gradient, so the router learns from the aux loss even when
    the main output's gradient is zero."""
    router = _router()
    x = torch.randn(8, 6, generator=_gen(15))
    h = torch.randn(8, 6, generator=_gen(16), requires_grad=True)
    routing = router(x)
    aux = sequence_balance_loss(routing, batch_size=2, top_k=2)
    out = AuxLossInjector.apply(h, aux, 0.25)
    assert torch.equal(out, h)
    (out * 0.0).sum().backward()
    assert torch.count_nonzero(h.grad) == 0
    got = router.gate.weight.grad.clone()
    assert got.abs().sum() > 0

    router.gate.weight.grad = None
    (0.25 * sequence_balance_loss(router(x), batch_size=2, top_k=2)).backward()
    torch.testing.assert_close(got, router.gate.weight.grad)


def test_aux_loss_injector_passes_gradient():
    """x's gradient is the incoming gradient, whatever the aux loss."""
    h = torch.randn(3, 4, requires_grad=True)
    aux = torch.tensor(2.0, requires_grad=True)
    g = torch.randn(3, 4)
    AuxLossInjector.apply(h, aux, 3.0).backward(g)
    torch.testing.assert_close(h.grad, g)
    assert aux.grad.item() == 3.0


# ---------------------------------------------------------------- expert-parallel regroup


def test_block_regroup_index_by_hand():
    """R=2 source ranks, e=3 local experts, rows arrive (r, e)-major; the index lists them
    (e, r)-major. Blocks: r0=[e0: 0 1 | e1: - | e2: 2], r1=[e0: 3 | e1: 4 5 6 | e2: -]."""
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])
    index = block_regroup_index(counts)
    assert index.tolist() == [0, 1, 3, 4, 5, 6, 2]
    # The inverse permutation restores the arrival order.
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(len(index))
    assert index[inverse].tolist() == list(range(7))


def test_block_regroup_index_edge_cases():
    """All-zero experts, a single rank (identity) and no rows at all."""
    counts = torch.tensor([[0, 2, 0], [0, 1, 0], [1, 0, 0]])
    # r0: e1 -> 0 1 ; r1: e1 -> 2 ; r2: e0 -> 3
    assert block_regroup_index(counts).tolist() == [3, 0, 1, 2]
    assert block_regroup_index(torch.tensor([[2, 3]])).tolist() == [0, 1, 2, 3, 4]
    assert block_regroup_index(torch.zeros(2, 3, dtype=torch.int64)).tolist() == []


# ---------------------------------------------------------------- whole MoE module


def _naive_moe(moe: MoE, x_BSD: torch.Tensor) -> torch.Tensor:
    """Per-token loop: sum_k w_k * expert_{id_k}(x) (+ shared experts)."""
    args = moe.args
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    w1, w2, w3 = moe.experts.w1, moe.experts.w2, moe.experts.w3
    out = []
    for x in x_TD:
        logits = moe.router.gate.weight @ x
        probs = torch.softmax(logits, -1) if args.score_func == "softmax" else torch.sigmoid(logits)
        choice = probs + moe.expert_bias if moe.use_expert_bias else probs
        ids = choice.topk(args.top_k).indices
        w = probs[ids]
        if args.route_norm:
            w = w / w.sum()
        w = w * args.route_scale
        y = torch.zeros_like(x)
        for wk, e in zip(w, ids.tolist()):
            y = y + wk * (w2[e] @ (F.silu(w1[e] @ x) * (w3[e] @ x)))
        if moe.shared_experts is not None:
            s = moe.shared_experts
            y = y + s.w2.weight @ (F.silu(s.w1.weight @ x) * (s.w3.weight @ x))
        out.append(y)
    return torch.stack(out).view_as(x_BSD)


@pytest.mark.parametrize("use_grouped_mm", [True, False])
@pytest.mark.parametrize("num_shared_experts,score_func,route_norm", [
    (0, "softmax", True), (1, "sigmoid", False), (2, "softmax", False)])
def test_moe_matches_naive_loop(use_grouped_mm, num_shared_experts, score_func, route_norm):
    """MoE with LocalTokenDispatcher equals a per-token loop, with a non-zero expert bias, and
    counts routed tokens into ``tokens_per_expert``."""
    args = MoEArgs(num_experts=6, top_k=2, num_shared_experts=num_shared_experts, score_func=score_func,
                   route_norm=route_norm, route_scale=1.7)
    moe = MoE(args, dim=8, hidden_dim=12)
    moe.experts.use_grouped_mm = use_grouped_mm
    g = _gen(17)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        moe.init_buffers()
        moe.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.0, 0.1, 0.0]))
    assert isinstance(moe.dispatcher, LocalTokenDispatcher)
    x = torch.randn(2, 5, 8, generator=_gen(18))
    with torch.no_grad():
        got = moe(x)
        expected = _naive_moe(moe, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert moe.tokens_per_expert.sum().item() == 2 * 5 * 2


def test_moe_aux_loss_trains_router():
    """With aux_loss_coeff > 0 the router gate gets gradient from the balance loss alone."""
    args = MoEArgs(num_experts=4, top_k=2)
    moe = MoE(args, dim=8, hidden_dim=12)
    g = _gen(19)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        moe.init_buffers()
    moe.aux_loss_coeff = 0.5
    x = torch.randn(2, 5, 8, generator=_gen(20))
    out = moe(x)
    assert moe.last_aux_loss is not None and moe.last_aux_loss.item() > 0
    (out * 0.0).sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(moe.experts.w1.grad) == 0


def test_unaligned_dims_fall_back_to_the_loop():
    """torch._grouped_mm needs 16-byte aligned strides; unaligned dims use the loop."""
    from torchtitan_disagmoe.models.moe import MoE, MoEArgs

    torch.manual_seed(0)
    moe = MoE(MoEArgs(num_experts=4, top_k=2), dim=8, hidden_dim=10)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = moe(torch.randn(1, 3, 8))
    assert out.shape == (1, 3, 8) and torch.isfinite(out).all()
