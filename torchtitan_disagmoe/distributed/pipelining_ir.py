"""The one place that imports torch.distributed.pipelining's private schedule IR.

We reuse the library's action IR (``_Action``: stage, computation type, micro-batch), its
lowering of compute-only schedules into send/recv actions (``_add_send_recv``), its dry-run
deadlock check (``_simulate_comms_compute``) and its rank x step grid printer
(``_format_pipeline_order``). These are private APIs: if a torch upgrade moves them, this
module is the only one to fix.
"""

from torch.distributed.pipelining.schedules import (  # noqa: F401
    _Action,
    _add_send_recv,
    _ComputationType,
    _format_pipeline_order,
    _simulate_comms_compute,
)

FORWARD = _ComputationType.FORWARD
BACKWARD = _ComputationType.FULL_BACKWARD
SEND_F = _ComputationType.SEND_F
RECV_F = _ComputationType.RECV_F
SEND_B = _ComputationType.SEND_B
RECV_B = _ComputationType.RECV_B

__all__ = ["_Action", "_add_send_recv", "_format_pipeline_order", "_simulate_comms_compute",
           "FORWARD", "BACKWARD", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]
