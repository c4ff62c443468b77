"""Drop-in multi-task layers: TAAN's task adaptive layer (TAL), MRN and DMTRL.

Every layer is called as ``layer(x, task)`` (see `Layers._tasks` for the task modes)
and has ``regularization(c)``. The building blocks are public too: `tal_activation` (the
TAAN activation of rows of any tasks, with grouped bases), `rows_linear` / `rows_conv2d`
(per-task weights applied to rows of any tasks).
"""
from .TAL_pytorch import TAL_Linear, TAL_Conv2d, tal_activation
from .MRN_pytorch import MRN_Linear, MRN_Conv2d
from .DMTRL_pytorch import DMTRL_Linear, DMTRL_Conv2d
from ._tasks import rows_conv2d, rows_linear

__all__ = ["TAL_Linear", "TAL_Conv2d", "MRN_Linear", "MRN_Conv2d", "DMTRL_Linear", "DMTRL_Conv2d",
           "tal_activation", "rows_linear", "rows_conv2d"]
