"""The job configuration: one dataclass per TOML section.

These dataclasses are the source of truth for every setting. A TOML file from
``train_configs/`` and ``--section.key value`` CLI arguments only override their defaults
(see ``config/manager.py``). Section and key names follow torchtitan 0.2.2 where the
concept is the same (``[training] local_batch_size``, ``[parallelism]
expert_parallel_degree``, ``[checkpoint] interval``...), plus our ``[disagmoe]`` and
``[moe]`` sections.

Every check that can be made without a process group lives in a ``__post_init__`` (one
section alone) or in ``config/validation.py`` (across sections), and raises ValueError
naming the key, the value and the fix.
"""

from dataclasses import dataclass, field
from typing import Literal


def _check_choice(key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key} = {value!r} is not valid; allowed values: {list(allowed)}")


def _check_positive(key: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{key} = {value!r} must be {bound}")


@dataclass(kw_only=True, slots=True)
class Job:
    config_file: str | None = None
    """TOML job file the other values were read from (set by the loader)."""
    dump_folder: str = "./outputs"
    """Folder for metrics.jsonl, TensorBoard events and checkpoints."""
    description: str = "torchtitan_disagmoe job"
    """Free text, printed at start-up."""
    print_config: bool = False
    """Print the resolved configuration at start-up."""


@dataclass(kw_only=True, slots=True)
class Model:
    name: str = "qwen3_moe"
    """Model family, a key of the model registry (``qwen3_moe``, ``deepseek_moe``)."""
    flavor: str = "debug"
    """Size preset of the family (e.g. ``debug``, ``30B-A3B``)."""
    tokenizer_path: str = ""
    """Directory with tokenizer.json and tokenizer_config.json. Empty: build the
    built-in byte-level BPE tokenizer locally (cached) with the model's vocabulary."""


@dataclass(kw_only=True, slots=True)
class MoE:
    load_balance: Literal["none", "aux_loss", "aux_loss_free", "both"] = "aux_loss_free"
    """How expert load is balanced: ``aux_loss`` adds a sequence-wise balance loss;
    ``aux_loss_free`` nudges a per-expert routing bias after every step (DeepSeek-V3)."""
    aux_loss_coeff: float = 1e-3
    """Weight of the sequence-wise auxiliary balance loss (per MoE layer)."""
    bias_update_rate: float = 1e-3
    """Step size of the aux-loss-free expert-bias update."""
    use_grouped_mm: bool = True
    """Run experts with ``torch._grouped_mm``; false: a per-expert loop (reference)."""

    def __post_init__(self):
        _check_choice("moe.load_balance", self.load_balance,
                      ("none", "aux_loss", "aux_loss_free", "both"))
        _check_positive("moe.aux_loss_coeff", self.aux_loss_coeff, allow_zero=True)
        _check_positive("moe.bias_update_rate", self.bias_update_rate, allow_zero=True)


@dataclass(kw_only=True, slots=True)
class Optimizer:
    name: Literal["AdamW", "Adam"] = "AdamW"
    """Optimizer class."""
    lr: float = 8e-4
    """Peak learning rate."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self):
        _check_choice("optimizer.name", self.name, ("AdamW", "Adam"))
        _check_positive("optimizer.lr", self.lr)
        _check_positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)


@dataclass(kw_only=True, slots=True)
class LRScheduler:
    warmup_steps: int = 2
    """Linear warm-up steps."""
    decay_ratio: float | None = None
    """Fraction of the steps spent decaying; None: decay right after warm-up."""
    decay_type: Literal["linear", "sqrt", "cosine"] = "linear"
    min_lr_factor: float = 0.0
    """The learning rate decays to ``lr * min_lr_factor``."""

    def __post_init__(self):
        _check_positive("lr_scheduler.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_choice("lr_scheduler.decay_type", self.decay_type, ("linear", "sqrt", "cosine"))
        if self.decay_ratio is not None and not 0.0 <= self.decay_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.decay_ratio = {self.decay_ratio} must be in [0, 1]")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_factor = {self.min_lr_factor} must be in [0, 1]")


DATASETS = ("pydoc_topics", "text", "jsonl", "parquet")


@dataclass(kw_only=True, slots=True)
class Training:
    steps: int = 60
    """Optimizer steps to train for."""
    local_batch_size: int = 8
    """Sequences per data-parallel rank per step; global batch = this x dp ranks."""
    seq_len: int = 128
    """Tokens per sequence."""
    seed: int = 0
    """Seed for weights (per parameter name, so every layout gets the same values) and data order."""
    dataset: str = "pydoc_topics"
    """``pydoc_topics`` (built in, no download), ``text``, ``jsonl`` or ``parquet``."""
    dataset_path: str = ""
    """File or directory for the ``text``/``jsonl``/``parquet`` datasets."""
    max_norm: float = 1.0
    """Gradient clipping threshold on the global L2 norm (0 disables clipping)."""
    threads_per_rank: int = 0
    """torch intra-op threads per rank on CPU; 0 means cores // local ranks."""
    mixed_precision_param: Literal["float32", "bfloat16"] = "float32"
    """dtype of weights in forward/backward compute; master weights, gradients and optimizer
    states stay fp32. ``bfloat16``: FSDP2's MixedPrecisionPolicy where weights are sharded,
    torch.autocast where they are not (single process, replicas, expert ranks). Default
    float32 (torchtitan's is bfloat16) so every layout matches the fp32 reference."""
    mixed_precision_reduce: Literal["float32"] = "float32"
    """dtype of FSDP2's gradient reduction (fp32 only)."""
    gc_freq: int = 50
    """Python's automatic garbage collection is off during training; collect every this
    many steps (torchtitan's ``training.gc_freq``)."""
    skip_nonfinite_steps: bool = False
    """NaN/Inf in the loss or a gradient: false stops the run (naming the step, parameters
    and pool; the last checkpoint is kept), true skips that step's update and goes on."""

    def __post_init__(self):
        _check_positive("training.steps", self.steps)
        _check_positive("training.local_batch_size", self.local_batch_size)
        _check_positive("training.seq_len", self.seq_len)
        _check_positive("training.max_norm", self.max_norm, allow_zero=True)
        _check_positive("training.threads_per_rank", self.threads_per_rank, allow_zero=True)
        _check_positive("training.gc_freq", self.gc_freq)
        _check_choice("training.dataset", self.dataset, DATASETS)
        _check_choice("training.mixed_precision_param", self.mixed_precision_param, ("float32", "bfloat16"))
        _check_choice("training.mixed_precision_reduce", self.mixed_precision_reduce, ("float32",))
        if self.dataset == "pydoc_topics" and self.dataset_path:
            raise ValueError(
                "training.dataset_path is set but training.dataset = 'pydoc_topics' (built in); "
                "set training.dataset to 'text', 'jsonl' or 'parquet' to read your files")
        if self.dataset != "pydoc_topics" and not self.dataset_path:
            raise ValueError(
                f"training.dataset = {self.dataset!r} needs training.dataset_path (a file or directory)")


PIPELINE_SCHEDULES = ("1F1B", "Interleaved1F1B", "DualPipeV")
SINGLE_STAGE_SCHEDULES = ("1F1B",)


@dataclass(kw_only=True, slots=True)
class Parallelism:
    data_parallel_shard_degree: int = -1
    """FSDP2 degree over the data-parallel ranks; -1: all of them (divided by
    ``data_parallel_replicate_degree``). af_pipe: -1 shards the attention weights over each
    attention group, 1 keeps replicas (all-reduce)."""
    data_parallel_replicate_degree: int = 1
    """Replica groups of HSDP: FSDP2 shards over ``data_parallel_shard_degree`` ranks and
    replicates over this many (product = data-parallel ranks; af_pipe: an attention group)."""
    expert_parallel_degree: int = 1
    """Ranks the experts of each MoE layer are sharded over (colocated mode); -1: all
    data-parallel ranks (so one job file runs on any NGPU that divides the experts)."""
    expert_parallel_overlap: bool = False
    """Colocated EP only: split each MoE layer's tokens into ``expert_parallel_overlap_chunks``
    chunks and overlap the all-to-all of one chunk with the expert compute of another, and
    the shared experts with the combine (forward and backward). Same numbers as off."""
    expert_parallel_overlap_chunks: int = 2
    """Token chunks per MoE layer when ``expert_parallel_overlap`` is on."""
    pipeline_parallel_degree: int = 1
    """Pipeline ranks for colocated runs (1: no pipeline parallelism); the other factor of
    the world size is data parallelism (FSDP2 and EP within each pipeline rank)."""
    pipeline_parallel_schedule: str = "1F1B"
    """Schedule of the colocated pipeline (torch.distributed.pipelining): ``1F1B`` (one
    stage per rank), ``Interleaved1F1B`` (looped, >= 2 stages per rank) or ``DualPipeV``
    (two stages per rank in a V)."""
    pipeline_parallel_layers_per_stage: int = 0
    """Transformer layers per (virtual) pipeline stage; 0: layers / (pp x stages per rank)
    with 1 stage per rank for 1F1B and 2 for Interleaved1F1B and DualPipeV. The embedding
    goes with the first stage, the final norm and output head with the last."""
    pipeline_parallel_microbatch_size: int = 1
    """Sequences per pipeline micro-batch; micro-batches per step = local_batch_size / this."""

    def __post_init__(self):
        if self.data_parallel_shard_degree == 0 or self.data_parallel_shard_degree < -1:
            raise ValueError(
                f"parallelism.data_parallel_shard_degree = {self.data_parallel_shard_degree} "
                "must be -1 (all data-parallel ranks) or a positive rank count")
        _check_positive("parallelism.data_parallel_replicate_degree", self.data_parallel_replicate_degree)
        if self.expert_parallel_degree == 0 or self.expert_parallel_degree < -1:
            raise ValueError(
                f"parallelism.expert_parallel_degree = {self.expert_parallel_degree} "
                "must be -1 (all ranks) or a positive rank count")
        _check_positive("parallelism.expert_parallel_overlap_chunks", self.expert_parallel_overlap_chunks)
        _check_positive("parallelism.pipeline_parallel_degree", self.pipeline_parallel_degree)
        _check_choice("parallelism.pipeline_parallel_schedule",
                      self.pipeline_parallel_schedule, PIPELINE_SCHEDULES)
        _check_positive("parallelism.pipeline_parallel_layers_per_stage", self.pipeline_parallel_layers_per_stage,
                        allow_zero=True)
        _check_positive("parallelism.pipeline_parallel_microbatch_size", self.pipeline_parallel_microbatch_size)

    def stages_per_rank(self, n_layers: int) -> int:
        """Pipeline stages each rank holds (virtual stages), from the schedule and layers."""
        if self.pipeline_parallel_layers_per_stage == 0:
            return 1 if self.pipeline_parallel_schedule in SINGLE_STAGE_SCHEDULES else 2
        return n_layers // self.pipeline_parallel_layers_per_stage // self.pipeline_parallel_degree

    def validate_pipeline(self, n_layers: int, local_batch_size: int, world_size: int) -> None:
        """Checks of the colocated pipeline against the model, batch and world size."""
        pp, schedule = self.pipeline_parallel_degree, self.pipeline_parallel_schedule
        if world_size % pp:
            raise ValueError(f"parallelism.pipeline_parallel_degree = {pp} must divide the number of ranks "
                             f"(NGPU = {world_size})")
        per_rank = self.stages_per_rank(n_layers)
        stages = pp * per_rank
        lps = self.pipeline_parallel_layers_per_stage or n_layers // max(stages, 1)
        if per_rank < 1 or lps < 1 or lps * stages != n_layers:
            raise ValueError(
                f"the model's {n_layers} layers do not split into pipeline_parallel_degree = {pp} x "
                f"{max(per_rank, 0)} stages per rank ({schedule}) with parallelism.pipeline_parallel_layers_per_stage"
                f" = {self.pipeline_parallel_layers_per_stage}; pick a layers per stage that divides "
                f"{n_layers} into a multiple of {pp} stages")
        if schedule in SINGLE_STAGE_SCHEDULES and per_rank != 1:
            raise ValueError(f"parallelism.pipeline_parallel_schedule = {schedule!r} runs 1 stage per rank, but "
                             f"pipeline_parallel_layers_per_stage = {lps} gives {per_rank}; use Interleaved1F1B")
        if schedule == "Interleaved1F1B" and per_rank < 2:
            raise ValueError(f"parallelism.pipeline_parallel_schedule = 'Interleaved1F1B' needs >= 2 stages per "
                             f"rank, but pipeline_parallel_layers_per_stage = {lps} gives {per_rank}")
        if schedule == "DualPipeV" and per_rank != 2:
            raise ValueError(f"parallelism.pipeline_parallel_schedule = 'DualPipeV' needs exactly 2 stages per "
                             f"rank, but pipeline_parallel_layers_per_stage = {lps} gives {per_rank}")
        mbs = self.pipeline_parallel_microbatch_size
        if local_batch_size % mbs:
            raise ValueError(f"parallelism.pipeline_parallel_microbatch_size = {mbs} must divide "
                             f"training.local_batch_size = {local_batch_size}")
        microbatches = local_batch_size // mbs
        if schedule == "Interleaved1F1B" and microbatches > pp and microbatches % pp:
            raise ValueError(f"parallelism.pipeline_parallel_schedule = 'Interleaved1F1B' runs micro-batches in "
                             f"rounds of pipeline_parallel_degree = {pp}: {microbatches} micro-batches "
                             f"(training.local_batch_size / parallelism.pipeline_parallel_microbatch_size) must be "
                             f"a multiple of {pp}")
        if schedule == "DualPipeV" and microbatches < stages:
            raise ValueError(f"parallelism.pipeline_parallel_schedule = 'DualPipeV' needs at least as many "
                             f"micro-batches as stages ({stages}), got {microbatches} (training.local_batch_size / "
                             f"parallelism.pipeline_parallel_microbatch_size)")


@dataclass(kw_only=True, slots=True)
class DisagMoE:
    mode: Literal["colocated", "af_pipe"] = "colocated"
    """``colocated``: every rank holds attention and a slice of experts (EP baseline).
    ``af_pipe``: attention and experts on disjoint rank pools (DESIGN.md section 2)."""
    attention_ranks: int = 0
    """Ranks in the attention pool (af_pipe)."""
    expert_ranks: int = 0
    """Ranks in the expert pool (af_pipe)."""
    pipeline_depth: int = 1
    """Groups p per pool; group g owns layers g, g+p, ... (af_pipe)."""
    microbatches: int = 1
    """Micro-batches per step (af_pipe); must divide training.local_batch_size."""
    expert_replicas: int = 1
    """Copies of each expert inside an expert group (edp): the group's ranks form edp rows
    of expert_ranks / pipeline_depth / expert_replicas ranks, each row holding all the
    layer's experts sharded (EP); attention rank d dispatches to row d mod edp, and
    replicas' expert gradients are summed. 1: pure expert parallelism inside the group."""
    max_inflight: int = 0
    """Micro-batches allowed between their first forward and last backward, which bounds
    activation memory (af_pipe); 0: no bound beyond ``microbatches``."""

    transfer_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the hidden states and gradients in dispatch and combine (and their
    gradients): ``bfloat16`` halves those bytes; compute and the residual stream stay fp32."""

    def __post_init__(self):
        _check_choice("disagmoe.mode", self.mode, ("colocated", "af_pipe"))
        _check_positive("disagmoe.attention_ranks", self.attention_ranks, allow_zero=True)
        _check_positive("disagmoe.expert_ranks", self.expert_ranks, allow_zero=True)
        _check_positive("disagmoe.pipeline_depth", self.pipeline_depth)
        _check_positive("disagmoe.microbatches", self.microbatches)
        _check_positive("disagmoe.max_inflight", self.max_inflight, allow_zero=True)
        _check_positive("disagmoe.expert_replicas", self.expert_replicas)
        _check_choice("disagmoe.transfer_dtype", self.transfer_dtype, ("float32", "bfloat16"))


@dataclass(kw_only=True, slots=True)
class Compile:
    enable: bool = False
    """torch.compile: each transformer block (colocated), or per af_pipe stage the parts
    named in ``components``."""
    components: list[str] = field(default_factory=lambda: ["attention", "experts"])
    """af_pipe: ``attention`` (each A-stage's attention, shared experts and dense FFN) and/or
    ``experts`` (each F-stage's grouped experts), compiled separately, dynamic shapes."""

    def __post_init__(self):
        for component in self.components:
            _check_choice("compile.components", component, ("attention", "experts"))


@dataclass(kw_only=True, slots=True)
class Checkpoint:
    enable: bool = False
    """Save DCP checkpoints and resume from the latest one in ``folder``."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to ``job.dump_folder``."""
    interval: int = 50
    """Save every this many steps (and at the last step)."""
    keep_latest_k: int = 0
    """Keep only the newest k checkpoints (0 keeps all)."""
    initial_load_path: str = ""
    """Start from the weights in this folder (a DCP checkpoint, or an HF model folder with
    ``initial_load_in_hf``) when there is no checkpoint in ``folder`` to resume from; works
    with ``enable = false`` too (model only). Empty: start from the seeded initialisation."""
    initial_load_in_hf: bool = False
    """``initial_load_path`` holds Hugging Face safetensors (``*.safetensors``), read through
    torchtitan's state-dict adapter of the model family."""
    initial_load_model_only: bool = True
    """Load only the model from ``initial_load_path``; false also restores optimizer, LR
    schedule, data position and step (DCP checkpoints with ``enable = true`` only)."""

    def __post_init__(self):
        import os

        _check_positive("checkpoint.interval", self.interval)
        _check_positive("checkpoint.keep_latest_k", self.keep_latest_k, allow_zero=True)
        if self.initial_load_in_hf and not self.initial_load_path:
            raise ValueError("checkpoint.initial_load_in_hf = true needs checkpoint.initial_load_path = the HF "
                             "model folder (with *.safetensors)")
        if self.initial_load_path and not os.path.isdir(self.initial_load_path):
            raise ValueError(f"checkpoint.initial_load_path = {self.initial_load_path!r} is not a folder; give "
                             "the folder of a DCP checkpoint (step-N) or of an HF model (*.safetensors)")
        if self.initial_load_in_hf and not self.initial_load_model_only:
            raise ValueError("checkpoint.initial_load_in_hf = true loads weights only; set "
                             "checkpoint.initial_load_model_only = true")
        if self.initial_load_path and not self.initial_load_model_only and not self.enable:
            raise ValueError("checkpoint.initial_load_model_only = false restores training state, which needs "
                             "checkpoint.enable = true; enable checkpointing or load the model only")


@dataclass(kw_only=True, slots=True)
class Metrics:
    log_freq: int = 1
    """Log every this many steps (and the last step)."""
    enable_tensorboard: bool = True
    """Write TensorBoard events under ``<dump_folder>/tb``."""
    peak_flops: float = 0.0
    """Peak FLOP/s per rank for MFU; 0: known GPU table, or measured on CPU."""
    timeline_step: int = 0
    """af_pipe: write every rank's action timeline of this step to
    ``<dump_folder>/timeline/`` (draw it with scripts/plot_timeline.py); 0: never."""
    memory_tracking_step: int = 0
    """Run this step under torch's MemTracker and log its peak memory per pool by category
    (``tracked_*_mib``; components/memory_tracking.py). The step runs about 3x slower; 0: never."""
    enable_profiler: bool = False
    """Also record a torch.profiler chrome trace per rank of ``timeline_step``."""

    def __post_init__(self):
        _check_positive("metrics.log_freq", self.log_freq)
        _check_positive("metrics.peak_flops", self.peak_flops, allow_zero=True)
        _check_positive("metrics.timeline_step", self.timeline_step, allow_zero=True)
        _check_positive("metrics.memory_tracking_step", self.memory_tracking_step, allow_zero=True)


@dataclass(kw_only=True, slots=True)
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: ``full`` every layer (af_pipe:
    every A- and F-stage), ``selective`` per ``selective_ac_option``."""
    selective_ac_option: str = "op"
    """``op``: every layer, keeping matmul and attention outputs (recompute the cheap ops);
    an integer N: every N-th layer."""

    def __post_init__(self):
        _check_choice("activation_checkpoint.mode", self.mode, ("none", "full", "selective"))
        option = self.selective_ac_option
        if option != "op" and not (option.isdigit() and int(option) > 0):
            raise ValueError(f"activation_checkpoint.selective_ac_option = {option!r} must be 'op' or a "
                             "positive integer N (checkpoint every N-th layer)")


@dataclass(kw_only=True, slots=True)
class Comm:
    init_timeout_seconds: float = 300.0
    """Timeout of process-group start-up and of the first step (warm-up, compilation)."""
    train_timeout_seconds: float = 100.0
    """Timeout of every later transfer and collective: a rank waiting longer on a peer
    stops the job with a report naming the peer."""
    heartbeat_seconds: float = 1.0
    """How often each rank publishes what it is doing to the job's store, so a failure
    report can name the rank that died and its last action; 0 disables heartbeats and the
    hang watchdog."""

    def __post_init__(self):
        _check_positive("comm.init_timeout_seconds", self.init_timeout_seconds)
        _check_positive("comm.train_timeout_seconds", self.train_timeout_seconds)
        _check_positive("comm.heartbeat_seconds", self.heartbeat_seconds, allow_zero=True)


@dataclass(kw_only=True, slots=True)
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    moe: MoE = field(default_factory=MoE)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    disagmoe: DisagMoE = field(default_factory=DisagMoE)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    comm: Comm = field(default_factory=Comm)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)

    def effective_mode(self, world_size: int) -> str:
        """``disagmoe.mode``, except that one rank cannot be split into two pools: a
        single-rank af_pipe job runs the single-process reference (the trainer says so)."""
        return "colocated" if world_size == 1 else self.disagmoe.mode

    def expert_parallel_degree(self, world_size: int) -> int:
        """The expert-parallel degree with -1 resolved to the data-parallel ranks
        (``world_size / pipeline_parallel_degree``)."""
        ep = self.parallelism.expert_parallel_degree
        return world_size // self.parallelism.pipeline_parallel_degree if ep == -1 else ep

    def validate(self, world_size: int) -> None:
        """Cross-section checks against the launch (``NGPU`` = ``world_size``); call before
        any process group exists. The checks live in ``config/validation.py``."""
        from torchtitan_disagmoe.config.validation import validate_job

        validate_job(self, world_size)

    def fsdp_degrees(self, dp: int) -> tuple[int, int]:
        """(replicate, shard) degrees of FSDP2/HSDP over ``dp`` data-parallel ranks; shard
        1 means plain replicas. Raises ValueError naming the keys."""
        par = self.parallelism
        r, s = par.data_parallel_replicate_degree, par.data_parallel_shard_degree
        if dp % r:
            raise ValueError(f"parallelism.data_parallel_replicate_degree = {r} must divide the {dp} "
                             "data-parallel ranks")
        s = dp // r if s == -1 else s
        if s == 1 and r == 1:
            return dp, 1  # plain replicas on every rank
        if r * s != dp:
            raise ValueError(f"parallelism.data_parallel_shard_degree = {s} x parallelism.data_parallel_replicate_degree "
                             f"= {r} must equal the {dp} data-parallel ranks; set data_parallel_shard_degree = -1 "
                             f"(= {dp // r})")
        return r, s
