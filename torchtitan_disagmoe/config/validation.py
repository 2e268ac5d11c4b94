"""Checks of a job configuration against the launch that span several sections.

``JobConfig.validate`` calls ``validate_job`` before any process group exists, so a bad
combination stops every rank with a message naming the keys and the fix instead of a
hang. One-section checks stay in each section's ``__post_init__``.
"""

from torchtitan_disagmoe.config.job_config import JobConfig


def validate_job(config: JobConfig, world_size: int) -> None:
    """Raise ValueError for a configuration that cannot run on ``world_size`` ranks."""
    from torchtitan_disagmoe.models import get_model_spec  # late: models import config

    spec = get_model_spec(config.model.name)
    args = spec.get_flavor(config.model.flavor)
    args.validate_seq_len(config.training.seq_len)
    par = config.parallelism
    if config.activation_checkpoint.mode != "none":
        if config.compile.enable:
            raise ValueError("activation_checkpoint.mode = "
                             f"{config.activation_checkpoint.mode!r} with compile.enable = true is not supported "
                             "yet; turn one of them off")
        if par.pipeline_parallel_degree > 1 and par.pipeline_parallel_schedule == "DualPipeV":
            raise ValueError("activation checkpointing is not supported with pipeline_parallel_schedule = "
                             "'DualPipeV' (split input/weight backward); use 1F1B or Interleaved1F1B")
    if config.effective_mode(world_size) == "af_pipe":
        _validate_af_pipe(config, args, world_size)
    else:
        _validate_colocated(config, args, world_size)


def _validate_af_pipe(config: JobConfig, args, world_size: int) -> None:
    from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims

    par, dis = config.parallelism, config.disagmoe
    DisaggDims(dis.attention_ranks, dis.expert_ranks, dis.pipeline_depth, args.n_layers,
               args.moe.num_experts, expert_replicas=dis.expert_replicas).validate(world_size)
    config.fsdp_degrees(dis.attention_ranks // dis.pipeline_depth)  # FSDP2 / HSDP inside an attention group
    if config.training.local_batch_size % dis.microbatches:
        raise ValueError(
            f"disagmoe.microbatches = {dis.microbatches} must divide training.local_batch_size = "
            f"{config.training.local_batch_size}")
    if par.pipeline_parallel_degree != 1:
        raise ValueError("parallelism.pipeline_parallel_degree applies to colocated runs; "
                         "af_pipe pipelines with disagmoe.pipeline_depth. Set it to 1")
    if par.expert_parallel_overlap:
        raise ValueError("parallelism.expert_parallel_overlap applies to colocated expert parallelism; "
                         "af_pipe overlaps with its own schedule. Set it to false")


def _validate_colocated(config: JobConfig, args, world_size: int) -> None:
    par = config.parallelism
    pp = par.pipeline_parallel_degree
    if pp > 1:
        par.validate_pipeline(args.n_layers, config.training.local_batch_size, world_size)
        if config.compile.enable and par.pipeline_parallel_schedule == "DualPipeV":
            raise ValueError("compile.enable = true is not supported with pipeline_parallel_schedule = "
                             "'DualPipeV' (split input/weight backward); set compile.enable = false")
    dp = world_size // pp
    if par.data_parallel_replicate_degree > 1 and pp > 1:
        raise ValueError("parallelism.data_parallel_replicate_degree > 1 (HSDP) is not supported with "
                         "pipeline_parallel_degree > 1 yet; set data_parallel_replicate_degree = 1")
    _, shard = config.fsdp_degrees(dp)
    if shard == 1 and dp > 1:
        raise ValueError(
            f"parallelism.data_parallel_shard_degree = 1 over {dp} data-parallel ranks: colocated mode shards "
            f"with FSDP2 (or HSDP); set data_parallel_shard_degree = -1")
    if config.training.mixed_precision_param != "float32" and pp > 1 and dp == 1:
        raise ValueError(
            f"training.mixed_precision_param = {config.training.mixed_precision_param!r} with pipeline parallelism "
            "takes effect through FSDP2, which needs data-parallel ranks (NGPU / pipeline_parallel_degree > 1); "
            "add ranks or set training.mixed_precision_param = 'float32'")
    ep = config.expert_parallel_degree(world_size)
    if dp % ep != 0:
        where = f"NGPU = {world_size}" if pp == 1 else f"NGPU {world_size} / pipeline_parallel_degree {pp}"
        raise ValueError(
            f"parallelism.expert_parallel_degree = {ep} must divide the number of data-parallel ranks ({where})")
    if args.moe.num_experts % ep != 0:
        raise ValueError(
            f"parallelism.expert_parallel_degree = {ep} must divide the "
            f"{args.moe.num_experts} experts of {config.model.name}/{config.model.flavor}")
    if par.expert_parallel_overlap and ep == 1:
        raise ValueError("parallelism.expert_parallel_overlap = true needs parallelism.expert_parallel_degree"
                         " > 1 (there is no all-to-all to overlap); set one of them")
