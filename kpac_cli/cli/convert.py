"""`kpac convert`: import the authors' released TensorLayer checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from ..checkpoints import CheckpointMismatchError, UnsafeCheckpointError, load_official_npz, save_checkpoint
from ..model import count_parameters
from .common import EXIT_FAILED, emit_json, err_console, print_error, stops_on_signals, usage_error


def convert(
    src: Path = typer.Argument(..., help="The authors' .npz (single_2level.npz, single_3level.npz or dual.npz)."),
    output: Path = typer.Option(..., "-o", "--output", help="Destination .safetensors file (its folder is created if needed)."),
    name: str = typer.Option("", "--name", help="Model name stored in the metadata (default: the output's stem)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON record on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on stderr (errors are still printed)."),
) -> None:
    """Convert an official KPAC checkpoint to a kpac .safetensors model (no pickle code is run).

    Example: kpac convert single_3level.npz -o kpac-official-3level.safetensors
    """
    from ..engine.batch import inputs_written_over

    # Usage errors (2), as for `kpac export` and `kpac train --export-only`: SRC missing or
    # unusable (damaged, not the authors' format) as well, as a damaged --model is for every
    # command; 1 is for the work that failed (the output could not be written).
    if not src.exists():
        raise usage_error(f"{src}: no such file")
    if src.is_dir():
        raise usage_error(f"{src}: is a folder (give the authors' .npz file)")
    if output.is_dir():
        raise usage_error(f"-o {output}: is a folder (give the .safetensors file to write)")
    if inputs_written_over([("-o", output)], [("SRC", src)]):
        raise usage_error(f"-o {output}: is the input {src}, which is never replaced (not even with --overwrite)")
    if output.suffix != ".safetensors":
        # kpac reads a model by its extension: a .pt/.pth file with torch.load, for instance
        raise usage_error(f"-o {output}: the model is written as safetensors; give a name ending in .safetensors")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise usage_error(f"{output}: exists (use --overwrite)")
    with stops_on_signals(lambda: f"interrupted: {output} not written"):  # written at the very end, atomically
        try:
            model = load_official_npz(src)
        except (UnsafeCheckpointError, CheckpointMismatchError, OSError) as e:
            raise usage_error(str(e)) from None
        cfg = model.config
        variant = "dual" if cfg.in_views == 2 else f"single_{cfg.levels}level"
        prov = {"name": name or output.stem, "source": f"converted from the authors' release format ({src.name})",
                "variant": variant, "trained_on": "as released by the authors"}
        try:
            save_checkpoint(output, model, prov)
        except OSError as e:  # e.g. a read-only or missing place: name the path asked for, not a temp file
            print_error(f"cannot write {output}: {e.strerror or e}")
            raise typer.Exit(EXIT_FAILED) from None
    record = {"input": str(src), "output": str(output), "variant": variant, "parameters": count_parameters(model)}
    if json_out:
        emit_json(record)
    elif not quiet:
        err_console.print(f"{src} -> {output}: {variant}, {record['parameters']:,} parameters", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
