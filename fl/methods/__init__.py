"""The FL methods, by config name."""

from .base import Method, Update
from .fedavg import FedAvg
from .fedlora import FedLoRA
from .flasc import FLASC
from .flocora import FLoCoRA
from .stc import STC

METHODS = {"fedavg": FedAvg, "flocora": FLoCoRA, "flasc": FLASC, "fedlora": FedLoRA, "stc": STC}

__all__ = ["METHODS", "Method", "Update", "FedAvg", "FLoCoRA", "FLASC", "FedLoRA", "STC"]
