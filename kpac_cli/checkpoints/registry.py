"""The shipped models: every ``*.safetensors`` in the weights folder is a model named by its stem.

Nothing is downloaded, so there are no dead links: the weights ship with the package. Each
file's integrity is checked against ``SHA256SUMS`` beside it (a truncated file or a Git LFS
pointer is reported as such, not as a cryptic load error). A model's architecture and
provenance come from its own metadata, never from its name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model import KPACConfig
from .official import CheckpointMismatchError
from .safetensors_io import check_weights_fit, is_lfs_pointer, lfs_pointer_error, read_metadata

DEFAULT_MODEL = "kpac-3level"
DEFAULT_DUAL_MODEL = "kpac-dual"


def weights_dirs() -> list[Path]:
    """Where shipped weights are looked for: $KPAC_WEIGHTS_DIR, the installed package (a wheel
    installs the checkout's weights/ as kpac_cli/weights), the checkout (editable installs)."""
    here = Path(__file__).resolve().parents[1]
    dirs = [Path(os.environ["KPAC_WEIGHTS_DIR"])] if os.environ.get("KPAC_WEIGHTS_DIR") else []
    dirs += [here / "weights", here.parent / "weights"]
    return [d for d in dirs if d.is_dir()]


def unsearched_weights_dir() -> str | None:
    """What is wrong with ``$KPAC_WEIGHTS_DIR`` when it is set but not a folder (so its models
    are not found), else None."""
    env = os.environ.get("KPAC_WEIGHTS_DIR")
    if env and not Path(env).is_dir():
        return f"$KPAC_WEIGHTS_DIR ({env}) is not a folder, so it was not searched"
    return None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    config: KPACConfig
    provenance: dict[str, Any]

    @property
    def default(self) -> bool:
        return self.name in (DEFAULT_MODEL, DEFAULT_DUAL_MODEL)


def _expected_digests(folder: Path) -> dict[str, str]:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return {}
    out = {}
    # sha256sum's format: the digest (either case), a space, " " or "*" (binary mode), the name,
    # which may itself hold spaces; names are decoded as the file system's are.
    for line in sums.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            out[parts[1].removeprefix("*")] = parts[0].lower()
    return out


def verify_file(path: Path) -> None:
    """Check a shipped file against SHA256SUMS (when listed there); a Git LFS pointer is
    reported as such whether listed or not."""
    if is_lfs_pointer(path):
        raise lfs_pointer_error(path)
    expected = _expected_digests(path.parent).get(path.name)
    if expected is None:
        return
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise CheckpointMismatchError(f"{path} is damaged (truncated or altered, {len(data):,} bytes): SHA-256 "
                                      f"{digest[:12]}... does not match SHA256SUMS ({expected[:12]}...)")


def _shipped_files() -> dict[str, Path]:
    """Each shipped model's name -> its file. The first folder of :func:`weights_dirs` holding
    the name wins even when its file is unreadable: a damaged override is reported when the
    model is asked for, never replaced by another folder's file of the same name."""
    files: dict[str, Path] = {}
    for folder in weights_dirs():
        for path in sorted(folder.glob("*.safetensors")):
            files.setdefault(path.stem, path)
    return files


def _listed_but_missing() -> dict[str, Path]:
    """Model name -> where SHA256SUMS says its file is, for each model a weights folder's
    SHA256SUMS lists but no weights folder holds (a file deleted, or left out of a package)."""
    present = _shipped_files()
    missing: dict[str, Path] = {}
    for folder in weights_dirs():
        for file_name in _expected_digests(folder):
            stem = file_name.removesuffix(".safetensors")
            # models are the folder's own *.safetensors, not those of its subfolders
            if file_name.endswith(".safetensors") and "/" not in file_name and stem not in present:
                missing.setdefault(stem, folder / file_name)
    return missing


def _missing_message(path: Path) -> str:
    return f"{path} is missing: {path.parent / 'SHA256SUMS'} lists it, but the file is not there"


def survey_models() -> tuple[list[ModelInfo], dict[str, str]]:
    """The shipped models that can be used, and name -> what is wrong for each that cannot
    (damaged against SHA256SUMS, a Git LFS pointer, unreadable, no kpac metadata, weights that
    do not fit the architecture its metadata declares, listed in SHA256SUMS but missing)."""
    models, unusable = [], {name: _missing_message(path) for name, path in _listed_but_missing().items()}
    for name, path in _shipped_files().items():
        try:
            verify_file(path)
            config, provenance = read_metadata(path)
            check_weights_fit(path, config)
        except (CheckpointMismatchError, OSError) as e:
            unusable[name] = " ".join(str(e).split())
            continue
        models.append(ModelInfo(name, path, config, provenance))
    return models, unusable


def list_models() -> list[ModelInfo]:
    """The shipped models that can be used (:func:`survey_models` says what is wrong with the others)."""
    return survey_models()[0]


# What `kpac train` writes into its run folder (OUT/log.jsonl, OUT/last.pt, OUT/best.pt), by
# which a folder is recognised as a run; its exported model is OUT/model.safetensors.
RUN_MARKERS = ("log.jsonl", "last.pt", "best.pt")
RUN_MODEL = "model.safetensors"


def _is_run_folder(folder: Path) -> bool:
    return (folder / RUN_MODEL).is_file() or any((folder / marker).is_file() for marker in RUN_MARKERS)


def _run_folder_model(folder: Path) -> Path:
    """The exported model of a training run folder, or FileNotFoundError saying what to do.

    Only the exported ``model.safetensors`` is used: a run's ``last.pt``/``best.pt`` hold the
    training state, and which of them is the model is the user's choice at export time.
    """
    model = folder / RUN_MODEL
    if model.is_file():
        return model
    if not _is_run_folder(folder):
        raise FileNotFoundError(f"{folder} is a folder, not a model: give a .safetensors file, a shipped model name "
                                "(see kpac models) or a training run folder holding model.safetensors")
    others = sorted(p.name for p in folder.glob("model-*.safetensors") if p.is_file())
    hint = f" (it holds {', '.join(others)}: pass that file as --model)" if others else ""
    raise FileNotFoundError(f"{folder} is a training run folder without an exported model{hint}; "
                            f"export it with kpac train --export-only --resume {folder}")


def resolve_model(spec: str | Path, dual: bool = False) -> tuple[Path, str]:
    """A model name (shipped), a file path or a training run folder -> (path, display name).

    ``"default"`` is the default single-image model (or the dual-pixel one with ``dual``), always
    the shipped file: a file or run folder of that model's name in the current folder is not it.
    A run folder (as ``kpac train --init`` accepts) stands for its exported
    ``model.safetensors``, displayed under the folder's name.
    """
    spec_s = str(spec)
    if spec_s == "default":  # the shipped model, whatever the current folder holds under its name
        return _shipped_model(DEFAULT_DUAL_MODEL if dual else DEFAULT_MODEL)
    path = Path(spec_s)
    if path.is_dir():
        # A folder that merely shares a shipped model's name (an output folder named after the
        # model, say) does not hide that model; a training run folder is taken as given.
        if _is_run_folder(path) or spec_s not in _shipped_files():
            return _run_folder_model(path), path.resolve().name
    elif path.suffix.lower() in (".safetensors", ".pt", ".pth", ".npz") or path.exists():
        if not path.is_file():
            shipped = path.stem in _shipped_files() and len(path.parts) == 1
            hint = f" (the shipped model is named without its folder and suffix: {path.stem!r})" if shipped else ""
            raise FileNotFoundError(f"model file not found: {path}{hint}")
        return path, path.stem
    return _shipped_model(spec_s)


def _shipped_model(name: str) -> tuple[Path, str]:
    """A shipped model's (verified file, name), or FileNotFoundError naming the models there are."""
    shipped = _shipped_files().get(name)
    if shipped is not None:
        verify_file(shipped)  # what is wrong with a damaged file, rather than "unknown model"
        return shipped, name
    missing = _listed_but_missing().get(name)
    if missing is not None:
        raise FileNotFoundError(_missing_message(missing))
    names = ", ".join(m.name for m in list_models()) or "none installed"
    unsearched = unsearched_weights_dir()
    unused = f"; {unsearched}" if unsearched else ""
    raise FileNotFoundError(f"unknown model {name!r} (shipped models: {names}){unused}; "
                            "pass a .safetensors path to use your own")
