"""`kpac train`: train a KPAC network (the paper's recipe by default), resume, export."""

from __future__ import annotations

import math
import shlex
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, device_option, emit_json, err_console, given_options, print_error, show_progress, usage_error

_HELP = """Train a KPAC network: the paper's recipe by default (Adam 0.9/0.99, lr 1e-4, batch 4, 512x512 crops, L1, 200k iterations; then --stage perceptual from the L1 model).

Data: a DPDD folder (--data), paired folders (--source/--target), or defocus synthesised on the fly from sharp photos (--synthetic DIR, repeatable; --skimage; --procedural N).

Writes RUN_DIR/log.jsonl, RUN_DIR/last.pt and RUN_DIR/best.pt (training checkpoints; Ctrl-C saves one and stops) and, at the end, RUN_DIR/model.safetensors for `kpac deblur --model`.

Examples:

  kpac train --data DPDD --run-dir runs/l1

  kpac train --data DPDD --run-dir runs/perc --stage perceptual --init runs/l1/model.safetensors

  kpac train --synthetic photos/ --skimage --crop 128:20000,256:60000,512 --run-dir runs/synth

  kpac train --resume runs/l1   (continue where it stopped)

  kpac train --export-only --resume runs/l1 --from best -o kpac-l1.safetensors

  torchrun --nproc_per_node=4 -m kpac_cli train --data DPDD --run-dir runs/l1
"""

# Flags that may differ when resuming: they change how the run executes (data paths are
# included because a dataset may have moved), or, for the lr and crop schedules, only the
# iterations still to come; resuming without them continues the run bit for bit. --val-crop
# changes what the validations score (the advice to one that ran out of memory), not the
# training: the best score, which decides best.pt, starts afresh there.
_RESUMABLE = {
    "iterations", "save_every", "val_every", "log_every", "workers", "threads", "device", "precision",
    "channels_last", "description", "tensorboard", "max_nonfinite", "dist_timeout", "data", "source", "target",
    "val_source", "val_target", "synthetic", "cache",
    "vgg_weights",  # data and files may move
    "val_crop",  # a smaller one for a validation that ran out of memory
    "lr", "crop", "blur_rank_weight", "ema", "rescale", "transpose", "saturation",  # the recipe may be retuned for the iterations still to come
}
_RUN_ONLY = {"resume", "export_only", "export_from", "output", "overwrite", "blend_with", "blend", "json_out", "quiet", "out"}
# What --export-only reads; every other option is about training, which it does not do.
_EXPORT_OPTIONS = {"resume", "export_only", "export_from", "output", "overwrite", "blend_with", "blend", "description",
                   "json_out", "quiet"}
# Options of one kind of training data: given with another kind they would do nothing.
_DATA_KIND_OPTIONS = {"max_radius": ("synthetic",), "aperture": ("synthetic",), "bit_depth": ("dpdd", "paired"),
                      "allow_count_mismatch": ("dpdd",)}
_DATA_KIND_NAMES = {"synthetic": "synthetic data (--synthetic, --skimage, --procedural)", "dpdd": "--data",
                    "paired": "--source/--target"}
_FLAG_NAMES = {"out": "--run-dir", "json_out": "--json", "export_from": "--from", "output": "-o",
               "channels_last": "--channels-last"}


def _flag(name: str) -> str:
    """The command-line spelling of a parameter of :func:`train_command`."""
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _flags(names: set[str]) -> str:
    """The options' spellings, then "applies" or "apply": the subject of an error message."""
    return ", ".join(_flag(n) for n in sorted(names)) + (" applies" if len(names) == 1 else " apply")


def _dilations(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise usage_error(f"--dilations must be comma-separated integers, got {text!r}") from None
    return vals


def _identity(value: Any) -> Any:
    return value


def _negated(flag: bool) -> bool:
    return not flag


#: Architecture flags: the KPACConfig field each one sets, and the value it gives that field.
_ARCH_FLAGS: dict[str, tuple[str, Any]] = {
    "levels": ("levels", _identity), "channels": ("channels", _identity), "blocks": ("blocks", _identity),
    "kernel_size": ("kernel_size", _identity), "dilations": ("dilations", _dilations),
    "unshared_kernels": ("shared_kernel", _negated), "no_scale_attention": ("scale_attention", _negated),
    "no_shape_attention": ("shape_attention", _negated),
}


def _fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d{h:02d}h" if d else (f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s")


class _Reporter:
    """Renders TrainEvents: a rich progress line on a terminal, periodic lines otherwise."""

    def __init__(self, quiet: bool, log_every: int) -> None:
        self.quiet, self.log_every = quiet, log_every
        self.live = show_progress(quiet)
        self.progress: Progress | None = None
        self.task: Any = None
        self.load_task: Any = None
        self._last_line = 0.0

    def __enter__(self) -> "_Reporter":
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                console=err_console,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def print(self, text: str) -> None:
        if not self.quiet:
            (self.progress.console if self.progress else err_console).print(text, soft_wrap=True)

    def __call__(self, ev: Any) -> None:
        d = ev.data
        if ev.kind == "message":
            style = {"warning": "[yellow]warning:[/] "}.get(d.get("level"), "")
            self.print(style + escape(d["text"]))  # messages name files, which may hold "[...]"
        elif ev.kind == "load":
            if self.progress is not None:
                if self.load_task is None:
                    self.load_task = self.progress.add_task("decode", total=d["total"], loss="", lr="", rate="", eta="")
                self.progress.update(self.load_task, completed=d["done"])
                if d["done"] == d["total"]:
                    self.progress.remove_task(self.load_task)
        elif ev.kind == "start":
            resumed = f", resuming at {ev.step}" if d.get("resumed_from") is not None else ""
            self.print(  # the description names data folders, which may hold "[...]"
                f"{escape(d['description'])}\n{d['params']:,} parameters on {d['device']} ({d['precision']}"
                f"{', %d processes' % d['world_size'] if d['world_size'] > 1 else ''}), "
                f"{d['workers']} data worker(s), {d['threads']} thread(s){resumed}"
            )
            if self.progress is not None:
                self.task = self.progress.add_task("train", total=ev.total, completed=ev.step, loss="-", lr="-", rate="", eta="?")
        elif ev.kind == "step":
            fields = dict(loss=f"{d['loss']:.4f}", lr=f"{d['lr']:.2g}", rate=f"{d['it_s']:.2f} it/s", eta=_fmt_time(d["eta_s"]))
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, completed=ev.step, **fields)
            elif not self.quiet and (ev.step % self.log_every == 0 or ev.step == ev.total):
                self.print(f"iter {ev.step}/{ev.total}  loss {fields['loss']}  lr {fields['lr']}  {fields['rate']}  eta {fields['eta']}")
        elif ev.kind == "nonfinite":
            self.print(f"[yellow]warning:[/] iteration {ev.step}: non-finite loss ({d['loss']}), batch skipped ({d['consecutive']} in a row)")
        elif ev.kind == "val":
            self.print(f"iter {ev.step}: validation PSNR {d['psnr']:.3f} dB  SSIM {d['ssim']:.4f}  (best {d['best_psnr']:.3f})")
        elif ev.kind == "checkpoint" and self.progress is None and not self.quiet and d["kind"] == "best":
            self.print(f"iter {ev.step}: new best -> {escape(str(d['path']))}")


def train_command(
    ctx: typer.Context,
    # data
    data: Optional[Path] = typer.Option(None, "--data", help="DPDD folder (train_c/source, train_c/target, val_c/..., train_l/, train_r/).", rich_help_panel="Data"),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder of blurred inputs, paired with --target by file name.", rich_help_panel="Data"),
    target: Optional[Path] = typer.Option(None, "--target", help="Folder of sharp targets.", rich_help_panel="Data"),
    val_source: Optional[Path] = typer.Option(None, "--val-source", help="Validation inputs for --source/--target (default: hold out every 10th pair, up to --val-count).", rich_help_panel="Data"),
    val_target: Optional[Path] = typer.Option(None, "--val-target", help="Validation targets.", rich_help_panel="Data"),
    synthetic: Optional[list[Path]] = typer.Option(None, "--synthetic", help="Folder of sharp photos to synthesise defocus from on the fly (repeatable; datasets kpac synth wrote there are skipped).", rich_help_panel="Data"),
    skimage: bool = typer.Option(False, "--skimage", help="Add scikit-image's sample photos as synthetic sources.", rich_help_panel="Data"),
    procedural: int = typer.Option(0, "--procedural", help="Add N procedural dead-leaves scenes as synthetic sources.", rich_help_panel="Data"),
    allow_count_mismatch: bool = typer.Option(False, "--allow-count-mismatch", help="Accept a DPDD copy whose split sizes differ from 350/74/76.", rich_help_panel="Data"),
    bit_depth: int = typer.Option(8, "--bit-depth", help="Quantise training images to 8 bits (paper) or keep 16.", rich_help_panel="Data"),
    dual: bool = typer.Option(False, "--dual", help="Dual-pixel training (left+right views in, 6 channels).", rich_help_panel="Data"),
    cache: str = typer.Option("auto", "--cache", help="Keep decoded images in memory: auto (if they fit; synthetic sources: up to 1 GiB per data worker), yes, no.", rich_help_panel="Data"),
    max_radius: float = typer.Option(12.0, "--max-radius", help="Synthetic data: largest blur radius in pixels.", rich_help_panel="Data"),
    aperture: str = typer.Option("disc", "--aperture", help="Synthetic data: aperture shape, disc or polygon.", rich_help_panel="Data"),
    rescale: float = typer.Option(1.0, "--rescale", help="Synthetic data: take each crop as if its photo were downscaled by a random factor in \\[this, 1] (1: off; not in the paper).", rich_help_panel="Data"),
    transpose: bool = typer.Option(False, "--transpose", help="Synthetic data: also transpose half the crops (with the flips: all 8 orientations; not in the paper).", rich_help_panel="Data"),
    saturation: float = typer.Option(1.0, "--saturation", help="Synthetic data: move each crop's colours from grey by a random factor in \\[1, this] (1: off; not in the paper).", rich_help_panel="Data"),
    # model
    levels: Optional[int] = typer.Option(None, "--levels", help="Encoder levels, 2 or 3 \\[default: 3].", rich_help_panel="Model"),
    channels: Optional[int] = typer.Option(None, "--channels", help="Base width \\[default: 48].", rich_help_panel="Model"),
    blocks: Optional[int] = typer.Option(None, "--blocks", help="KPAC blocks \\[default: 2].", rich_help_panel="Model"),
    kernel_size: Optional[int] = typer.Option(None, "--kernel-size", help="Atrous kernel size \\[default: 5].", rich_help_panel="Model"),
    dilations: Optional[str] = typer.Option(None, "--dilations", help="Dilation rates \\[default: 1,2,3,4,5].", rich_help_panel="Model"),
    unshared_kernels: bool = typer.Option(False, "--unshared-kernels", help="One atrous kernel per dilation (ablation).", rich_help_panel="Model"),
    no_scale_attention: bool = typer.Option(False, "--no-scale-attention", help="Disable scale attention (ablation).", rich_help_panel="Model"),
    no_shape_attention: bool = typer.Option(False, "--no-shape-attention", help="Disable shape attention (ablation).", rich_help_panel="Model"),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from these weights (.safetensors, a last.pt/best.pt, a run folder, or a shipped model's name).", rich_help_panel="Model"),
    # recipe
    stage: str = typer.Option("l1", "--stage", help="l1, or perceptual (L1 + VGG-19 conv4_4 loss; use with --init).", rich_help_panel="Recipe"),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Iterations \\[default: 200000 for l1, 100000 for perceptual].", rich_help_panel="Recipe"),
    lr: Optional[str] = typer.Option(None, "--lr", help="Learning rate, or a step schedule RATE:UNTIL,...,RATE (e.g. 2e-4:100000,1e-4) \\[default: 1e-4 for l1, 5e-5 for perceptual, fixed].", rich_help_panel="Recipe"),
    beta1: float = typer.Option(0.9, "--beta1", help="Adam beta1.", rich_help_panel="Recipe"),
    beta2: float = typer.Option(0.99, "--beta2", help="Adam beta2.", rich_help_panel="Recipe"),
    batch: int = typer.Option(4, "--batch", help="Batch size per process.", rich_help_panel="Recipe"),
    crop: str = typer.Option("512", "--crop", help="Crop size, or a schedule SIZE:UNTIL,...,SIZE (e.g. 128:20000,256:60000,512).", rich_help_panel="Recipe"),
    noise_max: float = typer.Option(0.03, "--noise-max", help="Input noise augmentation: sigma uniform in [0, this].", rich_help_panel="Recipe"),
    no_flips: bool = typer.Option(False, "--no-flips", help="Disable random flips.", rich_help_panel="Recipe"),
    perceptual_weight: float = typer.Option(7e-4, "--perceptual-weight", help="Weight of the VGG feature MSE.", rich_help_panel="Recipe"),
    blur_rank_weight: float = typer.Option(0.0, "--blur-rank-weight", help="Synthetic data: weight of ranking losses that keep the block-1 scale attention a blur detector and blur-size gauge (kpac blurmap; not in the paper).", rich_help_panel="Recipe"),
    ema: float = typer.Option(0.0, "--ema", help="Average the weights (exponential moving average with this decay, e.g. 0.999; 0: off): validation, best.pt and the exported model use the average (not in the paper).", rich_help_panel="Recipe"),
    vgg_weights: Optional[Path] = typer.Option(None, "--vgg-weights", help="torchvision's vgg19-dcbb9e9d.pth \\[default: torch hub cache].", rich_help_panel="Recipe"),
    grad_clip: float = typer.Option(0.0, "--grad-clip", help="Clip the gradient norm (0: off).", rich_help_panel="Recipe"),
    max_nonfinite: int = typer.Option(20, "--max-nonfinite", help="Stop after this many non-finite losses in a row.", rich_help_panel="Recipe"),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of every random draw of the data.", rich_help_panel="Recipe"),
    # run
    out: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder \\[default: runs/kpac].", rich_help_panel="Run"),
    val_every: int = typer.Option(5000, "--val-every", help="Validate every N iterations.", rich_help_panel="Run"),
    val_count: int = typer.Option(8, "--val-count", help="Validation images (a fixed subset; 0: no validation, and nothing held out of the training data).", rich_help_panel="Run"),
    val_crop: int = typer.Option(512, "--val-crop", help="Centre crop of validation images (0: whole images); synthetic data: the size of the validation renders (0: 256). May change on --resume: the best score starts afresh there.", rich_help_panel="Run"),
    save_every: int = typer.Option(1000, "--save-every", help="Write last.pt every N iterations.", rich_help_panel="Run"),
    log_every: int = typer.Option(100, "--log-every", help="Log the mean loss every N iterations.", rich_help_panel="Run"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last.pt.", rich_help_panel="Run"),
    export_only: bool = typer.Option(False, "--export-only", help="Only export --resume's model to -o, do not train.", rich_help_panel="Run"),
    export_from: str = typer.Option("last", "--from", help="With --export-only: last or best checkpoint.", rich_help_panel="Run"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="With --export-only: the .safetensors to write \\[default: RUN/model.safetensors, or RUN/model-best.safetensors with --from best].", rich_help_panel="Run"),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --export-only: replace an existing output.", rich_help_panel="Run"),
    blend_with: Optional[Path] = typer.Option(None, "--blend-with", help="With --export-only: blend the run's weights with this model's (same architecture; e.g. the --init weights).", rich_help_panel="Run"),
    blend: float = typer.Option(0.5, "--blend", help="With --blend-with: the run's share of the blend, in [0, 1].", rich_help_panel="Run"),
    device: str = device_option(rich_help_panel="Run"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPUs and on CPUs with AMX or AVX512-BF16, else fp32), fp32, bf16, fp16.", rich_help_panel="Run"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="Channels-last (NHWC) memory layout \\[default: on].", rich_help_panel="Run"),
    workers: int = typer.Option(-1, "--workers", help="DataLoader worker processes (-1: 1 on CPU, up to 8 on GPU).", rich_help_panel="Run"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the model \\[default: all cores, shared among local processes].", rich_help_panel="Run"),
    dist_timeout: Optional[float] = typer.Option(None, "--dist-timeout", metavar="SECONDS", help="Several processes: how long one waits for the others before it gives up, e.g. for one that hung when no launcher ends the run (longer than rank 0's longest validation or checkpoint write) \\[default: torch's, 30 min; NCCL 10 min].", rich_help_panel="Run"),
    description: str = typer.Option("", "--description", help="Description stored in the exported model.", rich_help_panel="Run"),
    no_tensorboard: bool = typer.Option(False, "--no-tensorboard", help="Do not write TensorBoard logs even if it is installed.", rich_help_panel="Run"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as a JSON record on stdout.", rich_help_panel="Run"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress or messages (errors only).", rich_help_panel="Run"),
) -> None:
    from ..distributed import env_info
    from ..images import ImageError
    from ..model import KPACConfig
    from ..train import (
        CheckpointError, DataError, ProcessLost, RankFailed, TrainConfig, TrainingError, VGGWeightsMissing, export_model, load_state,
        train,
    )
    from ..train.loop import check_run_folder, new_run_architecture, resolve_device, resolve_precision, resumed_config
    from ..train.state import resolve_checkpoint

    given = given_options(ctx)
    if export_only:
        if resume is None:
            raise usage_error("--export-only needs --resume RUN (the run folder or checkpoint to export)")
        training_only = given - _EXPORT_OPTIONS
        if training_only:
            raise usage_error(f"{_flags(training_only)} to training, not to --export-only "
                              "(it exports the run's weights as they are)")
        if export_from not in ("last", "best"):
            raise usage_error("--from must be last or best")
        if not 0 <= blend <= 1:
            raise usage_error(f"--blend must lie in [0, 1], got {blend:g}")
        if "blend" in given and blend_with is None:
            raise usage_error("--blend applies to --blend-with (the model to blend the run's weights with)")
        if blend_with is not None and blend_with.is_dir():
            raise usage_error(f"--blend-with {blend_with}: is a folder; give the model file (.safetensors, last.pt or best.pt)")
        if blend_with is not None and not blend_with.is_file():
            raise usage_error(f"--blend-with: no such file: {blend_with}")
        try:
            source = resolve_checkpoint(resume, export_from)
        except CheckpointError as e:  # no such run or checkpoint, as --blend-with's missing file
            raise usage_error(f"--resume: {e}") from None
        if "export_from" in given and not resume.is_dir() and source.stem != export_from:
            raise usage_error(f"--from {export_from}: --resume names the checkpoint {source.name} itself; "
                              f"give the run folder to choose its {export_from}.pt")
        if output is None:  # export_model's default, named here so that it is checked like -o
            output = source.parent / ("model.safetensors" if source.stem == "last" else f"model-{source.stem}.safetensors")
        if output.is_dir():
            raise usage_error(f"-o {output}: is a folder (give the .safetensors file to write)")
        if output.suffix != ".safetensors":  # as kpac convert: models are read by their extension ('out/' arrives as 'out')
            raise usage_error(f"-o {output}: the model is written as safetensors; give a name ending in .safetensors")
        if (output.exists() or output.is_symlink()) and not overwrite:
            raise usage_error(f"{output}: exists (use --overwrite, or choose another -o)")
        if blend_with is not None:
            _check_blend_with(blend_with, source)
        try:
            path = export_model(source, output, export_from, blend_with, blend, description=description or None)
        except (CheckpointError, TrainingError) as e:
            print_error(str(e))
            raise typer.Exit(EXIT_FAILED) from None
        except OSError as e:  # reading errors are CheckpointErrors: this is the write
            print_error(f"cannot write {output}: {e.strerror or e}")
            raise typer.Exit(EXIT_FAILED) from None
        blended = {"blend_with": str(blend_with), "blend": blend} if blend_with is not None else {}
        if json_out:
            emit_json({"exported": str(path), "from": str(resume), "checkpoint": source.stem, **blended})
        elif not quiet:
            how = f", {blend:g} x its weights + {1 - blend:g} x {blend_with}'s" if blended else ""
            err_console.print(f"exported {resume} ({source.stem}{how}) -> {path}", markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_OK)

    if given & {"blend_with", "blend"}:
        raise usage_error("--blend-with and --blend apply to --export-only")
    if given & {"export_from", "output"}:  # a run writes RUN_DIR/model.safetensors
        raise usage_error(f"{_flags(given & {'export_from', 'output'})} to --export-only; a run writes its model "
                          "to RUN_DIR/model.safetensors (choose the folder with --run-dir)")
    if overwrite:
        raise usage_error("--overwrite applies to --export-only (a run folder is continued with --resume)")
    if iterations is not None and iterations < 1:  # 0 would only export the starting weights
        raise usage_error(f"--iterations must be >= 1, got {iterations} (to export a run's weights: --export-only)")
    arch_flags = set(_ARCH_FLAGS)
    arch_given = given & arch_flags

    init_cfg = None
    if init is not None:
        init = _init_path(init, strict=resume is None)
        if resume is None:  # a resume's weights are its checkpoint's
            init_cfg = _init_config(init)
    model_cfg = None
    if arch_given or dual:
        model_cfg = _requested_architecture(ctx.params, arch_given, dual, init_cfg)
        if init_cfg is not None and not arch_given:
            model_cfg = None  # --dual alone: the architecture comes from --init
    if init_cfg is not None and model_cfg is not None:
        _check_carry_over(init, init_cfg, model_cfg, arch_given)

    values = dict(
        out=out or Path("runs/kpac"), data=data, source=source, target=target, val_source=val_source, val_target=val_target,
        synthetic=tuple(synthetic or ()), skimage=skimage, procedural=procedural, allow_count_mismatch=allow_count_mismatch,
        bit_depth=bit_depth, dual=dual, cache=cache, max_radius=max_radius, aperture=aperture, rescale=rescale, transpose=transpose, saturation=saturation, model=model_cfg, init=init,
        stage=stage, iterations=iterations, lr=lr, beta1=beta1, beta2=beta2, batch=batch, crop=crop, noise_max=noise_max,
        flips=not no_flips, perceptual_weight=perceptual_weight, blur_rank_weight=blur_rank_weight, ema=ema, vgg_weights=vgg_weights, grad_clip=grad_clip,
        max_nonfinite=max_nonfinite, seed=seed, val_every=val_every, val_count=val_count, val_crop=val_crop,
        save_every=save_every, log_every=log_every, device=device, precision=precision, channels_last=channels_last,
        workers=workers, threads=threads, dist_timeout=dist_timeout, description=description, tensorboard=not no_tensorboard,
    )
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise usage_error("--resume RUN continues in RUN; drop --run-dir")
        if not resume.exists():
            raise usage_error(f"--resume {resume}: no such run folder or checkpoint")
        if not resume.is_dir() and resume.name != "last.pt":
            # a run goes on from where it stopped, which is its last.pt, whatever file is named
            raise usage_error(f"--resume {resume}: a run continues from its last checkpoint; give the run folder "
                              f"(or its last.pt), or start a new run from these weights with --init {resume}")
        try:
            state = load_state(resume / "last.pt" if resume.is_dir() else resume)
        except CheckpointError as e:
            raise usage_error(str(e)) from None
        cfg = TrainConfig.from_dict(state["train_config"])
        saved = KPACConfig.from_dict(state["config"])
        # Map CLI names onto TrainConfig fields to see which were changed on this command line.
        cli_to_field = {"no_flips": "flips", "no_tensorboard": "tensorboard"}
        changed = []
        for name in sorted(given - _RUN_ONLY):
            field_name = cli_to_field.get(name, name)
            if name in arch_flags:  # may repeat the checkpoint's architecture, not change it
                config_field, to_field = _ARCH_FLAGS[name]
                if to_field(ctx.params[name]) != getattr(saved, config_field):
                    changed.append("--" + name.replace("_", "-"))
            elif field_name in _RESUMABLE:
                cfg = cfg.replace(**{field_name: values[field_name]})
            elif field_name in values and values[field_name] != getattr(cfg, field_name, values[field_name]):
                changed.append("--" + name.replace("_", "-"))
        if changed:
            raise usage_error(
                f"{', '.join(changed)} cannot change when resuming (the run would no longer be what its checkpoint says); "
                "start a new run with --init instead"
            )
        cfg = cfg.replace(out=resume if resume.is_dir() else resume.parent, resume=True)
        try:  # what the run may not change: train() checks it too
            cfg = resumed_config(cfg, state)
        except ValueError as e:
            raise usage_error(str(e)) from None
    else:
        try:
            cfg = TrainConfig(**values)
        except ValueError as e:
            raise usage_error(str(e)) from None
    try:
        cfg.validate()  # a new run's flags, or a resumed run's retuned ones (--lr, --ema ...)
        # and against the architecture train() will build (crop sizes and the stride)
        arch = saved if resume is not None else new_run_architecture(cfg, init_cfg)
        cfg.replace(model=arch).validate()
    except ValueError as e:
        raise usage_error(str(e)) from None
    _check_options_apply(given, cfg)
    if "dist_timeout" in given and not env_info().enabled:
        raise usage_error("--dist-timeout applies to runs of several processes (torchrun, or RANK and WORLD_SIZE set)")
    try:
        check_run_folder(cfg)
    except ValueError as e:
        raise usage_error(str(e)) from None

    # Checked here, before train() creates the run folder: problems the user fixes are usage errors.
    for src in cfg.synthetic:
        if not src.exists():
            raise usage_error(f"--synthetic: no such file or directory: {src}")
    try:
        resolve_precision(cfg.precision, resolve_device(cfg.device, env_info()))  # e.g. fp16 without CUDA
    except TrainingError as e:
        raise usage_error(str(e)) from None

    made = _first_missing(cfg.out)  # what the run will create: removed again if it never starts
    try:
        with _Reporter(quiet, cfg.log_every) as reporter:
            result = train(cfg, callback=reporter)
    except (DataError, ImageError, VGGWeightsMissing) as e:
        print_error(str(e))
        if made is not None:  # the run never started: leave no empty run folder behind
            _remove_empty_up_to(cfg.out, made)
        raise typer.Exit(EXIT_USAGE) from None
    except RankFailed:  # under torchrun: the process that failed says why, once for all
        if made is not None:
            _remove_empty_up_to(cfg.out, made)
        raise typer.Exit(EXIT_FAILED) from None
    except ProcessLost as e:  # the process that failed says why; rank 0 says that the run lost it
        if env_info().is_main or e.timed_out:  # a process that hung says nothing: each one it strands does
            print_error(str(e))
        if made is not None:
            _remove_empty_up_to(cfg.out, made)
        raise typer.Exit(EXIT_FAILED) from None
    except (TrainingError, CheckpointError) as e:
        print_error(str(e))
        raise typer.Exit(EXIT_FAILED) from None
    except OSError as e:  # a checkpoint, the log or the model that cannot be written (a full disk ...)
        print_error(f"{e.filename or cfg.out}: {e.strerror or e}{_where_the_run_stands(cfg.out)}")
        raise typer.Exit(EXIT_FAILED) from None

    reports = env_info().is_main  # under torchrun, rank 0 speaks for the run: one result, not one per process
    if json_out and reports:
        emit_json({"event": "train", **result.to_dict()})
    if result.interrupted:
        if not quiet and reports:
            err_console.print(_stopped_message(result, cfg.out), markup=False, soft_wrap=True)
        raise typer.Exit(128 + (result.signal or signal.SIGINT))
    if not quiet and reports and not result.already_complete:  # a complete run's resume said so in one line
        sc = result.scores
        score = f", validation PSNR {sc['psnr']:.3f} dB / SSIM {sc['ssim']:.4f}" if sc else ""
        err_console.print(f"done: {result.step} iterations in {_fmt_time(result.wall_clock_s)}{score}; model -> {result.model_path}",
                          markup=False, soft_wrap=True)


def _stopped_message(result: Any, run: Path) -> str:
    """What a signal stopped, where the run stands, and the command that goes on (one line to copy)."""
    resume = f"kpac train --resume {shlex.quote(str(run))}"
    if result.interrupted_during in (None, "training"):
        return f"stopped at iteration {result.step}; checkpoint {result.last_checkpoint}; continue with: {resume}"
    return (f"stopped during the {result.interrupted_during}, after all {result.step} iterations (saved in "
            f"{result.last_checkpoint}); to finish it without training, continue with: {resume}")


def _where_the_run_stands(run: Path) -> str:
    """After a write that failed (a full disk): the iteration last.pt holds and how to go on from
    there, or "" when the run has no readable last.pt."""
    from ..train import CheckpointError, load_state

    try:
        step = int(load_state(run / "last.pt", optimizer=False)["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return ""
    return (f"; {run / 'last.pt'} holds iteration {step}: make room, then continue with: "
            f"kpac train --resume {shlex.quote(str(run))}")


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None: it exists)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _remove_empty_up_to(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty (anything written there stays)."""
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return


def _check_options_apply(given: set[str], cfg: Any) -> None:
    """Options typed for another kind of data or another stage than the run's are usage errors:
    they would change nothing, and the run would not be what the command line says."""
    for name, kinds in _DATA_KIND_OPTIONS.items():
        if name in given and cfg.data_kind not in kinds:
            raise usage_error(f"{_flag(name)} applies to {' and '.join(_DATA_KIND_NAMES[k] for k in kinds)}, "
                              f"not to {_DATA_KIND_NAMES[cfg.data_kind]}")
    perceptual_only = given & {"perceptual_weight", "vgg_weights"}
    if perceptual_only and cfg.stage != "perceptual":
        raise usage_error(f"{_flags(perceptual_only)} to --stage perceptual (this run's stage is {cfg.stage})")
    validation_only = given & {"val_source", "val_target", "val_crop", "val_every"}
    if validation_only and cfg.val_count == 0:
        raise usage_error(f"{_flags(validation_only)} to validation, which --val-count 0 turns off")


def _init_path(init: Path, strict: bool) -> Path:
    """--init as a path: a shipped model's name (as --model takes it) stands for its file. A name
    that is none is a usage error (``strict``) or left as it is (a resume compares it with its own)."""
    if init.exists():
        return init
    from ..checkpoints.registry import resolve_model

    try:
        return resolve_model(str(init))[0]
    except (FileNotFoundError, ValueError) as e:
        if strict:
            raise usage_error(f"--init: {e}") from None
        return init


def _init_config(init: Path, flag: str = "--init") -> Any:
    """The architecture of the ``flag`` weights (a .safetensors, a last.pt/best.pt or a run folder's
    last.pt); weights that cannot be read are a usage error, as --model's are."""
    from ..checkpoints import load_checkpoint
    from ..train.state import resolve_checkpoint

    try:
        return load_checkpoint(resolve_checkpoint(init, "last") if init.is_dir() else init).config
    except Exception as e:  # noqa: BLE001 - any reason the file is no kpac model
        raise usage_error(f"{flag}: {e}") from None


def _check_blend_with(blend_with: Path, checkpoint: Path) -> None:
    """--blend-with weights that are no kpac model, or of another architecture than the run's
    ``checkpoint``, are a usage error (the user named the wrong file), as --init's are."""
    from ..model import KPACConfig
    from ..train import CheckpointError, load_state

    other = _init_config(blend_with, "--blend-with")
    try:
        run = KPACConfig.from_dict(load_state(checkpoint, optimizer=False)["config"])
    except CheckpointError:
        return  # the export says what is wrong with the run's checkpoint
    if other != run:
        raise usage_error(f"--blend-with {blend_with}: another architecture ({other.to_json()}) than the run's "
                          f"({run.to_json()}); weights blend only within one architecture")


def _requested_architecture(params: dict[str, Any], arch_given: set[str], dual: bool, init_cfg: Any) -> Any:
    """The architecture the flags ask for: --init's (or the paper's) with the given flags changed."""
    from ..model import KPACConfig

    changes = {config_field: to_field(params[flag]) for flag, (config_field, to_field) in _ARCH_FLAGS.items()
               if flag in arch_given}
    try:
        return replace(init_cfg or KPACConfig(), in_views=2 if dual else 1, **changes)
    except ValueError as e:
        raise usage_error(str(e)) from None


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _check_carry_over(init: Path, init_cfg: Any, arch: Any, arch_given: set[str]) -> None:
    """Architecture flags that --init's weights cannot carry over to are a usage error."""
    from ..model import transfer_state

    try:
        transfer_state({}, init_cfg, arch, {})  # no tensors: compares the architectures only
    except ValueError:
        flags = sorted(flag for flag in arch_given if _ARCH_FLAGS[flag][0] != "levels"
                       and getattr(init_cfg, _ARCH_FLAGS[flag][0]) != getattr(arch, _ARCH_FLAGS[flag][0]))
        changes = ", ".join(f"{field.replace('_', ' ')} {_shown(getattr(init_cfg, field))} -> {_shown(getattr(arch, field))}"
                            for field in (_ARCH_FLAGS[flag][0] for flag in flags))
        raise usage_error(f"--init {init}: its weights cannot carry over to a change of {changes} (only --levels and "
                          f"--dual may change the architecture of the weights a run starts from); drop "
                          f"{', '.join(_flag(flag) for flag in flags)}, or start without --init") from None


def register(app: typer.Typer) -> None:
    app.command("train", help=_HELP, no_args_is_help=True)(train_command)
