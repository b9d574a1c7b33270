"""Training KPAC networks: the paper's recipe on DPDD, paired folders or synthetic defocus.

Public API::

    from kpac_cli.train import TrainConfig, train, export_model
    result = train(TrainConfig(data=Path("DPDD"), out=Path("runs/l1")), callback=print)

Core only: no typer/rich here; progress is reported through ``callback(TrainEvent)``.
"""

from .config import STAGE_DEFAULTS, CropSchedule, LRSchedule, TrainConfig
from .data import DataError, dpdd_split, folder_pairs
from .loop import ProcessLost, RankFailed, TrainEvent, TrainingError, TrainResult, export_model, train, validate
from .state import CheckpointError, load_state
from .vgg import VGG19Features, VGGWeightsMissing, default_weights_path, find_vgg_weights, load_vgg19

__all__ = [
    "CheckpointError",
    "CropSchedule",
    "LRSchedule",
    "ProcessLost",
    "RankFailed",
    "DataError",
    "STAGE_DEFAULTS",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "TrainingError",
    "VGG19Features",
    "VGGWeightsMissing",
    "default_weights_path",
    "dpdd_split",
    "export_model",
    "find_vgg_weights",
    "folder_pairs",
    "load_state",
    "load_vgg19",
    "train",
    "validate",
]
