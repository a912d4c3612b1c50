"""The FL methods, by config name."""
from fl.methods.base import Method, Update
from fl.methods.fedavg import FedAvg
from fl.methods.fedlora import FedLoRA
from fl.methods.flasc import FLASC
from fl.methods.flocora import FLoCoRA
from fl.methods.stc import STC

METHODS = {"fedavg": FedAvg, "flocora": FLoCoRA, "flasc": FLASC, "fedlora": FedLoRA, "stc": STC}

__all__ = ["METHODS", "Method", "Update", "FedAvg", "FLoCoRA", "FLASC", "FedLoRA", "STC"]
