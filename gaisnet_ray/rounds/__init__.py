"""One round of training as a Ray-free state machine (``RoundScheduler``) and its typed metrics
(``RoundMetrics``): the Ray driver and the in-process runtime both carry out its decisions."""

from .actions import BeginEdge, DropTurn, FinishEdge, Move, RestartHost, StartTurn, Turn
from .metrics import FaultReport, RoundMetrics
from .scheduler import RoundFailedError, RoundScheduler

__all__ = [
    "BeginEdge", "DropTurn", "FaultReport", "FinishEdge", "Move", "RestartHost", "RoundFailedError",
    "RoundMetrics", "RoundScheduler", "StartTurn", "Turn",
]
