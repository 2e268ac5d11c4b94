"""The planner: a computation-communication roofline model, a search over AF-Pipe
layouts, colocated-EP baselines on the same cluster, and a discrete-event simulator that
replays the runtime's schedules. Pure Python; models come from the training registry.

    python -m torchtitan_disagmoe.planner --model qwen3_moe --flavor 235B-A22B \\
        --cluster h800 --nodes 16 --seq-len 4096 [--json] [--plot roofline.png]

Modules: clusters (hardware presets), this_machine (micro-benchmarks), models (registry +
planner-only GPT-OSS), routing (distinct expert ranks per token), cost (FLOPs, times,
bytes), memory, af_pipe (AF-Pipe step estimate), baselines (EP 1F1B / overlap /
DualPipe), search (two-phase search, ``plan``), simulate (discrete-event simulator),
programs (schedule -> simulator inputs), timeline, roofline_plot, report, __main__ (CLI).
See docs/planner.md.
"""
