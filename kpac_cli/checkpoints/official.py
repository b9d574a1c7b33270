"""Import the authors' released TensorLayer checkpoints (``single_2level.npz`` etc.).

Their format: a zip with one member ``params.npy`` holding a 1-D NumPy *object* array of
float32 arrays in the order the TensorFlow variables were created; assignment is purely
positional. An object array can only be stored as a pickle, so reading it means
unpickling - which can run arbitrary code. :func:`read_official_npz` therefore uses a
restricted unpickler that admits only the three NumPy globals needed to rebuild plain
arrays and refuses everything else with :class:`UnsafeCheckpointError`.

Layouts: convolution weights are HWIO, transposed-convolution weights (kh, kw, out, in);
both map onto PyTorch with ``transpose(3, 2, 0, 1)`` and no kernel flip.
"""

from __future__ import annotations

import ast
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..model import PAPER_CONFIGS, KPACConfig, KPACNet, build_model


class UnsafeCheckpointError(ValueError):
    """The file asks the unpickler for something other than plain NumPy arrays."""


class CheckpointMismatchError(ValueError):
    """The arrays do not fit any known architecture (or the declared one)."""


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),  # spelling used by files re-saved with NumPy 2
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"refusing to load {module}.{name}: an official KPAC checkpoint holds only NumPy arrays"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):  # pragma: no cover - never in a valid file
        raise UnsafeCheckpointError("refusing persistent ids in an official KPAC checkpoint")


def _parse_npy_header(f: io.BufferedIOBase) -> dict:
    magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise CheckpointMismatchError("params.npy is not a .npy file")
    version = f.read(2)
    if len(version) != 2 or version[0] not in (1, 2, 3):
        raise CheckpointMismatchError("params.npy has a malformed header (unknown .npy version)")
    size = 2 if version[0] == 1 else 4
    length = f.read(size)
    if len(length) != size:
        raise CheckpointMismatchError("params.npy has a malformed header (truncated)")
    hlen = int.from_bytes(length, "little")
    text = f.read(hlen)
    if len(text) != hlen:
        raise CheckpointMismatchError("params.npy has a malformed header (truncated)")
    header = ast.literal_eval(text.decode("latin1"))
    if not isinstance(header, dict) or {"descr", "fortran_order", "shape"} - set(header):
        raise CheckpointMismatchError("params.npy has a malformed header")
    return header


def _unreadable_zip_error(path: Path, error: Exception) -> CheckpointMismatchError:
    """Why ``path`` did not open as a zip: a Git LFS pointer, a zip cut short (its directory is
    at the end, so an incomplete download loses it), or not a zip at all."""
    from .safetensors_io import _is_cut_short_zip, is_lfs_pointer, lfs_pointer_error  # that module imports this one

    if is_lfs_pointer(path):
        return lfs_pointer_error(path)
    if isinstance(error, zipfile.BadZipFile) and _is_cut_short_zip(path):
        return CheckpointMismatchError(f"{path}: truncated or damaged .npz (it starts as a zip, but the zip's directory "
                                       "at its end is missing or unreadable): an incomplete download or copy?")
    return CheckpointMismatchError(f"{path}: not an official KPAC .npz checkpoint ({error})")


def read_official_npz(path: str | Path) -> list[np.ndarray]:
    """Read the positional list of float32 arrays from an authors' ``.npz`` checkpoint.

    Never executes pickle code beyond rebuilding NumPy arrays. Raises
    :class:`UnsafeCheckpointError` for a crafted pickle and :class:`CheckpointMismatchError`
    for anything that is not such a checkpoint.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _unreadable_zip_error(path, e) from None
    with zf:
        if "params.npy" not in zf.namelist():
            raise CheckpointMismatchError(f"{path}: no 'params.npy' member (found {zf.namelist()[:5]})")
        stored_bytes = zf.getinfo("params.npy").file_size
        try:
            f = zf.open("params.npy")
        except (RuntimeError, NotImplementedError, zipfile.BadZipFile) as e:  # encrypted, unknown compression
            raise CheckpointMismatchError(f"{path}: unreadable params.npy ({e})") from None
        with f:
            try:
                header = _parse_npy_header(f)
            except CheckpointMismatchError as e:
                raise CheckpointMismatchError(f"{path}: {e}") from None
            except (ValueError, SyntaxError, MemoryError, RecursionError, zipfile.BadZipFile, EOFError) as e:
                raise CheckpointMismatchError(f"{path}: params.npy has a malformed header ({type(e).__name__}: {e})") from None
            if header["descr"] == "|O":
                try:
                    obj = _ArraysOnlyUnpickler(f, encoding="latin1").load()
                except UnsafeCheckpointError as e:
                    raise UnsafeCheckpointError(f"{path}: {e}") from None
                except Exception as e:  # truncated or corrupt pickle stream
                    raise CheckpointMismatchError(f"{path}: corrupt params.npy ({type(e).__name__}: {e})") from None
            else:
                raise CheckpointMismatchError(f"{path}: params.npy is not an object array (descr {header['descr']!r})")
    # The authors' files hold a 1-D object array; a list is what an older NumPy may give back.
    items = list(obj) if isinstance(obj, np.ndarray) and obj.ndim == 1 else obj
    if not isinstance(items, list) or not all(isinstance(a, np.ndarray) for a in items):
        raise CheckpointMismatchError(f"{path}: params.npy does not hold a list of arrays")
    # Every array's values are stored in the pickle itself, so together they cannot exceed it. A
    # crafted pickle can declare an array without its data (a zero-stride view of a few bytes,
    # or one never filled): refused here, before anything is copied out of it.
    claimed = 0
    for i, a in enumerate(items):
        claimed += a.nbytes
        if claimed > stored_bytes:
            raise CheckpointMismatchError(f"{path}: params.npy item {i} (shape {a.shape}) declares more data than "
                                          f"params.npy holds ({stored_bytes:,} bytes)")
    arrays = []
    for i, a in enumerate(items):
        # Integer, complex or text items would be cast into weights that only make black images.
        if a.dtype.kind != "f":
            raise CheckpointMismatchError(f"{path}: params.npy item {i} (shape {a.shape}) holds {a.dtype} values, not floating-point weights")
        with np.errstate(over="ignore"):  # a float64 value beyond float32 becomes inf, refused next
            a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise CheckpointMismatchError(f"{path}: params.npy item {i} (shape {a.shape}) holds non-finite values (NaN or infinity)")
        arrays.append(a)
    return arrays


def _tf_shape(param_name: str, p: torch.Tensor) -> tuple[int, ...]:
    """The shape the authors' checkpoint stores for one of our parameters."""
    if p.ndim == 4:
        return tuple(p.permute(2, 3, 1, 0).shape)  # OIHW -> HWIO; (in,out,kh,kw) -> (kh,kw,out,in)
    return tuple(p.shape)


def detect_config(arrays: list[np.ndarray]) -> KPACConfig:
    """Find the paper configuration whose parameter list matches these arrays' shapes."""
    shapes = [tuple(a.shape) for a in arrays]
    # Only what the authors released: a 2-level dual-pixel network has a consistent parameter
    # list too, but no such checkpoint exists, so a file of that shape is not theirs.
    for cfg in PAPER_CONFIGS.values():
        model = build_model(cfg)
        expected = [_tf_shape(n, p) for n, p in model.named_parameters()]
        if expected == shapes:
            return cfg
    raise CheckpointMismatchError(
        f"the {len(arrays)} arrays (first shape {shapes[0] if shapes else None}) match none of the "
        "authors' released variants (2-level, 3-level, dual)"
    )


def model_from_official_arrays(arrays: list[np.ndarray], config: KPACConfig | None = None) -> KPACNet:
    """Build a model and assign the arrays positionally, as the authors' loader does."""
    config = config or detect_config(arrays)
    model = build_model(config)
    params = list(model.named_parameters())
    if len(params) != len(arrays):
        raise CheckpointMismatchError(f"expected {len(params)} arrays for {config}, got {len(arrays)}")
    with torch.no_grad():
        for i, ((name, p), a) in enumerate(zip(params, arrays)):
            expected = _tf_shape(name, p)  # both shapes in the file's layout, so they compare
            if tuple(a.shape) != expected:
                raise CheckpointMismatchError(f"array {i} ({name}) has shape {tuple(a.shape)}, expected {expected} "
                                              f"for {config.to_json()}")
            t = torch.from_numpy(a)
            p.copy_(t.permute(3, 2, 0, 1) if p.ndim == 4 else t)
    return model.eval()


def load_official_npz(path: str | Path) -> KPACNet:
    arrays = read_official_npz(path)
    try:
        return model_from_official_arrays(arrays)
    except CheckpointMismatchError as e:  # named, as the reader's own errors are
        raise CheckpointMismatchError(f"{path}: {e}") from None
