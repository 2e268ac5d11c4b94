"""Unit tests for the Qwen3-MoE family: torchtitan state-dict parity, parameter and FLOP
accounting, CPU forward/backward, and layout-independent initialisation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models import init as init_mod
from torchtitan_disagmoe.models.init import (
    InitRule,
    init_model_weights_,
    init_parameter_,
    transformer_init_rule,
)
from torchtitan_disagmoe.models.qwen3_moe import Qwen3MoEModel, qwen3_moe_flavors


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _meta_model(flavor: str) -> Qwen3MoEModel:
    with torch.device("meta"):
        return Qwen3MoEModel(qwen3_moe_flavors[flavor])


def _debug_model(seed: int) -> Qwen3MoEModel:
    args = qwen3_moe_flavors["debug"]
    with torch.device("meta"):
        model = Qwen3MoEModel(args)
    model.to_empty(device="cpu")
    init_model_weights_(model, lambda name: transformer_init_rule(name, args.dim), seed=seed)
    return model


def test_registered():
    spec = get_model_spec("qwen3_moe")
    assert spec.model_cls is Qwen3MoEModel
    assert set(spec.flavors) >= {"debug", "30B-A3B", "235B-A22B"}


@pytest.mark.parametrize("flavor", ["30B-A3B", "235B-A22B"])
def test_state_dict_matches_torchtitan(flavor):
    """Same state-dict keys and shapes as torchtitan 0.2.2's Qwen3Model, so its state-dict
    adapter and DCP checkpoints apply unchanged.

    state_dict() already leaves out non-persistent buffers (rope_cache, tokens_per_expert).
    torchtitan registers the persistent ``moe.expert_bias`` only when
    ``moe_args.load_balance_coeff`` is not None; its default is 1e-3 and the qwen3_args
    flavors keep it, so both sides have it and the whole state dicts are comparable. With
    load_balance_coeff=None torchtitan would have no expert_bias (we always have one), so we
    also compare the parameters alone, which do not depend on that setting.
    """
    from torchtitan.models.qwen3 import Qwen3Model, qwen3_args

    tt_args = qwen3_args[flavor]
    assert tt_args.moe_args.load_balance_coeff is not None
    with torch.device("meta"):
        tt_model = Qwen3Model(tt_args)
    ours = _meta_model(flavor)
    ours_shapes, tt_shapes = _shapes(ours), _shapes(tt_model)
    assert set(ours_shapes) == set(tt_shapes), (
        f"only ours: {sorted(set(ours_shapes) - set(tt_shapes))[:10]}, "
        f"only torchtitan: {sorted(set(tt_shapes) - set(ours_shapes))[:10]}")
    assert ours_shapes == tt_shapes
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in tt_model.named_parameters()}


@pytest.mark.parametrize("flavor", ["30B-A3B", "235B-A22B"])
def test_flavor_values_match_torchtitan(flavor):
    """The sizes that define the weights agree with torchtitan's flavors (max_seq_len and
    hidden_dim, which does not apply to all-MoE models, may differ)."""
    from torchtitan.models.qwen3 import qwen3_args

    tt, ours = qwen3_args[flavor], qwen3_moe_flavors[flavor]
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "qk_norm",
                 "moe_inter_dim", "norm_eps", "rope_theta"):
        assert getattr(ours, name) == getattr(tt, name), name
    for name in ("num_experts", "num_shared_experts", "top_k", "score_func", "route_norm", "route_scale"):
        assert getattr(ours.moe, name) == getattr(tt.moe_args, name), name
    assert not tt.enable_weight_tying


@pytest.mark.parametrize("flavor", ["debug", "30B-A3B", "235B-A22B"])
def test_num_params_matches_model(flavor):
    """args.num_params() total equals the parameters the model actually has."""
    args = qwen3_moe_flavors[flavor]
    model = _meta_model(flavor)
    assert args.num_params()[0] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("flavor,total,active", [
    ("30B-A3B", 30.5e9, 3.3e9),
    ("235B-A22B", 235e9, 22e9),
])
def test_num_params_published_sizes(flavor, total, active):
    """Totals and active counts are near the published model sizes (within 5%)."""
    got_total, got_active = qwen3_moe_flavors[flavor].num_params()
    assert got_total == pytest.approx(total, rel=0.05)
    assert got_active == pytest.approx(active, rel=0.05)


def test_active_params_by_hand():
    """Active = total minus the (E - K) unused experts of every layer."""
    a = qwen3_moe_flavors["debug"]
    total, active = a.num_params()
    expert = 3 * a.dim * a.moe_inter_dim
    assert total - active == a.n_layers * (a.moe.num_experts - a.moe.top_k) * expert


def test_flops_per_token_debug_by_hand():
    """Training FLOPs = 3 x forward; forward = 2 x active matmul params + head + causal attention."""
    a = qwen3_moe_flavors["debug"]
    seq_len = 256
    d, h, kv, dh = a.dim, a.n_heads, a.n_kv_heads, a.head_dim
    attn_weights = (
        d * h * dh          # wq
        + 2 * d * kv * dh   # wk, wv
        + h * dh * d        # wo
        + 2 * dh            # q_norm, k_norm weights (counted by the 2-FLOPs-per-param convention)
    )
    router = d * a.moe.num_experts
    experts = a.moe.top_k * 3 * d * a.moe_inter_dim
    per_layer = 2 * (attn_weights + router + experts) + 2 * h * (dh + dh) * (seq_len + 1) / 2
    forward = a.n_layers * per_layer + 2 * d * a.vocab_size
    assert a.flops_per_token(seq_len) == pytest.approx(3 * forward, rel=1e-12)
    # The numbers themselves, for the debug sizes (d 128, 4 heads, 2 kv heads, head dim 32).
    assert attn_weights == 128 * 128 + 2 * 128 * 64 + 128 * 128 + 64


def test_debug_forward_backward_cpu():
    """CPU forward/backward of the debug flavor: finite loss, finite gradient on every parameter."""
    args = qwen3_moe_flavors["debug"]
    model = _debug_model(seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, 32, args.vocab_size)
    loss = F.cross_entropy(logits.reshape(-1, args.vocab_size), tokens[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    attn = model.layers["1"].attention
    for name in ("wq", "wk", "wv", "wo", "q_norm", "k_norm"):
        assert getattr(attn, name).weight.grad.abs().sum() > 0, name
    assert model.layers["1"].moe.router.gate.weight.grad.abs().sum() > 0


def test_init_buffers_rebuilds_rope_cache():
    """A meta-built model gets its non-persistent rope cache back from init_buffers."""
    args = qwen3_moe_flavors["debug"]
    model = _debug_model(seed=0)
    # Reference in float64; fp32 angles up to 2047 rad carry ~1e-4 rounding (half an ulp).
    inv = args.rope_theta ** (-torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    angles = torch.arange(args.max_seq_len, dtype=torch.float64)[:, None] * inv
    angles = torch.cat([angles, angles], dim=-1)
    expected = torch.cat([angles.cos(), angles.sin()], dim=-1).float()
    assert model.rope_cache.shape == (args.max_seq_len, 2 * args.head_dim)
    torch.testing.assert_close(model.rope_cache, expected, rtol=0, atol=3e-4)
    torch.testing.assert_close(model.rope_cache[:64], expected[:64], rtol=0, atol=1e-5)
    assert "rope_cache" not in model.state_dict()


# ---------------------------------------------------------------- init


def test_per_expert_init_matches_per_expert_generation():
    """A full (E, H, D) expert weight holds, for each expert i, the sample of that expert's own
    generator (seed, name, i): a rank can make any expert without the others."""
    name = "layers.2.moe.experts.w1"
    rule = transformer_init_rule(name, 128)
    assert rule.per_expert
    w = torch.empty(6, 16, 8)
    init_parameter_(w, name, rule, seed=3)
    for i in range(6):
        expected = init_mod._sample(torch.Size([16, 8]), rule, init_mod._generator(3, name, i))
        assert torch.equal(w[i], expected), i
    assert not torch.equal(w[0], w[1])


def test_init_sub_block_equals_full(monkeypatch):
    """Filling only experts [2:4] (as an expert-parallel rank would, through a DTensor's
    local block and global offset) gives exactly rows 2:4 of the full initialisation. The
    DTensor needs a process group, so the local view is faked."""
    name, seed = "layers.0.moe.experts.w2", 7
    rule = transformer_init_rule(name, 128)
    full = torch.empty(6, 8, 16)
    init_parameter_(full, name, rule, seed)

    block = torch.empty(2, 8, 16)
    monkeypatch.setattr(init_mod, "_local_view", lambda p: (p, torch.Size([6, 8, 16]), (2, 0, 0)))
    init_parameter_(block, name, rule, seed)
    assert torch.equal(block, full[2:4])

    # A shard inside an expert (FSDP over dim 1 on top of EP) also matches.
    shard = torch.empty(1, 4, 16)
    monkeypatch.setattr(init_mod, "_local_view", lambda p: (p, torch.Size([6, 8, 16]), (5, 4, 0)))
    init_parameter_(shard, name, rule, seed)
    assert torch.equal(shard, full[5:6, 4:8])


def test_init_dense_shard_equals_full(monkeypatch):
    """A row shard of a non-expert weight (FSDP2 Shard(0)) equals those rows of the full init."""
    name, seed = "layers.1.attention.wq.weight", 0
    rule = transformer_init_rule(name, 128)
    assert not rule.per_expert
    full = torch.empty(12, 5)
    init_parameter_(full, name, rule, seed)
    shard = torch.empty(4, 5)
    monkeypatch.setattr(init_mod, "_local_view", lambda p: (p, torch.Size([12, 5]), (8, 0)))
    init_parameter_(shard, name, rule, seed)
    assert torch.equal(shard, full[8:12])


def test_init_rules():
    """torchtitan-style distributions: norms ones, embeddings N(0, 1), depth-scaled output projections."""
    assert transformer_init_rule("norm.weight", 128) == InitRule("ones")
    assert transformer_init_rule("layers.0.attention.q_norm.weight", 128).kind == "ones"
    assert transformer_init_rule("tok_embeddings.weight", 128) == InitRule("normal", std=1.0)
    out = transformer_init_rule("output.weight", 128)
    assert out.std == pytest.approx(128**-0.5) and not out.absolute_cutoff
    assert transformer_init_rule("layers.3.attention.wo.weight", 128).std == pytest.approx(0.02 / 8**0.5)
    assert transformer_init_rule("layers.3.attention.wq.weight", 128).std == 0.02
    assert transformer_init_rule("layers.3.moe.experts.w3", 128).per_expert
    assert not transformer_init_rule("layers.3.moe.router.gate.weight", 128).per_expert


def test_same_seed_same_model_different_seed_differs():
    """Two builds with the same seed are identical; a different seed changes every random
    parameter (norm weights are ones either way)."""
    a, b, c = _debug_model(seed=0), _debug_model(seed=0), _debug_model(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
        if name.endswith("norm.weight") or name.endswith("expert_bias"):
            assert torch.equal(sa[name], sc[name]), name
        else:
            assert not torch.equal(sa[name], sc[name]), name
    # Distinct parameters get distinct values (each name seeds its own generator).
    w1 = a.layers["0"].moe.experts.w1
    w1_next = a.layers["1"].moe.experts.w1
    assert not torch.equal(w1, w1_next)
    assert torch.all(a.layers["0"].moe.expert_bias == 0)


def test_debug_args_copy_is_private():
    """get_flavor returns a copy: editing it does not change the registry."""
    spec = get_model_spec("qwen3_moe")
    args = spec.get_flavor("debug")
    args.n_layers = 1
    assert spec.flavors["debug"].n_layers == qwen3_moe_flavors["debug"].n_layers != 1
    assert copy.deepcopy(qwen3_moe_flavors["debug"]) == spec.get_flavor("debug")


def test_large_seed_accepted_by_config_can_initialise():
    """A training.seed the config accepts must also initialise weights (or be refused up front)."""
    from torchtitan_disagmoe.config.manager import load_job_config

    seed = 2**32
    try:
        config = load_job_config(["--training.seed", str(seed)])
    except ValueError:
        return  # refused with a config error: also fine
    init_parameter_(torch.empty(2, 3), "layers.0.attention.wq.weight", InitRule("normal"), config.training.seed)
