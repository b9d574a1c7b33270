"""KPAC network definition and its architecture config."""

from .config import PAPER_CONFIGS, KPACConfig
from .network import Bottleneck, KPACBlock, KPACNet, build_model, count_parameters
from .transfer import transfer_state

__all__ = ["PAPER_CONFIGS", "Bottleneck", "KPACBlock", "KPACConfig", "KPACNet", "build_model", "count_parameters", "transfer_state"]
