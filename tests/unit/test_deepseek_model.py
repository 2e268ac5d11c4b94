"""Unit tests for the DeepSeek-MoE family: torchtitan FQN parity, parameter and FLOP
accounting, CPU forward/backward, and numerical parity with torchtitan's DeepSeekV3Model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models.deepseek_moe import DeepSeekMoEArgs, DeepSeekMoEModel, deepseek_moe_flavors
from torchtitan_disagmoe.models.init import init_model_weights_, transformer_init_rule


def _torchtitan_model(tt_args, device: str):
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model

    tt_args = copy.deepcopy(tt_args)
    if not hasattr(tt_args, "moe_impl"):  # normally set by update_from_config
        tt_args.moe_impl = "standard"
    with torch.device(device):
        return DeepSeekV3Model(tt_args)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_registered():
    spec = get_model_spec("deepseek_moe")
    assert spec.model_cls is DeepSeekMoEModel
    assert set(spec.flavors) >= {"debug", "16B"}


def test_16b_state_dict_matches_torchtitan():
    from torchtitan.models.deepseek_v3 import deepseekv3_args

    tt_model = _torchtitan_model(deepseekv3_args["16B"], "meta")
    with torch.device("meta"):
        ours = DeepSeekMoEModel(deepseek_moe_flavors["16B"])
    ours_shapes, tt_shapes = _shapes(ours), _shapes(tt_model)
    assert set(ours_shapes) == set(tt_shapes), (
        f"only ours: {sorted(set(ours_shapes) - set(tt_shapes))[:10]}, "
        f"only torchtitan: {sorted(set(tt_shapes) - set(ours_shapes))[:10]}")
    assert ours_shapes == tt_shapes
    # Parameters alone agree too (expert_bias is the only persistent buffer).
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in tt_model.named_parameters()}


def test_16b_flavor_values_match_torchtitan():
    from torchtitan.models.deepseek_v3 import deepseekv3_args

    tt, ours = deepseekv3_args["16B"], deepseek_moe_flavors["16B"]
    for name in ("vocab_size", "dim", "n_layers", "n_dense_layers", "n_heads", "moe_inter_dim", "norm_eps",
                 "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "original_seq_len", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale"):
        assert getattr(ours, name) == getattr(tt, name), name
    assert ours.dense_inter_dim == tt.inter_dim
    for name in ("num_experts", "num_shared_experts", "top_k", "score_func", "route_norm", "route_scale"):
        assert getattr(ours.moe, name) == getattr(tt.moe_args, name), name


@pytest.mark.parametrize("flavor", ["debug", "16B"])
def test_num_params_matches_model(flavor):
    args = deepseek_moe_flavors[flavor]
    with torch.device("meta"):
        model = DeepSeekMoEModel(args)
    assert args.num_params()[0] == sum(p.numel() for p in model.parameters())


def test_num_params_with_q_lora():
    args = copy.deepcopy(deepseek_moe_flavors["debug"])
    args.q_lora_rank = 48
    with torch.device("meta"):
        model = DeepSeekMoEModel(args)
    attn = model.layers["1"].attention
    assert not hasattr(attn, "wq") and attn.q_norm.weight.shape == (48,)
    assert args.num_params()[0] == sum(p.numel() for p in model.parameters())
    assert args.attention_params() == sum(p.numel() for p in attn.parameters())


def test_debug_forward_backward_cpu():
    args = deepseek_moe_flavors["debug"]
    torch.manual_seed(0)
    model = DeepSeekMoEModel(args)
    init_model_weights_(model, lambda name: transformer_init_rule(name, args.dim), seed=0)
    assert hasattr(model.layers["0"], "feed_forward") and not hasattr(model.layers["0"], "moe")
    assert model.layers["0"].feed_forward.w1.weight.shape == (args.dense_inter_dim, args.dim)
    for i in range(1, args.n_layers):
        assert hasattr(model.layers[str(i)], "moe") and not hasattr(model.layers[str(i)], "feed_forward")
    tokens = torch.randint(0, args.vocab_size, (2, 33))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, 32, args.vocab_size)
    loss = F.cross_entropy(logits.reshape(-1, args.vocab_size), tokens[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # The attention path is trained (a wiring mistake would leave these zero).
    for name in ("wq", "wkv_a", "kv_norm", "wkv_b", "wo"):
        assert getattr(model.layers["1"].attention, name).weight.grad.abs().sum() > 0, name


def test_flops_per_token_debug_by_hand():
    a = deepseek_moe_flavors["debug"]
    seq_len = 512
    mean_keys = (seq_len + 1) / 2
    h, d = a.n_heads, a.dim
    qk, c, r = a.qk_nope_head_dim + a.qk_rope_head_dim, a.kv_lora_rank, a.qk_rope_head_dim
    attn_weights = (
        d * h * qk                                        # wq
        + d * (c + r)                                     # wkv_a
        + c * h * (a.qk_nope_head_dim + a.v_head_dim)     # wkv_b
        + h * a.v_head_dim * d                            # wo
    )
    # The shared convention is 2 FLOPs per active parameter, which also counts the
    # kv_norm weights (c of them); keep them so the totals compare exactly.
    attn = 2 * (attn_weights + c) + 2 * h * qk * mean_keys + 2 * h * a.v_head_dim * mean_keys
    dense_ffn = 2 * 3 * d * a.dense_inter_dim
    moe_ffn = 2 * (d * a.moe.num_experts                                   # router
                   + (a.moe.top_k + a.moe.num_shared_experts) * 3 * d * a.moe_inter_dim)
    forward = 2 * d * a.vocab_size
    forward += a.n_dense_layers * (attn + dense_ffn) + (a.n_layers - a.n_dense_layers) * (attn + moe_ffn)
    assert a.flops_per_token(seq_len) == pytest.approx(3 * forward, rel=1e-12)
    # Sanity on the numbers themselves (debug: 4 heads, qk 48, v 32, latent 64).
    assert attn_weights == 128 * 4 * 48 + 128 * 80 + 64 * 4 * 64 + 4 * 32 * 128


def _tt_args_like(args: DeepSeekMoEArgs):
    """torchtitan DeepSeekV3ModelArgs with our sizes, SDPA attention, for-loop experts."""
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs as TTMoEArgs

    return DeepSeekV3ModelArgs(
        max_seq_len=args.max_seq_len, vocab_size=args.vocab_size, dim=args.dim, inter_dim=args.dense_inter_dim,
        moe_inter_dim=args.moe_inter_dim, n_layers=args.n_layers, n_dense_layers=args.n_dense_layers,
        n_heads=args.n_heads, norm_eps=args.norm_eps,
        moe_args=TTMoEArgs(
            num_experts=args.moe.num_experts, num_shared_experts=args.moe.num_shared_experts, top_k=args.moe.top_k,
            score_func=args.moe.score_func, route_norm=args.moe.route_norm, route_scale=args.moe.route_scale,
            score_before_experts=False, use_grouped_mm=False,
        ),
        q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim, attn_type="sdpa",
        attn_mask_type="causal", original_seq_len=args.original_seq_len, rope_theta=args.rope_theta,
        rope_factor=args.rope_factor, beta_fast=args.beta_fast, beta_slow=args.beta_slow, mscale=args.mscale,
    )


@pytest.mark.parametrize("variant", ["plain_rope", "yarn_q_lora"])
def test_logits_match_torchtitan(variant, monkeypatch):
    # torchtitan's router counts tokens with torch.histc on int64, not implemented on CPU;
    # its for-loop experts then need integer counts.
    def histc(x, bins, min, max):
        return torch.bincount(x.view(-1), minlength=bins)[:bins]

    monkeypatch.setattr(torch, "histc", histc)
    args = copy.deepcopy(deepseek_moe_flavors["debug"])
    args.n_layers = 3
    if variant == "yarn_q_lora":  # max_seq_len > original_seq_len: YaRN + mscale active
        args.max_seq_len, args.original_seq_len, args.q_lora_rank = 256, 64, 48
        assert args.uses_yarn
    ours = DeepSeekMoEModel(args)
    init_model_weights_(ours, lambda name: transformer_init_rule(name, args.dim), seed=1)
    tt_model = _torchtitan_model(_tt_args_like(args), "cpu")
    tt_model.norm.eps = args.norm_eps  # torchtitan's final norm uses the dtype's eps
    tt_model.load_state_dict(ours.state_dict(), strict=True)
    # The same rotation: torchtitan's complex freqs_cis vs our cos/sin cache.
    rope_dim = args.qk_rope_head_dim
    torch.testing.assert_close(ours.rope_cache[:, : rope_dim // 2], tt_model.freqs_cis.real)
    torch.testing.assert_close(ours.rope_cache[:, rope_dim // 2 :], tt_model.freqs_cis.imag)
    assert ours.layers["1"].attention.softmax_scale == pytest.approx(tt_model.layers["1"].attention.softmax_scale)
    if variant == "yarn_q_lora":
        assert ours.layers["1"].attention.softmax_scale > 1.001 * args.qk_head_dim**-0.5

    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tt_model(tokens)
        got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_init_buffers_rebuilds_rope_cache():
    args = deepseek_moe_flavors["debug"]
    with torch.device("meta"):
        model = DeepSeekMoEModel(args)
    model.to_empty(device="cpu")
    model.init_buffers()
    angles = torch.arange(args.max_seq_len, dtype=torch.float32)[:, None] * (
        args.rope_theta ** (-torch.arange(0, args.qk_rope_head_dim, 2, dtype=torch.float32) / args.qk_rope_head_dim))
    torch.testing.assert_close(model.rope_cache, torch.cat([angles.cos(), angles.sin()], dim=-1))
    assert "rope_cache" not in model.state_dict()
    assert math.isclose(model.layers["0"].attention.softmax_scale, (32 + 16) ** -0.5)
