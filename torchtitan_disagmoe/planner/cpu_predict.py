"""Step time of real runs on this CPU, predicted from the calibration (``calibrate.py``;
docs/planner.md section 8).

A step is forward/backward plus a tail (gradient reduction, clipping, optimizer, metrics):

- af_pipe: the runtime's own action lists (``programs.schedule_program_per_rank``) are
  replayed by the simulator with every action's CPU time as measured inside the runtime
  (``runtime_trace.py``; without it, the single-thread stage curves x ``stage_scale``)
  at this layout's token counts; before each transfer its ranks post it (a compute op);
  a transfer takes bytes / gloo bandwidth and arrives one gloo latency later (rows go
  with their counts; with ``bounded_rows=False``, NCCL's counts-first protocol: two
  latencies, receives posted in order, ``post_order_deps``), plus a scheduler slice
  when it starts while every core computes, plus the measured extra wait of rows whose
  sender is computing when they would arrive. With FSDP2 over an attention group (dp >
  1, the runtime's default) each A-stage gathers its weights before its first forward
  (prefetched one stage early) and reduce-scatters after its last backward, and FSDP2
  costs CPU in every call (``with_fsdp_ops``; per unit, measured inside runs, else by
  ``runtime_bench.measure_fsdp_af``). The host's cores are shared
  (``simulate(cores=c)``, processor sharing, c the measured capacity for that many
  ranks), by FSDP2's collectives too (``cpu_bound_fn``), and a send posted while the
  other ranks hold every core waits a scheduler slice off them (``blocked_start_fn``).
- colocated EP: every rank runs the same list (per layer: FSDP all-gather, attention,
  all-to-all of counts and rows, experts, all-to-all back; backward reversed with the
  reduce-scatter), collectives blocking on all ranks, cores shared the same way.
- tail: each rank's fixed per-step work and optimizer step (shared cores), the small
  all-reduces the trainer makes per step (loss, gradient norm, routing counts, metrics)
  and, for af_pipe with dp > 1 and replicas (``fsdp=False``), one all-reduce per
  attention parameter tensor.

    from torchtitan_disagmoe.planner.calibrate import calibrate
    from torchtitan_disagmoe.planner.cpu_predict import predict_af_pipe
    predict_af_pipe(calibrate(), attention=2, expert=2, depth=1, microbatches=2, global_batch=8)
"""

import math
from dataclasses import dataclass, field

from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims
from torchtitan_disagmoe.distributed.disagg_model import attention_units

from .calibrate import Calibration, Linear, StageFits, build_model
from .programs import af_dependencies, af_sender_fn, schedule_program_per_rank
from .runtime_trace import expected_rows
from .simulate import Op, is_transfer, simulate

TRAINER_ALL_REDUCES = {"af_pipe": 5, "colocated": 4}
"""Small all-reduces per step outside forward/backward (trainer.optimizer_step and the
layout's step_metrics): af_pipe mean loss, gradient norm, routing counts, 2 x metrics;
colocated the same with one metrics reduction."""


@dataclass
class Prediction:
    name: str
    step_s: float
    forward_backward_s: float
    tail_s: float


@dataclass
class ModelShape:
    """What the prediction needs from the model (from the registry)."""

    n_layers: int
    moe_layers: list[bool]
    dim: int
    top_k: int
    num_experts: int
    attention_params: dict[int, int]
    """layer -> parameters on the attention side (the head's as layer n_layers, embedding as -1)."""
    expert_params: dict[int, int]
    attention_tensors: dict[int, int]
    fsdp_units: dict[int, int] = field(default_factory=dict)
    """A-stage (layer; the head as n_layers) -> FSDP2 units af_pipe makes of it
    (``disagg_model.shard_attention_group``: one per module the runtime calls)."""

    @staticmethod
    def of(name: str = "qwen3_moe", flavor: str = "debug") -> "ModelShape":
        model, args = build_model(name, flavor)
        attn, expert, tensors = {}, {}, {}
        for pname, p in model.named_parameters():
            parts = pname.split(".")
            layer = int(parts[1]) if parts[0] == "layers" else (-1 if parts[0] == "tok_embeddings" else args.n_layers)
            target = expert if ".moe.experts." in pname else attn
            target[layer] = target.get(layer, 0) + p.numel()
            if target is attn:
                tensors[layer] = tensors.get(layer, 0) + 1
        return ModelShape(args.n_layers, [args.is_moe_layer(i) for i in range(args.n_layers)], args.dim,
                          args.moe.top_k, args.moe.num_experts, attn, expert, tensors, _fsdp_units(model))


def _fsdp_units(model) -> dict[int, int]:
    """FSDP2 units per A-stage's layer, as ``shard_attention_group`` makes them."""
    return {stage // 2: len(units) for stage, units in attention_units(model, len(model.layers)).items()}


def scheduler_slice_s(cores: int) -> float:
    """Linux's default EEVDF base slice, 0.75 ms x (1 + log2 cores): how long a woken
    thread may wait for a core that another thread is computing on. A transfer between
    busy ranks waits about half a slice at each end (gloo's sending and receiving
    threads), so one slice in all."""
    return 0.75e-3 * (1 + math.floor(math.log2(max(1, cores))))


def _nearest(fits: dict[int, Linear], key: int) -> Linear:
    return fits[key] if key in fits else fits[min(fits, key=lambda k: abs(k - key))]


def _copies_on_expert_rank(shape: ModelShape, tokens: float, ep: int) -> float:
    return tokens * shape.top_k / ep  # uniform routing: each rank gets 1/ep of the copies


def _rows_per_expert_rank(shape: ModelShape, tokens: float, ep: int) -> float:
    """Expected rows (token, expert rank) one attention rank sends one expert rank."""
    return expected_rows(tokens, shape.num_experts, shape.top_k, ep)


def _tail(cal: Calibration, params_per_rank: list[int], all_reduces: int, world: int,
          extra_s: float = 0.0) -> float:
    """Per-step work after forward/backward: every rank's fixed part and optimizer step
    (the ranks share the cores), the trainer's small all-reduces, ``extra_s``."""
    work = [cal.step_fixed_s + cal.stages.optimizer(n) for n in params_per_rank]
    local_s = max(max(work), sum(work) / cal.capacity_for(len(params_per_rank)))
    return local_s + all_reduces * _comm(cal, world)["all_reduce"] + extra_s


ROW_TRANSFERS = ("dispatch", "combine")
"""Transfers of rows whose number the receiver does not know (``dispatch.RowRecv``)."""


def with_post_ops(programs: dict[int, list[Op]], is_sender=None) -> dict[int, list[Op]]:
    """Insert before each transfer a compute op on every rank that takes part: posting a
    gloo send or receive is work on the rank's own thread (and a send on CPU writes its
    payload there). Named ``post_<transfer>``, or with ``is_sender(op, rank)``
    ``post_send_<transfer>`` / ``post_recv_<transfer>`` (receive posts may wait: see
    ``post_order_deps``)."""
    def post(op, rank):
        if is_sender is None:
            return "post_" + op[0]
        return ("post_send_" if is_sender(op, rank) else "post_recv_") + op[0]
    return {r: [x for op in ops for x in ([(post(op, r), op[1], op[2]), op] if is_transfer(op[0]) else [op])]
            for r, ops in programs.items()}


def post_order_deps(programs: dict[int, list[Op]]) -> dict[Op, list[Op]]:
    """The runtime posts a row receive (``post_recv_dispatch`` / ``post_recv_combine``)
    only after the row counts of every earlier row receive from the same peers have
    arrived (``AFPipeRuntime._post_rows``: per peer, payload receives are posted in the
    order of the sends), so posting waits for the previous row transfer this rank
    receives. (Its counts arrive one latency after its sender posts it, a little before
    its rows; the simulator waits for the rows.) In af_pipe a rank receives each kind of
    row transfer from one pool group, so the peers always overlap."""
    deps: dict[Op, list[Op]] = {}
    for ops in programs.values():
        previous = None
        for op in ops:
            if op[0].startswith("post_recv_") and op[0][10:] in ROW_TRANSFERS:
                if previous is not None:
                    deps.setdefault(op, [])
                    if previous not in deps[op]:
                        deps[op].append(previous)
                previous = (op[0][10:], op[1], op[2])
    return deps


FSDP_GATHER, FSDP_REDUCE = "all_gather_fsdp", "reduce_scatter_fsdp"


def with_fsdp_ops(programs: dict[int, list[Op]], ranks, microbatches: int,
                  prefetch: bool = False) -> tuple[dict[int, list[Op]], dict]:
    """af_pipe's FSDP2 over an attention group (``AFPipeRuntime._backward``): each A-stage
    gathers its weights once per step, for its first forward (micro-batch 0), and reduces
    its gradients once, in its last backward (micro-batch ``microbatches - 1``): insert a
    collective ``all_gather_fsdp`` before the first and ``reduce_scatter_fsdp`` after the
    last on ``ranks``. With ``prefetch`` (the runtime since commit 509c946) the gather of
    a rank's next A-stage is posted as its previous A-stage's first forward starts (the
    first one's at the start of the list), else right before the stage's own first
    forward. Returns the lists and the extra dependencies: the forward waits for the
    gather, the rank's next op for the reduce-scatter (FSDP2 runs it inside the
    backward, blocking on CPU)."""
    out, deps = {}, {}
    for r, ops in programs.items():
        if r not in ranks:
            out[r] = ops
            continue
        firsts = [op[1] for op in ops if op[0] == "attention_forward" and op[2] == 0]
        new = [(FSDP_GATHER, firsts[0], 0)] if prefetch and firsts else []
        for i, op in enumerate(ops):
            name, layer, mb = op
            if name == "attention_forward" and mb == 0:
                deps[op] = [(FSDP_GATHER, layer, 0)]
                if not prefetch:
                    new.append((FSDP_GATHER, layer, 0))
                elif firsts.index(layer) + 1 < len(firsts):
                    new.append((FSDP_GATHER, firsts[firsts.index(layer) + 1], 0))
            new.append(op)
            if name == "attention_backward" and mb == microbatches - 1:
                new.append((FSDP_REDUCE, layer, 0))
                if i + 1 < len(ops):
                    deps.setdefault(ops[i + 1], []).append((FSDP_REDUCE, layer, 0))
        out[r] = new
    return out, deps


def _with_post_deps(deps, extra: dict[Op, list[Op]] | None = None, prefetch: bool = False):
    extra = extra or {}
    def of(op):
        if op[0] == FSDP_GATHER:  # in the stage's first forward, once its inputs are in
            return [] if prefetch else list(deps(("attention_forward", op[1], 0)))
        return [] if op[0].startswith("post_") or op[0] == FSDP_REDUCE else list(deps(op))
    return lambda op: extra.get(op, []) + of(op)


def _fsdp_comm(cal: Calibration, dp: int) -> dict:
    """``measure_fsdp_af`` for the nearest measured group size (empty: not measured)."""
    have = [w for w, c in cal.comm.items() if "fsdp_af_gather" in c]
    return cal.comm[min(have, key=lambda w: abs(w - dp))] if have else {}


def _comm(cal: Calibration, world: int) -> dict:
    return cal.comm[world] if world in cal.comm else cal.comm[min(cal.comm, key=lambda w: abs(w - world))]


def predict_af_pipe(cal: Calibration, attention: int, expert: int, depth: int, microbatches: int,
                    global_batch: int, seq_len: int = 128, shape: ModelShape | None = None,
                    cores: int | None = None, fsdp: bool | None = None, fsdp_prefetch: bool = True,
                    bounded_rows: bool = True) -> Prediction:
    """Predicted step time of an af_pipe run (module docstring); ``global_batch`` sequences.
    ``fsdp``: the attention group shards its weights with FSDP2 (the runtime's default,
    ``parallelism.data_parallel_shard_degree = -1``) rather than keeping replicas; None:
    whenever the group has more than one rank. ``fsdp_prefetch``: the runtime starts each
    gather one A-stage early (since commit 509c946); False: the runtime before that.
    ``bounded_rows``: row receives are posted at once into bounded buffers (the runtime
    on gloo since commit 2d4e909: counts and payload travel together); False: counts
    first, payload receives posted per peer in send order (NCCL's protocol, and gloo's
    before that commit)."""
    shape = shape or ModelShape.of()
    dims = DisaggDims(attention, expert, depth, shape.n_layers, shape.num_experts)
    dims.validate(attention + expert)
    world, dp, ep = attention + expert, dims.dp, dims.ep
    # the runtime's own per-action CPU times where calibrated (runtime_trace.py), else the
    # bare stage functions x the one-process step's scale
    st, posts = (cal.runtime_stages, cal.runtime_posts) if cal.runtime else (cal.stages, {})
    if global_batch % (dp * microbatches):
        raise ValueError(f"global_batch = {global_batch} must split into dp = {dp} x {microbatches} micro-batches")
    tokens = global_batch // dp * seq_len / microbatches  # per attention rank and micro-batch
    comm = _comm(cal, world)
    is_attention = lambda r: r < attention
    sender = af_sender_fn(is_attention, lambda r: dims.role(r).group, depth)
    programs = with_post_ops(schedule_program_per_rank(dims, shape.moe_layers, microbatches), sender)
    extra_deps = {} if bounded_rows else post_order_deps(programs)
    fsdp = fsdp if fsdp is not None else dp > 1
    if fsdp and dp > 1:
        programs, fsdp_deps = with_fsdp_ops(programs, set(range(attention)), microbatches, fsdp_prefetch)
        for op, ds in fsdp_deps.items():
            extra_deps[op] = extra_deps.get(op, []) + ds
    # per unit: the micro-benchmark's, with what the runtime's own runs measured on top
    fsdp_comm = {**_fsdp_comm(cal, dp), **cal.runtime.get("fsdp", {})} if dp > 1 else {}
    # left in a prefetched stage's first forward (calibrations before it was measured: all)
    exposed = fsdp_comm.get("fsdp_af_gather_exposed", fsdp_comm.get("fsdp_af_gather", 0.0))
    scale = 1.0 if cal.runtime else stage_scale(cal, shape)
    row_bytes = {"dispatch": 4 * shape.dim + 4 * shape.top_k + 8 * (shape.top_k + 1), "combine": 4 * shape.dim + 8,
                 "dispatch_grad": 4 * shape.dim + 4 * shape.top_k, "combine_grad": 4 * shape.dim}
    rows = _rows_per_expert_rank(shape, tokens, ep)

    def nbytes(name: str, rank: int) -> float:
        if name.startswith("residual"):
            return tokens * 4 * shape.dim
        return rows * (ep if is_attention(rank) else dp) * row_bytes[name]  # A sends ep blocks, F gets dp

    def duration(op: Op, rank: int) -> float:
        name, layer, _ = op
        if name in posts:  # x = rows the post handles, over all its peers
            return posts[name](rows * (ep if is_attention(rank) else dp))
        if name.startswith("post_"):
            kind = name.removeprefix("post_send_").removeprefix("post_recv_")
            return comm["post"] + (nbytes(kind, rank) / comm["bandwidth"] if name.startswith("post_send_") else 0.0)
        if name in (FSDP_GATHER, FSDP_REDUCE):  # per unit of the stage (runtime_bench.measure_fsdp_af)
            per_unit = fsdp_comm.get("fsdp_af_gather" if name == FSDP_GATHER else "fsdp_af_reduce", 0.0)
            if name == FSDP_GATHER and fsdp_prefetch:  # the part that overlaps; the rest is in the forward
                per_unit -= exposed
            return shape.fsdp_units.get(layer, 0) * max(0.0, per_unit)
        if is_transfer(name):
            return nbytes(name, rank) / comm["bandwidth"]
        hooks = 0.0  # FSDP2's hooks run at every forward and backward of a sharded stage
        if fsdp and dp > 1 and name.startswith("attention"):
            units, per_call = shape.fsdp_units.get(layer, 0), fsdp_comm.get("fsdp_af_hook", 0.0)
            first = name == "attention_forward" and op[2] == 0
            last = name == "attention_backward" and op[2] == microbatches - 1
            # a stage's first forward copies the gathered weights out, its last backward
            # the gradients in: their CPU measured inside runs where calibrated
            if first:
                per_call = fsdp_comm.get("fsdp_af_forward_cpu", per_call)
            elif last:
                per_call = fsdp_comm.get("fsdp_af_backward_cpu", per_call)
            hooks = units * per_call
            if fsdp_prefetch and first:
                hooks += units * exposed
        return scale * _stage_time(st, shape, name, layer, tokens, dp, ep) + hooks

    # gloo's latency between idle ranks, twice for rows when their counts go first; a
    # transfer that starts while every core computes also waits for gloo's threads to
    # get a core: about one scheduler slice (``scheduler_slice_s``)
    rounds = 1 if bounded_rows else 2
    latency = lambda op: comm["latency"] * (rounds if op[0] in ROW_TRANSFERS else 1)
    busy_latency = lambda op: latency(op) + scheduler_slice_s(cal.cores)
    # rows whose sender computes after posting arrive late: the rest of the transfer
    # needs the sender's gloo thread (runtime_bench.measure_row_transfers, per protocol)
    key = "busy_sender_extra" if bounded_rows else "busy_sender_extra_counts_first"
    rows_extra = comm.get(key, _comm(cal, 2).get(key, 0.0))
    sender_busy = lambda op: rows_extra if op[0] in ROW_TRANSFERS else 0.0
    lanes = lambda op, r: "fsdp" if op[0] in (FSDP_GATHER, FSDP_REDUCE) else sender(op, r)  # own connections
    result = simulate(programs, duration,
                      _with_post_deps(af_dependencies(shape.n_layers, shape.moe_layers, depth), extra_deps,
                                      fsdp and fsdp_prefetch),
                      is_sender=lanes, latency_fn=latency, cores=cores or cal.capacity_for(world),
                      busy_latency_fn=busy_latency, busy_at=cal.cores, sender_busy_fn=sender_busy,
                      cpu_bound_fn=lambda op: op[0] in (FSDP_GATHER, FSDP_REDUCE),
                      blocked_start_fn=lambda op: scheduler_slice_s(cal.cores) if op[0].startswith("post_send_") else 0.0)
    params, extra = [], 0.0
    for r in range(world):
        role = dims.role(r)
        layers = dims.layers_of_group(role.group)
        if role.pool == "attention":
            own = layers + ([-1] if role.group == 0 else []) + ([shape.n_layers] if role.group == dims.head_group else [])
            params.append(sum(shape.attention_params.get(layer, 0) for layer in own) // (dp if fsdp else 1))
            if dp > 1 and not fsdp:  # replicas: one all-reduce per gradient tensor
                n = sum(shape.attention_tensors.get(layer, 0) for layer in own)
                extra = max(extra, n * _comm(cal, dp)["all_reduce"])
        else:
            params.append(sum(shape.expert_params.get(layer, 0) for layer in layers) // ep)
    tail = _tail(cal, params, TRAINER_ALL_REDUCES["af_pipe"], world if world in cal.comm else max(cal.comm), extra)
    name = f"af_pipe A{attention} F{expert} p{depth} m{microbatches}"
    return Prediction(name, result.makespan + tail, result.makespan, tail)


def stage_scale(cal: Calibration, shape: ModelShape) -> float:
    """Measured one-process forward/backward of the whole model (``measure_trainer``) over
    the sum of the stage curves for the same tokens: what a step's stages cost beyond
    the curves (0.95-1.0 here since the stages are timed taking turns, median of 7; it
    was 1.2 with best-of-7 back-to-back calls)."""
    tokens, fb = cal.trainer.get("tokens"), cal.trainer.get("forward_backward")
    if not tokens or not fb:
        return 1.0
    ops = [(f"attention_{d}", l) for l in range(shape.n_layers + 1) for d in ("forward", "backward")]
    ops += [(f"expert_{d}", l) for l in range(shape.n_layers) if shape.moe_layers[l] for d in ("forward", "backward")]
    total = sum(_stage_time(cal.stages, shape, name, layer, tokens, 1, 1) for name, layer in ops)
    return fb / total if total > 0 else 1.0


def _stage_time(st: StageFits, shape: ModelShape, name: str, layer: int, tokens: float, dp: int, ep: int) -> float:
    if name.startswith("attention"):
        if layer == shape.n_layers:
            fit = st.head_forward if name.endswith("forward") else st.head_backward
        else:
            fit = _nearest(st.attention_forward if name.endswith("forward") else st.attention_backward, ep)
        return fit(tokens)
    e = shape.num_experts // ep
    fit = _nearest(st.expert_forward if name.endswith("forward") else st.expert_backward, e)
    return fit(_copies_on_expert_rank(shape, tokens * dp, ep))


def colocated_program(n_layers: int) -> list[Op]:
    """One rank's ops in a colocated EP step (FSDP2 per block, all-to-all per MoE layer)."""
    ops: list[Op] = [("all_gather_root", -1, 0)]
    for l in range(n_layers):
        ops += [("all_gather", l, 0), ("attention_forward", l, 0), ("all_to_all_counts", l, 0),
                ("all_to_all_dispatch", l, 0), ("expert_forward", l, 0), ("all_to_all_combine", l, 0)]
    ops += [("attention_forward", n_layers, 0), ("attention_backward", n_layers, 0)]
    for l in reversed(range(n_layers)):
        ops += [("all_gather_bwd", l, 0), ("all_to_all_combine_grad", l, 0), ("expert_backward", l, 0),
                ("all_to_all_dispatch_grad", l, 0), ("attention_backward", l, 0), ("reduce_scatter", l, 0)]
    return ops + [("reduce_scatter_root", -1, 0)]


def predict_colocated(cal: Calibration, world: int, global_batch: int, seq_len: int = 128,
                      shape: ModelShape | None = None, cores: int | None = None) -> Prediction:
    """Predicted step time of colocated EP over ``world`` ranks (EP = FSDP = world)."""
    shape = shape or ModelShape.of()
    if global_batch % world:
        raise ValueError(f"global_batch = {global_batch} must be a multiple of world = {world}")
    tokens, st, comm = global_batch // world * seq_len, cal.stages, _comm(cal, world)
    programs = {r: colocated_program(shape.n_layers) for r in range(world)}
    scale = stage_scale(cal, shape)  # the colocated model runs the bare stage functions
    copy_bytes = tokens * shape.top_k * (world - 1) / world * 4 * shape.dim  # rows leaving the rank

    def duration(op: Op, rank: int) -> float:
        name, layer, _ = op
        if name.startswith("all_to_all"):
            nbytes = 0 if name.endswith("counts") else copy_bytes
            return comm["all_to_all"] + nbytes / comm["bandwidth"]
        if name.startswith(("all_gather", "reduce_scatter")):  # an FSDP unit's 3 collectives
            nbytes = (shape.attention_params.get(layer, 0) + (shape.attention_params.get(shape.n_layers, 0)
                                                             if layer < 0 else 0)) * 4
            return comm["fsdp_unit"] / 3 + nbytes * (world - 1) / world / comm["bandwidth"]
        if name.startswith("expert"):  # every rank gets tokens * K copies on average
            fit = _nearest(st.expert_forward if name.endswith("forward") else st.expert_backward,
                           shape.num_experts // world)
            return scale * fit(tokens * shape.top_k)
        return scale * _stage_time(st, shape, name, layer, tokens, 1, 1)

    result = simulate(programs, duration, blocking=True, cores=cores or cal.capacity_for(world))
    total_attn = sum(shape.attention_params.values())
    params = [(total_attn + sum(shape.expert_params.values())) // world] * world
    dtensors = sum(shape.attention_tensors.values()) + 3 * shape.n_layers  # + w1, w2, w3 per MoE layer
    tail = _tail(cal, params, TRAINER_ALL_REDUCES["colocated"], world if world in cal.comm else max(cal.comm),
                 dtensors * comm.get("fsdp_optimizer_per_tensor", 0.0))
    return Prediction(f"colocated EP world {world}", result.makespan + tail, result.makespan, tail)


AF_GRID = [(a, f, p, m) for a, f, p in ((1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 2, 2))
           for m in (1, 2, 4)]
"""The validation grid: attention 1-2, expert 1-2, p 1-2, micro-batches 1, 2, 4."""
