"""Checkpoint I/O: kpac safetensors files, the authors' .npz format, the shipped-model registry."""

from .official import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    detect_config,
    load_official_npz,
    model_from_official_arrays,
    read_official_npz,
)
from .safetensors_io import Checkpoint, load_checkpoint, load_state_dict_checked, read_metadata, save_checkpoint, update_provenance

__all__ = [
    "Checkpoint",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "detect_config",
    "load_checkpoint",
    "load_official_npz",
    "load_state_dict_checked",
    "model_from_official_arrays",
    "read_metadata",
    "read_official_npz",
    "save_checkpoint",
    "update_provenance",
]
