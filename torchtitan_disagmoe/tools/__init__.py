"""Command-line tools around the trainer (``python -m torchtitan_disagmoe.tools.<name>``).

- ``cluster_in_a_box``: emulated multi-node cluster on one Linux machine (network
  namespaces, veth links with a ``tc`` rate limit calibrated to this CPU's FLOP/s), to run
  training jobs across nodes with a slow inter-node network (docs/cluster_in_a_box.md).
"""
