"""Drop-in multi-task layers: TAAN's task adaptive layer (TAL), MRN and DMTRL.

Every layer is called as ``layer(x, task)`` (see `Layers._tasks` for the task modes)
and has ``regularization(c)``.
"""
from .TAL_pytorch import TAL_Linear, TAL_Conv2d
from .MRN_pytorch import MRN_Linear, MRN_Conv2d
from .DMTRL_pytorch import DMTRL_Linear, DMTRL_Conv2d

__all__ = ["TAL_Linear", "TAL_Conv2d", "MRN_Linear", "MRN_Conv2d", "DMTRL_Linear", "DMTRL_Conv2d"]
