"""kpac's one checkpoint format: safetensors weights + config + provenance in the metadata.

Loading never unpickles anything. The metadata (all strings, as safetensors requires):

* ``format``: ``"kpac"``, and ``format_version`` (a file of a newer format is refused, saying
  to upgrade kpac, rather than read as if it were of this one)
* ``config``: the :class:`~kpac_cli.model.KPACConfig` as JSON - the model is built from it
* ``provenance``: JSON, free-form but conventionally ``name``, ``description``,
  ``trained_on``, ``iterations``, ``scores``, ``kpac_version``, ``source``

A ``.pt``/``.pth`` file from elsewhere is accepted only through ``torch.load(weights_only=True)``
and must hold a state dict plus a ``config`` entry; nothing else is trusted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from safetensors import safe_open

from .. import __version__
from ..images import atomic_write_bytes
from ..model import KPACConfig, KPACNet, build_model
from .official import CheckpointMismatchError

FORMAT = "kpac"
FORMAT_VERSION = "1"
_LFS_POINTER = b"version https://git-lfs"


@dataclass
class Checkpoint:
    """A model's config, weights and provenance, as stored in one file."""

    config: KPACConfig
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from (named in error messages)

    def build(self, dtype: torch.dtype = torch.float32) -> KPACNet:
        """The network with these weights, in eval mode, on the CPU, its parameters of ``dtype``
        (the file's own type does not matter). Inputs and outputs: see :meth:`KPACNet.forward`
        ([-1, 1] NCHW; :class:`kpac_cli.engine.Deblurrer` takes images in [0, 1])."""
        try:
            # shapes first: a config that disagrees with the weights (channels 4800 for 48, say)
            # is refused before its network is allocated
            _check_all_tensors(self.state_dict)
            stored = {k: tuple(v.shape) for k, v in self.state_dict.items()}
            _check_shapes(self.config, _declared_shapes(self.config, len(stored)), stored)
            model = build_model(self.config)
            load_state_dict_checked(model, self.state_dict)
        except CheckpointMismatchError as e:
            if self.path is None:
                raise
            raise CheckpointMismatchError(f"{self.path}: {e}") from None
        return model.to(dtype).eval()


def load_state_dict_checked(model: KPACNet, state: dict[str, torch.Tensor]) -> None:
    """Load weights, turning any mismatch into one clear error instead of a PyTorch traceback."""
    _check_all_tensors(state)
    own = dict(model.state_dict())
    _check_shapes(model.config, {k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _check_all_tensors(state: dict[str, Any]) -> None:
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointMismatchError(f"{len(not_tensors)} entries are not tensors (e.g. {not_tensors[0]!r})")


def _config_text(config: KPACConfig, limit: int = 400) -> str:
    """The config as JSON for a message, cut short where a file declares absurd values (a list
    of a hundred thousand dilations would otherwise fill the terminal)."""
    text = config.to_json()
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _check_shapes(config: KPACConfig, own: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]) -> None:
    """Raise one CheckpointMismatchError saying how the stored tensors differ from the network's."""
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    wrong = [f"{k}: file {stored[k]} vs model {own[k]}" for k in own if k in stored and stored[k] != own[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} wrong shapes (e.g. {wrong[0]})")
        raise CheckpointMismatchError(f"weights do not fit the declared architecture {_config_text(config)}: " + "; ".join(parts))


def check_weights_fit(path: str | Path, config: KPACConfig) -> None:
    """Check the names and shapes of a safetensors file's tensors against the network ``config``
    builds, from the file's header alone (no tensor is read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable_error(path, e) from None
    try:
        _check_shapes(config, _declared_shapes(config, len(stored)), stored)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}") from None


def _declared_shapes(config: KPACConfig, stored_count: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the network ``config`` declares, built on the meta
    device (nothing allocated), for a file holding ``stored_count`` tensors. A config whose
    sizes cannot even be represented, or with more KPAC blocks than the file has tensors (each
    block has several: building a hundred thousand of them would take hours), is refused."""
    if config.blocks > stored_count:
        raise CheckpointMismatchError(f"weights do not fit the declared architecture {_config_text(config)}: "
                                      f"{config.blocks} KPAC blocks declared, {stored_count} tensors stored")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            return {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    except (RuntimeError, OverflowError) as e:  # e.g. "Storage size calculation overflowed"
        raise CheckpointMismatchError(f"weights do not fit the declared architecture {_config_text(config)}: "
                                      f"its tensors are too large ({' '.join(str(e).split())[:120]})") from None


# Where the usual wrappers keep the network they wrap: torch.compile's module (_orig_mod),
# (Distributed)DataParallel (module), kpac's FastKPACNet (model).
_WRAPPED_MODULE_ATTRS = ("_orig_mod", "module", "model")


def bare_network(model: torch.nn.Module) -> KPACNet:
    """The :class:`KPACNet` inside ``model``, unwrapping ``torch.compile``, DataParallel and
    :class:`~kpac_cli.model.fast.FastKPACNet`: their state dicts prefix every name, and a
    checkpoint saved from them would not load. TypeError when no KPACNet is inside."""
    current = model
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if isinstance(current, KPACNet):
            return current
        inner = next((current._modules[a] for a in _WRAPPED_MODULE_ATTRS if a in getattr(current, "_modules", {})), None)
        if inner is None:
            break
        current = inner
    raise TypeError(f"expected a KPACNet (or a wrapper of one), got {type(model).__name__}")


def save_checkpoint(
    path: str | Path,
    model: KPACNet,
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` atomically (:func:`kpac_cli.images.atomic_write_bytes`: temp file, fsync,
    rename; permissions as for any new file) as a kpac safetensors checkpoint.

    ``model`` may be wrapped (``torch.compile``, DataParallel, ``FastKPACNet``): the network
    inside is saved, under the names :func:`load_checkpoint` expects. ``dtype``: the stored
    tensors' type (the weights are cast; float32 by default).
    """
    model = bare_network(model)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    return _write_checkpoint(Path(path), model.config, tensors, provenance)


def _write_checkpoint(path: Path, config: KPACConfig, tensors: dict[str, torch.Tensor],
                      provenance: dict[str, Any] | None) -> Path:
    """Write ``tensors`` as they are, with kpac's metadata, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prov = {"kpac_version": __version__, **(provenance or {})}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "provenance": json.dumps(prov, sort_keys=True),
    }
    # Serialised in memory (models are a few MB): safetensors' own save_file renames a 0600
    # temp file into place, and an exported model should have ordinary permissions.
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def update_provenance(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into a checkpoint's provenance (e.g. scores measured after training),
    rewriting the file atomically; the weights and config are untouched. Returns the new provenance.

    Only kpac ``.safetensors`` files are rewritten: a ``.pt``/``.pth`` file (a training run's
    state, say) is refused, since rewriting it would replace it with weights alone."""
    path = Path(path)
    if _is_torch_file(path):
        raise CheckpointMismatchError(f"{path}: provenance is updated in kpac .safetensors files only, not in a torch "
                                      "file (export it first: kpac train --export-only)")
    ckpt = load_checkpoint(path)
    ckpt.build()  # the weights fit their config: a file that would not load is left as it is
    provenance = {**ckpt.provenance, **fields}
    # the stored tensors, bit for bit and each of its own dtype (not rebuilt through a float32 network)
    _write_checkpoint(path, ckpt.config, {k: v.contiguous() for k, v in ckpt.state_dict.items()}, provenance)
    return provenance


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` is named as a torch file (``.pt``/``.pth`` in any case: a file copied from
    a camera card or a Windows share may be ``RUN.PT``)."""
    return path.suffix.lower() in (".pt", ".pth")


def is_lfs_pointer(path: Path) -> bool:
    """Whether ``path`` is the small text file Git LFS leaves where it has not fetched the content."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_LFS_POINTER)) == _LFS_POINTER
    except OSError:
        return False


def _is_official_npz(path: Path) -> bool:
    """Whether ``path`` is a zip holding ``params.npy``, as the authors' checkpoints are."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # a safetensors file starts with its header's length
                return False
        with zipfile.ZipFile(path) as zf:
            return "params.npy" in zf.namelist()
    except Exception:  # only a guess at what the file is, for a better message
        return False


def lfs_pointer_error(path: Path) -> CheckpointMismatchError:
    return CheckpointMismatchError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull`")


_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's length


def truncation(path: Path) -> str | None:
    """How a safetensors file falls short when it ends before the data its header declares (an
    incomplete download or copy), else None. Read from the header alone."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "0 bytes: the file is empty"
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= _MAX_HEADER:
                return None
            text = f.read(length)
        if not text.startswith(b"{"):
            return None
        if len(text) < length:
            return f"{size:,} bytes, fewer than its {8 + length:,}-byte header alone"
        header = json.loads(text)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # not a safetensors header at all: the reader's own error says more
    expected = 8 + length + end
    return f"{size:,} of the {expected:,} bytes its header declares" if size < expected else None


def unreadable_error(path: Path, error: Exception) -> CheckpointMismatchError:
    """The error for a file the safetensors reader refused: a Git LFS pointer or a truncated file
    said as such, anything else with the reader's reason."""
    if is_lfs_pointer(path):
        return lfs_pointer_error(path)
    short = truncation(path)
    if short is not None:
        return _truncated_error(path, short)
    if _is_official_npz(path):
        return _npz_given_error(path)
    torch_kind = _torch_save_kind(path)
    if torch_kind is not None:  # safetensors' own words would be "header too large"
        return CheckpointMismatchError(f"{path}: {torch_kind}, not a safetensors file: kpac reads torch files only "
                                       "when named .pt or .pth (and then only plain weights)")
    return CheckpointMismatchError(f"{path}: not a readable safetensors file ({error})")


def _torch_save_kind(path: Path) -> str | None:
    """What a file is when it starts as ``torch.save`` writes (a zip, or a bare pickle in the
    legacy format), else None. A guess from its first bytes, for a better message only."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04":
        return "a zip archive (what torch.save writes)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "a Python pickle (what torch.save writes in its legacy format)"
    return None


def _truncated_error(path: Path, short: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(f"{path}: truncated safetensors file ({short}): an incomplete download or copy")


def read_metadata(path: str | Path) -> tuple[KPACConfig, dict[str, Any]]:
    """Config and provenance of a checkpoint, without reading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable_error(path, e) from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointMismatchError(
            f"{path}: safetensors file without kpac metadata (no architecture config); "
            "convert the authors' .npz with `kpac convert` or save with kpac_cli.checkpoints.save_checkpoint"
        )
    _check_format_version(path, meta)
    try:
        config = KPACConfig.from_json(meta["config"])
        provenance = json.loads(meta.get("provenance", "{}"))
    except (ValueError, TypeError) as e:
        newer = _newer_writer(_writer_version(meta))
        if newer is not None:  # a field this kpac does not know yet, rather than a damaged file
            raise CheckpointMismatchError(f"{path}: {newer}: upgrade kpac to load it ({e})") from None
        raise CheckpointMismatchError(f"{path}: invalid kpac metadata ({e})") from None
    if not isinstance(provenance, dict):  # every reader looks fields up in it
        raise CheckpointMismatchError(f"{path}: invalid kpac metadata (provenance must be a JSON object, "
                                      f"got {type(provenance).__name__})")
    return config, provenance


def _check_format_version(path: Path, meta: dict[str, str]) -> None:
    """Refuse a file of another checkpoint format version: what its tensors and metadata mean
    may have changed, so reading it as this version's could load wrong weights without a word."""
    version = meta.get("format_version", FORMAT_VERSION)  # files without it are version 1
    if version == FORMAT_VERSION:
        return
    if version.isdigit() and int(version) > int(FORMAT_VERSION):
        writer = _writer_version(meta)
        by = f" by kpac {writer}" if writer else ""
        raise CheckpointMismatchError(f"{path}: written{by} in checkpoint format {version}, which this kpac {__version__} "
                                      f"does not read (it reads format {FORMAT_VERSION}): upgrade kpac to load it")
    raise CheckpointMismatchError(f"{path}: invalid kpac metadata (unknown format_version {version!r})")


def _writer_version(meta: dict[str, str]) -> str | None:
    """The kpac version recorded in a file's provenance, if it can be read."""
    try:
        version = json.loads(meta.get("provenance", "{}")).get("kpac_version")
    except (ValueError, TypeError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def _version_key(version: object) -> tuple[int, ...] | None:
    """'0.10.2' -> (0, 10, 2); the numeric release part only (None if there is none)."""
    found = re.match(r"\d+(\.\d+)*", version.strip()) if isinstance(version, str) else None
    return tuple(int(p) for p in found.group(0).split(".")) if found else None


def _newer_writer(theirs: object) -> str | None:
    """'written by kpac X, newer than this kpac Y' when ``theirs``, the kpac version a file
    records, is newer than this one, else None."""
    their_key, our_key = _version_key(theirs or ""), _version_key(__version__)
    if their_key is None or our_key is None or their_key <= our_key:
        return None
    return f"written by kpac {theirs}, newer than this kpac {__version__}"


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a kpac checkpoint file: ``.safetensors`` (preferred), or ``.pt``/``.pth`` (weights_only).

    ``path`` is a file; a shipped model's name or a training run folder is turned into one by
    :func:`kpac_cli.checkpoints.registry.resolve_model`. ``.build()`` gives the network.
    CheckpointMismatchError (a ValueError) for anything that is not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        found = f"{path} is a folder, not a model file" if path.is_dir() else f"model file not found: {path}"
        raise FileNotFoundError(found + _not_a_file_hint(path))
    if _is_torch_file(path):
        return _load_torch_weights_only(path)
    if path.suffix.lower() == ".npz" or _is_official_npz(path):
        raise _npz_given_error(path)
    config, provenance = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        short = truncation(path)
        if short is not None:
            raise _truncated_error(path, short) from None
        raise CheckpointMismatchError(f"{path}: truncated or corrupt safetensors file ({e})") from None
    _check_weight_values(path, state)
    return Checkpoint(config, state, provenance, path)


def _npz_given_error(path: Path) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{path}: an .npz file (the authors' release format) is not loaded directly: "
        f"convert it with `kpac convert {path} -o {path.stem}.safetensors` and use that file"
    )


def _not_a_file_hint(path: Path) -> str:
    """What to call instead when ``path`` is a shipped model's name or a folder, not a file."""
    from .registry import _shipped_files  # the registry imports this module

    if not path.is_dir() and str(path) not in _shipped_files():
        return ""
    kind = "" if path.is_dir() else "it is a shipped model's name: "
    return (f" ({kind}kpac_cli.checkpoints.registry.resolve_model turns a model name or a training run folder "
            "into its file, and kpac_cli.engine.Deblurrer takes either)")


_FLOAT_DTYPES_CHECKED_AS_IS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_weight_values(path: Path, state: dict[str, Any]) -> None:
    """Refuse weights that would load without complaint yet make every output black: integer
    tensors (cast to float when loaded) and NaN or infinite values. Entries that are not
    tensors are left to :func:`load_state_dict_checked`, which reports them."""
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not value.is_floating_point():
            raise CheckpointMismatchError(f"{path}: tensor {name!r} holds {value.dtype} values, not floating-point weights")
        # isfinite has no kernel for 8-bit floats (float8_e4m3fn, ...): those are checked as float32
        checked = value if value.dtype in _FLOAT_DTYPES_CHECKED_AS_IS else value.float()
        if not torch.isfinite(checked).all():
            raise CheckpointMismatchError(f"{path}: tensor {name!r} holds non-finite values (NaN or infinity)")


def trained_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The weights a .pt checkpoint stands for: a kpac training run's weight average where it
    kept one (``--ema``: what its validation scored and its export holds), else its weights."""
    return {**dict(checkpoint["model"]), **dict(checkpoint.get("ema") or {})}


def _is_cut_short_zip(path: Path) -> bool:
    """Whether ``path`` starts as a zip (as torch.save writes) but has no readable directory,
    which a zip keeps at its end: what an incomplete download or copy leaves."""
    import zipfile

    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    except OSError:
        return False


def _load_torch_weights_only(path: Path) -> Checkpoint:
    if is_lfs_pointer(path):  # torch.load would call it a pickle that needs weights_only=False
        raise lfs_pointer_error(path)
    if _is_cut_short_zip(path):
        raise CheckpointMismatchError(f"{path}: truncated or damaged torch file (it starts as a zip, but the zip's "
                                      "directory at its end is missing): an incomplete download or copy?")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary classes with an UnpicklingError
        # torch's explanation spans many lines (and suggests weights_only=False): keep the gist.
        text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise CheckpointMismatchError(
                f"{path}: refused: it asks to load {found.group(1)}, which is not a tensor (only plain weights are loaded from .pt files)"
            ) from None
        raise CheckpointMismatchError(f"{path}: unreadable torch file ({type(e).__name__}: {text[:200]})") from None
    if not isinstance(obj, dict) or "config" not in obj or "model" not in obj:
        raise CheckpointMismatchError(f"{path}: a .pt checkpoint must hold {{'config': dict, 'model': state_dict}}")
    try:
        cfg = obj["config"]
        config = KPACConfig.from_json(cfg) if isinstance(cfg, str) else KPACConfig.from_dict(dict(cfg))
        state = trained_weights(obj)
        provenance = dict(obj.get("provenance") or {})
    except (TypeError, ValueError) as e:
        reason = " ".join(str(e).split())
        prov = obj.get("provenance")
        newer = _newer_writer(prov.get("kpac_version") if isinstance(prov, dict) else None)
        if newer is not None:  # a field this kpac does not know yet, rather than a damaged file
            raise CheckpointMismatchError(f"{path}: {newer}: upgrade kpac to load it ({reason})") from None
        raise CheckpointMismatchError(f"{path}: invalid .pt checkpoint ({reason})") from None
    _check_weight_values(path, state)
    return Checkpoint(config, state, provenance, path)
