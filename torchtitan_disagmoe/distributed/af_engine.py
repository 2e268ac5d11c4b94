"""Runs one micro-batch through the disaggregated stage chain, forward then backward.

The chain of a micro-batch is ``A(0) F(0) A(1) F(1) ... A(L-1) F(L-1) A(L)`` where A(L)
is the head and loss. Between the stages (DESIGN.md section 2):

    A(l) --dispatch(l)--> F(l) --combine(l)--> A(l+1)        MoE layer l
    A(l) --------------residual(l)-----------> A(l+1)        the residual stream

``dispatch`` sends each token once per expert rank that holds any of its experts, with
its routing weights; ``combine`` returns one weighted sum per (token, expert rank) to the
attention rank of the next group that owns the token. The residual stream goes directly
from A(l) to A(l+1): with p = 1 that is the same rank and nothing moves; with p > 1 it is
one D-vector per token. (Folding it into the combine would save that transfer only if
the expert side also held ``ffn_norm``, i.e. one parameter trained in two pools with a
cross-pool gradient reduction; see docs/disaggregation.md for the bytes either way.)

This module executes the *global program*: every rank walks the same list of operations
and takes part in those that involve it. Each transfer is one operation for both of its
sides, so the program order is a valid order for every rank and nothing can deadlock.
Overlapping micro-batches (the AF-Pipe schedule) replaces this program, not the stages.
"""

import torch
from torch import nn

from .af_stages import StageRecord, attention_layer_forward, head_forward, leaf, run_local_experts
from .disagg_dims import DisaggDims
from .dispatch import (COMBINE, COMBINE_GRAD, DISPATCH, DISPATCH_GRAD, RESIDUAL, RESIDUAL_GRAD, CommStats,
                       exchange_known, exchange_rows, make_tag)


def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
    """The gradient of a stage input; zeros when no path reached it (e.g. no rows)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def global_program(num_layers: int, moe_layers: list[bool], pipeline_depth: int) -> list[tuple[str, int]]:
    """The operations of one micro-batch's forward and backward, in a deadlock-free order."""
    ops: list[tuple[str, int]] = []
    for layer in range(num_layers + 1):
        if layer > 0 and moe_layers[layer - 1]:
            ops.append(("combine", layer - 1))
        if layer > 0 and pipeline_depth > 1:
            ops.append(("residual", layer - 1))
        ops.append(("attention_forward", layer))
        if layer < num_layers and moe_layers[layer]:
            ops += [("dispatch", layer), ("expert_forward", layer)]
    for layer in range(num_layers, -1, -1):
        if layer < num_layers and moe_layers[layer]:
            ops += [("combine_grad", layer), ("expert_backward", layer), ("dispatch_grad", layer)]
        if layer < num_layers and pipeline_depth > 1:
            ops.append(("residual_grad", layer))
        ops.append(("attention_backward", layer))
    return ops


class DisaggregatedEngine:
    """This rank's part of the disaggregated forward/backward of one micro-batch."""

    def __init__(self, model: nn.Module, dims: DisaggDims, rank: int, moe_layers: list[bool],
                 dim: int, top_k: int, device: torch.device):
        self.model, self.dims, self.rank, self.device = model, dims, rank, device
        self.role = dims.role(rank)
        self.moe_layers, self.dim, self.top_k = moe_layers, dim, top_k
        self.num_layers = len(moe_layers)
        self.experts_per_rank = dims.num_experts // dims.ep
        self.program = global_program(self.num_layers, moe_layers, dims.pipeline_depth)
        self.stats = CommStats()
        self.records: dict[tuple[str, int], StageRecord] = {}

    # ---- who is involved -------------------------------------------------------------
    def _attn_group(self, layer: int) -> int:
        return self.dims.group_of_layer(layer)

    def _is_attention_of(self, layer: int) -> bool:
        return self.role.pool == "attention" and self.role.group == self._attn_group(layer)

    def _is_expert_of(self, layer: int) -> bool:
        return self.role.pool == "expert" and self.role.group == self._attn_group(layer)

    def _peer(self, layer: int, dp_index: int) -> int:
        """Attention rank that runs ``layer`` for data-parallel index ``dp_index``."""
        return self.dims.attention_rank(self._attn_group(layer), dp_index)

    # ---- entry -----------------------------------------------------------------------
    def forward_backward(self, tokens: torch.Tensor | None, labels: torch.Tensor | None,
                         loss_scale: float = 1.0) -> torch.Tensor | None:
        """Run the whole program; returns this rank's unscaled loss on head ranks, else None."""
        self.tokens, self.labels, self.loss_scale, self.loss = tokens, labels, loss_scale, None
        for op, layer in self.program:
            getattr(self, "_" + op)(layer)
        self.records.clear()
        return self.loss

    # ---- forward ---------------------------------------------------------------------
    def _attention_forward(self, layer: int) -> None:
        if not self._is_attention_of(layer):
            return
        rec = self.records.setdefault(("A", layer), StageRecord())
        if layer == 0:
            x = self.model.tok_embeddings(self.tokens.to(self.device))
        else:
            x = self._stage_input(layer, rec)
        if layer == self.num_layers:
            scaled, self.loss = head_forward(self.model, x, self.labels.to(self.device), self.loss_scale)
            rec.outputs = [scaled]
            return
        block = self.model.layers[str(layer)]
        h, rows = attention_layer_forward(block, x, self.model.rope_cache, self.dims.ep, self.experts_per_rank)
        rec.outputs = [h]
        rec.extra["shape"] = h.shape
        if rows is not None:
            rec.outputs += [t for r in rows for t in (r.x_nD, r.weights_nK)]
            rec.extra["rows"] = rows

    def _stage_input(self, layer: int, rec: StageRecord) -> torch.Tensor:
        """x = residual + combined expert output of the previous layer, as leaves."""
        if self.dims.pipeline_depth == 1:
            h_in = leaf(self.records[("A", layer - 1)].outputs[0])
        else:
            h_in = rec.extra.pop("residual_in")
        rec.inputs = [h_in]
        if not self.moe_layers[layer - 1]:
            return h_in
        y_TD = h_in.new_zeros(h_in.shape[0] * h_in.shape[1], self.dim)
        for f, (rows_nD, token_idx_n) in sorted(rec.extra.pop("combined").items()):
            rows_nD = leaf(rows_nD)
            rec.inputs.append(rows_nD)
            rec.extra.setdefault("combine_sources", []).append((f, token_idx_n))
            y_TD = y_TD.index_add(0, token_idx_n, rows_nD)
        return h_in + y_TD.view_as(h_in)

    def _dispatch(self, layer: int) -> None:
        tag = make_tag(layer, DISPATCH)
        group_of = self._attn_group(layer)
        if self._is_attention_of(layer):
            rows = self.records[("A", layer)].extra["rows"]
            send = {f: [r.x_nD.detach(), r.weights_nK.detach(),
                        torch.cat([r.local_ids_nK, r.token_idx_n.unsqueeze(1)], dim=1)]
                    for f, r in zip(self.dims.expert_group_ranks(group_of), rows)}
            exchange_rows(send, [], [], tag, self.device, self.stats, DISPATCH)
        elif self._is_expert_of(layer):
            sources = self.dims.attention_group_ranks(group_of)
            layout = [((self.dim,), torch.float32), ((self.top_k,), torch.float32),
                      ((self.top_k + 1,), torch.int64)]
            received = exchange_rows({}, sources, layout, tag, self.device)
            self.records[("F", layer)] = StageRecord(extra={"received": received})

    def _expert_forward(self, layer: int) -> None:
        if not self._is_expert_of(layer):
            return
        rec = self.records[("F", layer)]
        received = rec.extra.pop("received")
        sources = sorted(received)
        xs = [leaf(received[a][0]) for a in sources]
        ws = [leaf(received[a][1]) for a in sources]
        ints = [received[a][2] for a in sources]
        experts = self.model.layers[str(layer)].moe.experts
        out_MD = run_local_experts(experts, torch.cat(xs), torch.cat(ws), torch.cat([i[:, :-1] for i in ints]))
        rec.inputs = [t for pair in zip(xs, ws) for t in pair]
        rec.outputs = list(out_MD.split([x.shape[0] for x in xs]))
        rec.extra.update(sources=sources, token_idx=[i[:, -1] for i in ints])

    def _combine(self, layer: int) -> None:
        tag = make_tag(layer, COMBINE)
        if self._is_expert_of(layer):
            rec = self.records[("F", layer)]
            send = {self._peer(layer + 1, self.dims.role(a).index): [out.detach(), idx]
                    for a, out, idx in zip(rec.extra["sources"], rec.outputs, rec.extra["token_idx"])}
            exchange_rows(send, [], [], tag, self.device, self.stats, COMBINE)
        elif self._is_attention_of(layer + 1):
            sources = self.dims.expert_group_ranks(self._attn_group(layer))
            layout = [((self.dim,), torch.float32), ((), torch.int64)]
            received = exchange_rows({}, sources, layout, tag, self.device)
            rec = self.records.setdefault(("A", layer + 1), StageRecord())
            rec.extra["combined"] = {f: (t[0], t[1]) for f, t in received.items()}

    def _residual(self, layer: int) -> None:
        tag = make_tag(layer, RESIDUAL)
        d = self.role.index
        if self._is_attention_of(layer):
            h = self.records[("A", layer)].outputs[0].detach()
            exchange_known({self._peer(layer + 1, d): [h]}, {}, tag, self.stats, RESIDUAL)
        elif self._is_attention_of(layer + 1):
            shape = (self.tokens.shape if self.tokens is not None else self.labels.shape) + (self.dim,)
            h_in = torch.empty(shape, device=self.device)
            exchange_known({}, {self._peer(layer, d): [h_in]}, tag)
            self.records.setdefault(("A", layer + 1), StageRecord()).extra["residual_in"] = leaf(h_in)

    # ---- backward --------------------------------------------------------------------
    def _attention_backward(self, layer: int) -> None:
        if not self._is_attention_of(layer):
            return
        rec = self.records[("A", layer)]
        if layer == self.num_layers:
            rec.backward([torch.ones_like(rec.outputs[0])])
            return
        if self.dims.pipeline_depth == 1:
            grad_h = self.records[("A", layer + 1)].inputs[0].grad
        else:
            grad_h = rec.extra.pop("residual_grad")
        grads = [grad_h]
        for g_x, g_w in rec.extra.pop("dispatch_grads", []):
            grads += [g_x, g_w]
        rec.backward(grads)

    def _combine_grad(self, layer: int) -> None:
        tag = make_tag(layer, COMBINE_GRAD)
        if self._is_attention_of(layer + 1):
            rec = self.records[("A", layer + 1)]
            rows = rec.inputs[1:]
            send = {f: [_grad_or_zeros(r)] for (f, _), r in zip(rec.extra["combine_sources"], rows)}
            exchange_known(send, {}, tag, self.stats, COMBINE_GRAD)
        elif self._is_expert_of(layer):
            rec = self.records[("F", layer)]
            dests = [self._peer(layer + 1, self.dims.role(a).index) for a in rec.extra["sources"]]
            grads = [torch.empty_like(out) for out in rec.outputs]
            exchange_known({}, {d: [g] for d, g in zip(dests, grads)}, tag)
            rec.extra["out_grads"] = grads

    def _expert_backward(self, layer: int) -> None:
        if self._is_expert_of(layer):
            rec = self.records[("F", layer)]
            rec.backward(rec.extra.pop("out_grads"))

    def _dispatch_grad(self, layer: int) -> None:
        tag = make_tag(layer, DISPATCH_GRAD)
        if self._is_expert_of(layer):
            rec = self.records[("F", layer)]
            pairs = zip(rec.inputs[0::2], rec.inputs[1::2])
            send = {a: [_grad_or_zeros(x), _grad_or_zeros(w)] for a, (x, w) in zip(rec.extra["sources"], pairs)}
            exchange_known(send, {}, tag, self.stats, DISPATCH_GRAD)
        elif self._is_attention_of(layer):
            rec = self.records[("A", layer)]
            experts = self.dims.expert_group_ranks(self._attn_group(layer))
            grads = [(torch.empty_like(r.x_nD), torch.empty_like(r.weights_nK)) for r in rec.extra["rows"]]
            exchange_known({}, {f: list(g) for f, g in zip(experts, grads)}, tag)
            rec.extra["dispatch_grads"] = grads

    def _residual_grad(self, layer: int) -> None:
        tag = make_tag(layer, RESIDUAL_GRAD)
        d = self.role.index
        if self._is_attention_of(layer + 1):
            grad = self.records[("A", layer + 1)].inputs[0].grad
            exchange_known({self._peer(layer, d): [grad]}, {}, tag, self.stats, RESIDUAL_GRAD)
        elif self._is_attention_of(layer):
            rec = self.records[("A", layer)]
            grad = torch.empty(rec.extra["shape"], device=self.device)
            exchange_known({}, {self._peer(layer + 1, d): [grad]}, tag)
            rec.extra["residual_grad"] = grad
