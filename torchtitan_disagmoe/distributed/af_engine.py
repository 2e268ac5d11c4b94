"""The AF-Pipe runtime: executes this rank's action list for one training step.

Stages (see ``schedule.py``): stage 2l is A(l), 2l+1 is F(l), 2L is the head. Between them
(DESIGN.md section 2):

    A(l) --dispatch(l)--> F(l) --combine(l)--> A(l+1)        MoE layer l
    A(l) --------------residual(l)-----------> A(l+1)        residual stream (p > 1)

Meaning of the library's action types here:
    F / B (stage, mb)   forward / backward of a stage (af_stages.py), on this rank
    SEND_F of A(l)      post dispatch(l) to the F group (+ residual(l) when p > 1)
    SEND_F of F(l)      post combine(l) to the next attention group
    RECV_F              post the matching receives (dispatch.py: at once on gloo; NCCL:
                        counts first, then payloads)
    SEND_B / RECV_B     the same edges in reverse, carrying gradients
Sends and receives are posted where the schedule puts them and waited for only when a
stage needs the data (or at the end of the step for sends), so transfers run while this
rank computes other micro-batches: gloo's async work on CPU, NCCL's stream on GPU.

For a dense layer l (DeepSeek's first layer) F(l) is an empty stage: nothing is
dispatched, the attention side computes the whole layer and only the residual moves.
The residual goes directly A(l) -> A(l+1): with p = 1 that is the same rank and nothing
moves; folding it into the combine would need ``ffn_norm`` on both pools (see
docs/disaggregation.md for the bytes either way).
"""

import contextlib
import time
from datetime import timedelta

import torch
from torch import nn

from torchtitan_disagmoe.models.activation_checkpoint import NO_CHECKPOINTING

from .af_stages import (
    StageRecord,
    attention_layer_forward,
    head_forward,
    leaf,
    run_local_experts,
)
from .disagg_dims import DisaggDims
from .dispatch import (
    COMBINE,
    COMBINE_GRAD,
    DISPATCH,
    DISPATCH_GRAD,
    RESIDUAL,
    RESIDUAL_GRAD,
    CommStats,
    Pending,
    RowRecv,
    make_tag,
    post_recvs_known,
    post_sends,
    receives_into_larger_buffers,
)
from .failure import Activity, TransferError
from .pipelining_ir import BACKWARD, FORWARD, RECV_B, RECV_F, SEND_B, SEND_F
from .schedule import AFPipeShape, build_af_pipe_schedule


def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
    """The gradient of a stage input; zeros when no path reached it (e.g. no rows)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


class StepTimes:
    """Wall time of one step on this rank, split into compute and waiting, plus a trace
    of every action: (name, stage, micro-batch, start s, end s, s of it spent waiting for
    transfers, CPU s of this rank's main thread in it), times from the step start. Wall
    time well above CPU time outside waits means the thread was waiting for a core."""

    def __init__(self):
        self.compute = self.wait = 0.0
        self.start = time.perf_counter()
        self.trace: list[tuple[str, int, int, float, float, float, float]] = []

    def record(self, name: str, stage: int, mb: int, start: float, waited: float, cpu_start: float) -> None:
        self.trace.append((name, stage, mb, start - self.start, time.perf_counter() - self.start, waited,
                           time.thread_time() - cpu_start))

    def fractions(self) -> tuple[float, float, float]:
        total = max(time.perf_counter() - self.start, 1e-9)
        return total, self.compute / total, self.wait / total


class AFPipeRuntime:
    """This rank's part of the AF-Pipe: its pipeline rank's actions over all micro-batches."""

    def __init__(self, model: nn.Module, dims: DisaggDims, rank: int, moe_layers: list[bool], dim: int,
                 top_k: int, device: torch.device, microbatches: int = 1, max_inflight: int = 0,
                 transfer_dtype: torch.dtype = torch.float32, tokens_per_microbatch: int | None = None):
        self.model, self.dims, self.rank, self.device = model, dims, rank, device
        self.role = dims.role(rank)
        self.moe_layers, self.dim, self.top_k = moe_layers, dim, top_k
        self.num_layers = len(moe_layers)
        self.experts_per_rank = dims.num_experts // dims.ep
        self.shape = AFPipeShape(self.num_layers, dims.pipeline_depth, microbatches, max_inflight)
        pp_rank = 2 * self.role.group + (self.role.pool == "expert")
        self.actions = build_af_pipe_schedule(self.shape)[pp_rank]
        self.stats = CommStats()
        self.times = StepTimes()
        # Floating payloads of dispatch, combine and their gradients travel in this dtype
        # (bf16 halves the bytes); the residual stream always moves in full precision.
        self.wire_dtype = transfer_dtype
        # Rows of a dispatch or combine between two ranks: at most one per token of the
        # attention rank's micro-batch. Where the backend takes receives larger than their
        # message (gloo), row receives are posted at once with that bound (dispatch.py).
        self.max_rows = tokens_per_microbatch if tokens_per_microbatch and receives_into_larger_buffers() else None
        # Set by the trainer: every wait raises after ``timeout`` (a dead or stuck peer),
        # and ``activity`` says what this rank is doing, for failure reports.
        self.timeout: timedelta | None = None
        self.activity = Activity()
        self.activation_checkpointing = NO_CHECKPOINTING  # per stage; set by the trainer
        self.fsdp_units: dict[int, list] = {}  # FSDP2 units of each A-stage (attention group sharding)
        self.forward_context = contextlib.nullcontext  # a stage forward's context (autocast in bf16 mode)

    def stage_name(self, stage: int) -> str:
        if stage == 2 * self.num_layers:
            return "head"
        return f"{'FA'[stage % 2 == 0]}({stage // 2})"

    # ---- topology ----------------------------------------------------------------------
    def _attn_rank(self, layer: int, dp_index: int) -> int:
        return self.dims.attention_rank(self.dims.group_of_layer(layer), dp_index)

    def _expert_ranks(self, layer: int) -> list[int]:
        """(attention side) The expert ranks this rank's tokens of ``layer`` go to, by ep index."""
        replica = self.dims.replica_of(self.role.index)
        return self.dims.expert_replica_ranks(self.dims.group_of_layer(layer), replica)

    def _attn_ranks(self, layer: int) -> list[int]:
        """(expert side) The attention ranks that send ``layer``'s tokens to this rank."""
        replica = self.role.index // self.dims.ep
        return self.dims.attention_ranks_of_replica(self.dims.group_of_layer(layer), replica)

    # ---- one step ------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Forward and backward of every micro-batch; returns the mean loss on head ranks."""
        m = self.shape.microbatches
        self.tokens = tokens.to(self.device).chunk(m) if tokens is not None else None
        self.labels = labels.to(self.device).chunk(m) if labels is not None else None
        self.records: dict[tuple[int, int], StageRecord] = {}
        self.inbox: dict[tuple[str, int, int], Pending | RowRecv] = {}
        self.unposted: list[RowRecv] = []  # row receives still waiting for their counts
        self.outbox: list[Pending] = []
        self.losses: list[torch.Tensor] = []
        self.times = StepTimes()
        self.backwards_done = {stage: 0 for stage in self.fsdp_units}
        self.prefetched = 0
        if self.fsdp_units:  # the first stage's weights: gathered while the step starts
            for unit in self.fsdp_units[min(self.fsdp_units)]:
                unit.unshard(async_op=True)
        handlers = {FORWARD: self._forward, BACKWARD: self._backward, SEND_F: self._send_f,
                    RECV_F: self._recv_f, SEND_B: self._send_b, RECV_B: self._recv_b}
        for action in self.actions:
            # Post payload receives whose counts arrived meanwhile, so data keeps moving.
            self.unposted = [r for r in self.unposted if not r.poll()]
            start, waited, cpu = time.perf_counter(), self.times.wait, time.thread_time()
            self.activity.set(f"{action.computation_type.name} of {self.stage_name(action.stage_index)}, "
                              f"micro-batch {action.microbatch_index}")
            handlers[action.computation_type](action.stage_index, action.microbatch_index)
            self.times.record(action.computation_type.name, action.stage_index, action.microbatch_index, start,
                              self.times.wait - waited, cpu)
        start, waited, cpu = time.perf_counter(), self.times.wait, time.thread_time()
        for pending in self.outbox:
            self._wait(pending, "the end of this step's sends")
        self.times.record("WAIT_SENDS", -1, -1, start, self.times.wait - waited, cpu)
        assert not self.records, f"stage records leaked: {sorted(self.records)}"
        return torch.stack(self.losses).mean() if self.losses else None

    def _post_rows(self, key: tuple[str, int, int], peers: list[int], layout, tag: int) -> None:
        if self.max_rows is not None:  # everything posted now, in the schedule's order
            self.inbox[key] = RowRecv(peers, layout, tag, self.device, self.max_rows)
            return
        # Per peer, payload receives must be posted in the order of the sends (NCCL).
        for earlier in self.unposted:
            if set(earlier.peers) & set(peers):
                self._wait(earlier, "row counts of an earlier transfer", counts_only=True)
        self.unposted = [r for r in self.unposted if r.payload is None]
        self.inbox[key] = recv = RowRecv(peers, layout, tag, self.device)
        self.unposted.append(recv)

    def _wait(self, pending: Pending | RowRecv, what: str, counts_only: bool = False) -> dict | None:
        """Wait for posted transfers; a failed or timed-out peer raises ``TransferError``
        naming it (the job cannot continue: the connection is gone)."""
        peers = pending.peers if isinstance(pending, RowRecv) else list(pending.tensors)
        outer = self.activity.what
        self.activity.set(f"{outer}: waiting for {what} (ranks {sorted(peers)})")
        start = time.perf_counter()
        try:
            out = pending.force(self.timeout) if counts_only else pending.wait(self.timeout)
        except RuntimeError as e:
            raise TransferError(f"waiting for {what}", peers, e) from e
        if not counts_only:  # _recv_f counts its own time, forced count waits included
            self.times.wait += time.perf_counter() - start
        self.activity.set(outer)
        return out

    def _take(self, kind: str, layer: int, mb: int) -> dict:
        got = self._wait(self.inbox.pop((kind, layer, mb)), f"{kind.replace('_', ' ')} of layer {layer}, "
                         f"micro-batch {mb}")
        if self.wire_dtype == torch.float32 or kind.startswith("residual"):
            return got
        return {peer: [t.float() if t.is_floating_point() else t for t in ts] for peer, ts in got.items()}

    def _wire(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(self.wire_dtype) if t.is_floating_point() else t for t in tensors]

    # ---- compute -------------------------------------------------------------------------
    def _forward(self, stage: int, mb: int) -> None:
        start, waited = time.perf_counter(), self.times.wait
        if mb == 0 and stage in self.fsdp_units:
            self._prefetch_after(stage)
        with self.forward_context():  # autocast for bf16 on ranks FSDP2 does not cast
            if stage % 2:
                self._expert_forward(stage // 2, mb)
            else:
                self._attention_forward(stage // 2, mb)
        # Waiting for inputs inside the stage counts as waiting, not compute.
        self.times.compute += time.perf_counter() - start - (self.times.wait - waited)

    def _prefetch_after(self, stage: int) -> None:
        """Start the all-gather of this rank's next A-stage's weights (FSDP2, async) as this
        stage starts computing, so it is done by that stage's first forward; FSDP2 waits
        for it in that forward. The runtime calls the units directly, so FSDP2's own
        forward prefetch (module order inside one root) does not apply. Every rank of the
        group runs the same action list: the collectives line up."""
        later = [s for s in sorted(self.fsdp_units) if s > stage]
        if later:
            for unit in self.fsdp_units[later[0]]:
                unit.unshard(async_op=True)
            self.prefetched += 1

    def _backward(self, stage: int, mb: int) -> None:
        rec = self.records[(stage, mb)]
        grads = self._output_grads(stage, mb, rec)
        if stage in self.fsdp_units:
            # Keep the stage's weights gathered and its gradients unreduced until its last
            # backward of the step: one all-gather and one reduce-scatter per step.
            last = self.backwards_done[stage] == self.shape.microbatches - 1
            for unit in self.fsdp_units[stage]:
                unit.set_requires_gradient_sync(last)
                unit.set_reshard_after_backward(last)
            self.backwards_done[stage] += 1
        start = time.perf_counter()
        rec.backward(grads)
        self.times.compute += time.perf_counter() - start
        # Free what no later action reads, so live activations stay bounded by the
        # micro-batches in flight: with p = 1 the next attention stage's input gradient
        # was read just now; stage 0 sends nothing back.
        if stage % 2 == 0 and self.dims.pipeline_depth == 1:
            self.records.pop((stage + 2, mb), None)
        if stage == 0:
            self.records.pop((0, mb))

    def _attention_forward(self, layer: int, mb: int) -> None:
        rec = self.records[(2 * layer, mb)] = StageRecord()
        x = self.model.tok_embeddings(self.tokens[mb]) if layer == 0 else self._attention_input(layer, mb, rec)
        if layer == self.num_layers:
            scaled, loss = head_forward(self.model, x, self.labels[mb], 1.0 / self.shape.microbatches)
            rec.outputs = [scaled]
            self.losses.append(loss)
            return
        h, rows = self.activation_checkpointing.run(
            layer, attention_layer_forward, self.model.layers[str(layer)], x, self.model.rope_cache, self.dims.ep,
            self.experts_per_rank)
        rec.outputs = [h]
        if rows is not None:
            rec.outputs += [t for r in rows for t in (r.x_nD, r.weights_nK)]
            rec.extra["rows"] = rows

    def _attention_input(self, layer: int, mb: int, rec: StageRecord) -> torch.Tensor:
        """x = residual + combined expert output of the previous layer, as leaves."""
        if self.dims.pipeline_depth == 1:
            h_in = leaf(self.records[(2 * layer - 2, mb)].outputs[0])
        else:
            h_in = leaf(self._take("residual", layer - 1, mb)[self._attn_rank(layer - 1, self.role.index)][0])
        rec.inputs = [h_in]
        if not self.moe_layers[layer - 1]:
            return h_in
        received = self._take("combine", layer - 1, mb)
        y_TD = h_in.new_zeros(h_in.shape[0] * h_in.shape[1], self.dim)
        rec.extra["combine_sources"] = sorted(received)
        for f in rec.extra["combine_sources"]:
            rows_nD, token_idx_n = received[f]
            rows_nD = leaf(rows_nD)
            rec.inputs.append(rows_nD)
            y_TD = y_TD.index_add(0, token_idx_n, rows_nD.to(y_TD.dtype))  # bf16 mode: the stream's dtype
        return h_in + y_TD.view_as(h_in)

    def _expert_forward(self, layer: int, mb: int) -> None:
        rec = self.records[(2 * layer + 1, mb)] = StageRecord()
        if not self.moe_layers[layer]:
            return
        received = self._take("dispatch", layer, mb)
        sources = sorted(received)
        xs = [leaf(received[a][0]) for a in sources]
        ws = [leaf(received[a][1]) for a in sources]
        ints = [received[a][2] for a in sources]
        experts = self.model.layers[str(layer)].moe.experts
        out_MD = self.activation_checkpointing.run(layer, run_local_experts, experts, torch.cat(xs), torch.cat(ws),
                                                   torch.cat([i[:, :-1] for i in ints]))
        rec.inputs = [t for pair in zip(xs, ws) for t in pair]
        rec.outputs = list(out_MD.split([x.shape[0] for x in xs]))
        rec.extra.update(sources=sources, token_idx=[i[:, -1] for i in ints])

    def _output_grads(self, stage: int, mb: int, rec: StageRecord) -> list:
        """Gradients of a stage's outputs, from the stage after it (received or local)."""
        layer = stage // 2
        if stage == 2 * self.num_layers:
            return [torch.ones_like(rec.outputs[0])]
        if stage % 2:  # F(l): combine grads from the next attention group
            if not self.moe_layers[layer]:
                return []
            got = self._take("combine_grad", layer, mb)
            return [got[self._attn_rank(layer + 1, self.dims.role(a).index)][0] for a in rec.extra["sources"]]
        if self.dims.pipeline_depth == 1:
            grads = [_grad_or_zeros(self.records[(stage + 2, mb)].inputs[0])]
        else:
            grads = [self._take("residual_grad", layer, mb)[self._attn_rank(layer + 1, self.role.index)][0]]
        if self.moe_layers[layer]:
            got = self._take("dispatch_grad", layer, mb)
            for f in self._expert_ranks(layer):
                grads += got[f]
        return grads

    # ---- transfers -----------------------------------------------------------------------
    def _send_f(self, stage: int, mb: int) -> None:
        layer = stage // 2
        if stage % 2:  # F(l) -> A(l+1): combine
            if self.moe_layers[layer]:
                rec = self.records[(stage, mb)]
                send = {self._attn_rank(layer + 1, self.dims.role(a).index): self._wire([out.detach(), idx])
                        for a, out, idx in zip(rec.extra["sources"], rec.outputs, rec.extra["token_idx"])}
                self.outbox.append(post_sends(send, make_tag(layer, COMBINE, mb), self.device, True,
                                              self.stats, COMBINE))
            return
        rec = self.records[(stage, mb)]
        if self.moe_layers[layer]:  # A(l) -> F(l): dispatch
            send = {f: self._wire([r.x_nD.detach(), r.weights_nK.detach(),
                                   torch.cat([r.local_ids_nK, r.token_idx_n.unsqueeze(1)], dim=1)])
                    for f, r in zip(self._expert_ranks(layer), rec.extra["rows"])}
            self.outbox.append(post_sends(send, make_tag(layer, DISPATCH, mb), self.device, True,
                                          self.stats, DISPATCH))
        if self.dims.pipeline_depth > 1:  # A(l) -> A(l+1): residual
            send = {self._attn_rank(layer + 1, self.role.index): [rec.outputs[0].detach()]}
            self.outbox.append(post_sends(send, make_tag(layer, RESIDUAL, mb), self.device, False,
                                          self.stats, RESIDUAL))

    def _recv_f(self, stage: int, mb: int) -> None:
        start = time.perf_counter()  # forcing earlier receives may wait briefly
        if stage % 2:  # F(l) receives dispatch(l)
            layer = stage // 2
            if self.moe_layers[layer]:
                layout = [((self.dim,), self.wire_dtype), ((self.top_k,), self.wire_dtype),
                          ((self.top_k + 1,), torch.int64)]
                self._post_rows(("dispatch", layer, mb), self._attn_ranks(layer), layout,
                                make_tag(layer, DISPATCH, mb))
        else:  # A(l+1) receives combine(l) and residual(l)
            layer = stage // 2 - 1
            if self.moe_layers[layer]:
                layout = [((self.dim,), self.wire_dtype), ((), torch.int64)]
                self._post_rows(("combine", layer, mb), self._expert_ranks(layer), layout,
                                make_tag(layer, COMBINE, mb))
            if self.dims.pipeline_depth > 1:
                shape = self.tokens[mb].shape if self.tokens is not None else self.labels[mb].shape
                src = self._attn_rank(layer, self.role.index)
                self.inbox[("residual", layer, mb)] = post_recvs_known(
                    {src: [torch.empty(shape + (self.dim,), device=self.device)]},
                    make_tag(layer, RESIDUAL, mb))
        self.times.wait += time.perf_counter() - start

    def _send_b(self, stage: int, mb: int) -> None:
        rec = self.records[(stage, mb)]
        if stage % 2 or self.dims.pipeline_depth > 1:
            del self.records[(stage, mb)]  # sent: nothing reads it any more
        layer = stage // 2
        if stage % 2:  # F(l) -> A(l): dispatch grads
            if self.moe_layers[layer]:
                pairs = zip(rec.inputs[0::2], rec.inputs[1::2])
                send = {a: self._wire([_grad_or_zeros(x), _grad_or_zeros(w)])
                        for a, (x, w) in zip(rec.extra["sources"], pairs)}
                self.outbox.append(post_sends(send, make_tag(layer, DISPATCH_GRAD, mb), self.device, False,
                                              self.stats, DISPATCH_GRAD))
            return
        prev = layer - 1  # A(l) -> F(l-1): combine grads, A(l) -> A(l-1): residual grad
        if self.moe_layers[prev]:
            send = {f: self._wire([_grad_or_zeros(r)])
                    for f, r in zip(rec.extra["combine_sources"], rec.inputs[1:])}
            self.outbox.append(post_sends(send, make_tag(prev, COMBINE_GRAD, mb), self.device, False,
                                          self.stats, COMBINE_GRAD))
        if self.dims.pipeline_depth > 1:
            send = {self._attn_rank(prev, self.role.index): [_grad_or_zeros(rec.inputs[0])]}
            self.outbox.append(post_sends(send, make_tag(prev, RESIDUAL_GRAD, mb), self.device, False,
                                          self.stats, RESIDUAL_GRAD))

    def _recv_b(self, stage: int, mb: int) -> None:
        rec = self.records[(stage, mb)]
        layer = stage // 2
        if stage % 2:  # F(l) receives combine grads from A(l+1)
            if self.moe_layers[layer]:
                recv = {self._attn_rank(layer + 1, self.dims.role(a).index):
                        [torch.empty_like(out, dtype=self.wire_dtype)]
                        for a, out in zip(rec.extra["sources"], rec.outputs)}
                self.inbox[("combine_grad", layer, mb)] = post_recvs_known(recv, make_tag(layer, COMBINE_GRAD, mb))
            return
        if self.moe_layers[layer]:  # A(l) receives dispatch grads from F(l)
            wire = self.wire_dtype
            recv = {f: [torch.empty_like(r.x_nD, dtype=wire), torch.empty_like(r.weights_nK, dtype=wire)]
                    for f, r in zip(self._expert_ranks(layer), rec.extra["rows"])}
            self.inbox[("dispatch_grad", layer, mb)] = post_recvs_known(recv, make_tag(layer, DISPATCH_GRAD, mb))
        if self.dims.pipeline_depth > 1:
            src = self._attn_rank(layer + 1, self.role.index)
            self.inbox[("residual_grad", layer, mb)] = post_recvs_known(
                {src: [torch.empty_like(rec.outputs[0])]}, make_tag(layer, RESIDUAL_GRAD, mb))
