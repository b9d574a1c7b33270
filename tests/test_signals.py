"""Interrupted and concurrent `kpac deblur` runs never leave a damaged output.

Real processes (``python -m kpac_cli``) over a batch big enough to take a few seconds (a
random-weight model wider than the test models elsewhere, each image ~0.3 s on one core):

* SIGINT / SIGTERM mid-batch: exit 130 / 143, a summary on stderr, every output present is
  complete (byte-identical to an uninterrupted run) and has its ``--json`` record, and
  ``--skip-existing`` finishes the job; ``eval`` and ``blurmap`` exit 130 / 143 too;
* SIGKILL while an output is half written: only a hidden temporary file remains, never a
  truncated file under the final name, and the next run removes it;
* two processes writing into the same folder (different inputs, or the same inputs with and
  without ``--overwrite``) produce exactly the files a single run produces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hostile import png_bytes, smooth_rgb
from kpac_cli.checkpoints import save_checkpoint
from kpac_cli.images import is_image_path, read_image
from kpac_cli.model import KPACConfig, build_model

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

N_IMAGES = 12
TIMEOUT = 120  # seconds for any one run; generous for loaded CI machines
TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.kpac-tmp$")


@dataclass
class Workload:
    root: Path
    inputs: Path
    model: Path
    reference: dict[str, bytes]  # output name -> bytes of an uninterrupted single run


def _env() -> dict[str, str]:
    # One thread per process: predictable timing on shared CI machines, deterministic output.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cmd(model: Path, *args, prelude: str | None, command: str) -> list[str]:
    head = [sys.executable, "-m", "kpac_cli"] if prelude is None else [sys.executable, "-c", prelude]
    return head + [command, *map(str, args), "--model", str(model), "--device", "cpu"]


def start(w: Workload, *args, prelude: str | None = None, env: dict[str, str] | None = None,
          command: str = "deblur") -> subprocess.Popen:
    return launch(_cmd(w.model, *args, prelude=prelude, command=command), env=env)


def launch(cmd: list[str], env: dict[str, str] | None = None, stdout=subprocess.PIPE) -> subprocess.Popen:
    # A test run started in the background by a shell (`cmd &`) ignores SIGINT, and a child
    # inherits an ignored signal through exec: kpac would then never see the test's SIGINT, as
    # any background job does not. The child is started with SIGINT at its default instead.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                env={**_env(), **(env or {})})
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The child runs at a lower priority than this test process, so that on a loaded machine the
    # test still sees the outputs appear and signals mid-batch instead of after the last image.
    # Set from here, not with preexec_fn, which can deadlock a fork from a process with threads.
    os.setpriority(os.PRIO_PROCESS, proc.pid, 10)
    return proc


def finish_with_stdout(proc: subprocess.Popen) -> tuple[str, str]:
    """Wait for ``proc``; returns its stdout and stderr."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"kpac did not finish within {TIMEOUT} s; stderr:\n{err}")
    assert "Traceback" not in err, err
    return out, err


def finish(proc: subprocess.Popen) -> str:
    """Wait for ``proc``; returns its stderr."""
    return finish_with_stdout(proc)[1]


def wait_until(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"kpac exited ({proc.returncode}) before {what}; stderr:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def finals(folder: Path) -> dict[str, bytes]:
    """Outputs under their final names (not hidden temporary files)."""
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def assert_complete(outputs: dict[str, bytes], w: Workload) -> None:
    """Each output is exactly what an uninterrupted single run writes (so it is complete)."""
    for name, data in outputs.items():
        assert name in w.reference, name
        assert data == w.reference[name], f"{name} differs from the single-process run"
        read_image(data)  # and it decodes


def summary(err: str) -> str:
    return " ".join(err.split())  # whitespace-normalised (line wrapping is tested elsewhere)


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> Workload:
    root = tmp_path_factory.mktemp("signals")
    inputs = root / "in"
    inputs.mkdir()
    for i in range(N_IMAGES):
        (inputs / f"img{i:02d}.png").write_bytes(png_bytes(smooth_rgb(320, 384, seed=i)))
    torch.manual_seed(0)
    model = save_checkpoint(root / "wide.safetensors", build_model(KPACConfig(levels=2, channels=32)), {"name": "wide"})
    w = Workload(root, inputs, model, {})
    ref = root / "reference"
    proc = start(w, inputs, "-o", ref)
    finish(proc)
    assert proc.returncode == 0
    w.reference = finals(ref)
    assert sorted(w.reference) == sorted(p.name for p in inputs.iterdir())
    return w


# --------------------------------------------------------------------------------------------
# SIGINT / SIGTERM

# The tail of a ``python -c`` prelude: after its patches, run kpac as ``python -m kpac_cli`` does.
RUN_KPAC = r"""
import sys
from kpac_cli.cli import main
sys.argv[0] = "kpac"
main()
"""


# Runs kpac with the inference of image number $KPAC_TEST_HOLD repeated until the test's signal
# arrives (as on a photo that takes minutes), so that the signal lands mid-batch, in real
# inference, however loaded the machine is: without it, a slow test process could signal after
# the last image. The file $KPAC_TEST_HELD is created once that image is held.
HOLD_ONE_IMAGE = r"""
import os, time
from kpac_cli.engine.deblurrer import Deblurrer

real_run = Deblurrer.run
runs = [0]

def held_run(self, *args, **kwargs):
    runs[0] += 1
    result = real_run(self, *args, **kwargs)
    if runs[0] == int(os.environ["KPAC_TEST_HOLD"]):
        open(os.environ["KPAC_TEST_HELD"], "w").close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            result = real_run(self, *args, **kwargs)
    return result

Deblurrer.run = held_run
""" + RUN_KPAC


def hold(image_number: int, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment for HOLD_ONE_IMAGE, and the file that says the image is held."""
    held = tmp_path / "held"
    return {"KPAC_TEST_HOLD": str(image_number), "KPAC_TEST_HELD": str(held)}, held


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_batch_keeps_complete_outputs_and_resumes(workload, tmp_path, sig, code):
    out = tmp_path / "out"
    env, _ = hold(3, tmp_path)
    proc = start(workload, workload.inputs, "-o", out, "--json", prelude=HOLD_ONE_IMAGE, env=env)
    wait_until(lambda: len(finals(out)) >= 2, proc, "two outputs")
    proc.send_signal(sig)
    records, err = finish_with_stdout(proc)
    assert proc.returncode == code, err
    # the second output's write overlapped the third image's inference: it is finished and
    # counted; the third image, interrupted in inference, is not written
    assert (f"interrupted: 2 deblurred, 0 skipped, 0 failed, {N_IMAGES - 2} not finished; "
            "rerun with --skip-existing to finish") in summary(err), err
    done = finals(out)
    assert len(done) == 2
    # every file on disk has its --json record, and nothing else does
    written = [json.loads(line) for line in records.splitlines()]
    assert sorted(Path(r["output"]).name for r in written if r["status"] == "ok") == sorted(done), records
    assert_complete(done, workload)
    assert temps(out) == []  # the write in flight was finished, not abandoned

    proc = start(workload, workload.inputs, "-o", out, "--skip-existing")
    err = finish(proc)
    assert proc.returncode == 0, err
    assert f"{N_IMAGES - len(done)} deblurred, {len(done)} skipped, 0 failed" in summary(err)
    assert finals(out) == workload.reference
    assert temps(out) == []


def test_interrupted_overwrite_run_does_not_advise_keeping_stale_outputs(workload, tmp_path):
    # with --overwrite the outputs not reached yet are those of an earlier run: --skip-existing
    # would keep them, so the summary does not offer it as the way to finish
    out = tmp_path / "out"
    out.mkdir()
    for name in workload.reference:
        (out / name).write_bytes(b"an earlier run's output")
    env, held = hold(2, tmp_path)
    proc = start(workload, workload.inputs, "-o", out, "--overwrite", prelude=HOLD_ONE_IMAGE, env=env)
    wait_until(held.exists, proc, "the second image to be in inference")
    proc.send_signal(signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130, err
    assert f"interrupted: 1 deblurred, 0 skipped, 0 failed, {N_IMAGES - 1} not finished" in summary(err), err
    assert "rerun with --skip-existing to finish" not in summary(err), err
    assert "rerun" in summary(err) and "older than this run" in summary(err), err


def test_interrupted_run_to_stdout_does_not_advise_skip_existing(workload, tmp_path):
    env, held = hold(1, tmp_path)
    proc = start(workload, workload.inputs / "img00.png", "-o", "-", prelude=HOLD_ONE_IMAGE, env={**env, "PYTHONIOENCODING": "utf-8"})
    wait_until(held.exists, proc, "the image to be in inference")
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 143, err
    assert out == ""  # no image, not a part of one
    assert "interrupted: 0 deblurred, 0 skipped, 0 failed, 1 not finished" in summary(err), err
    assert "--skip-existing" not in err, err


@pytest.mark.parametrize("command", ["eval", "blurmap"])
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_eval_and_blurmap_exit_with_the_signal_code(workload, tmp_path, command, sig, code):
    args = (["--source", workload.inputs, "--target", workload.inputs, "--report", tmp_path / "scores.json"] if command == "eval"
            else [workload.inputs, "-o", tmp_path / "maps"])
    env, held = hold(2, tmp_path)
    proc = start(workload, *args, prelude=HOLD_ONE_IMAGE, env=env, command=command)
    wait_until(held.exists, proc, "the second image to be in inference")
    proc.send_signal(sig)
    err = finish(proc)  # no traceback
    assert proc.returncode == code, err
    if command == "blurmap":
        assert temps(tmp_path / "maps") == []
    else:  # the report asked for is not there, and the last line says so
        assert not (tmp_path / "scores.json").exists()
        word = "interrupted" if sig == signal.SIGINT else "terminated"
        assert err.strip().splitlines()[-1] == f"{word}; no report written", err


def test_interrupted_blurmap_overwrite_run_does_not_advise_keeping_stale_maps(workload, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    for name in workload.reference:  # an earlier run's maps, e.g. made with another --block
        (maps / f"{Path(name).stem}_blurmap.png").write_bytes(b"an earlier run's map")
    env, held = hold(2, tmp_path)
    proc = start(workload, workload.inputs, "-o", maps, "--overwrite", prelude=HOLD_ONE_IMAGE, env=env, command="blurmap")
    wait_until(held.exists, proc, "the second image to be in inference")
    proc.send_signal(signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130, err
    assert "interrupted: 1 done, 0 skipped, 0 failed" in summary(err), err
    assert "rerun with --skip-existing to finish" not in summary(err), err
    assert "rerun" in summary(err) and "older than this run" in summary(err), err


# --------------------------------------------------------------------------------------------
# SIGKILL half-way through writing a file

# Runs kpac with write number $KPAC_TEST_STALL_AT (of files written atomically) stalling half-way
# (as on a hung disk), so that the test can signal it at exactly that point.
STALL_A_WRITE = r"""
import builtins, os, sys, time
import kpac_cli.images.atomic as atomic

real_open = builtins.open
writes = [0]

class Stalled:
    def __init__(self, fh):
        self.fh = fh
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.fh.close()
    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        real_open(os.environ["KPAC_TEST_STALLED"], "w").close()  # tell the test
        time.sleep(600)
    def __getattr__(self, name):
        return getattr(self.fh, name)

def stalling_open(file, mode="r", *args, **kwargs):
    fh = real_open(file, mode, *args, **kwargs)
    if "w" in mode and str(file).endswith(".kpac-tmp"):
        writes[0] += 1
        if writes[0] == int(os.environ["KPAC_TEST_STALL_AT"]):
            return Stalled(fh)
    return fh

atomic.open = stalling_open
""" + RUN_KPAC


def test_sigkill_mid_write_leaves_only_a_hidden_temp_that_the_next_run_removes(workload, tmp_path):
    out = tmp_path / "out"
    stalled = tmp_path / "stalled"
    proc = start(workload, workload.inputs, "-o", out, prelude=STALL_A_WRITE,
                 env={"KPAC_TEST_STALLED": str(stalled), "KPAC_TEST_STALL_AT": "3"})
    wait_until(stalled.exists, proc, "the third output to be half written")
    proc.kill()
    proc.wait(TIMEOUT)
    proc.stdout.close()
    proc.stderr.close()

    done = finals(out)
    assert len(done) == 2  # the two complete writes, nothing else under a final name
    assert_complete(done, workload)
    leftover = temps(out)
    assert len(leftover) == 1
    m = TEMP_RE.match(leftover[0])
    assert m and int(m.group("pid")) == proc.pid, leftover
    assert m.group("final") in workload.reference and m.group("final") not in done
    assert 0 < (out / leftover[0]).stat().st_size < len(workload.reference[m.group("final")])
    assert not is_image_path(out / leftover[0])  # never taken for an input by a later run

    proc = start(workload, workload.inputs, "-o", out, "--skip-existing")
    err = finish(proc)
    assert proc.returncode == 0, err
    assert f"{N_IMAGES - 2} deblurred, 2 skipped, 0 failed" in summary(err)
    assert temps(out) == []  # the dead run's temporary file was removed
    assert finals(out) == workload.reference


# --------------------------------------------------------------------------------------------
# two processes, one output folder


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["different_inputs", "same_inputs_overwrite", "same_inputs"])
def test_two_processes_writing_one_folder(workload, tmp_path, mode):
    names = sorted(workload.reference)[:8]
    out = tmp_path / "out"
    if mode == "different_inputs":
        halves = [tmp_path / "a", tmp_path / "b"]
        for i, name in enumerate(names):
            halves[i % 2].mkdir(exist_ok=True)
            shutil.copy(workload.inputs / name, halves[i % 2] / name)
        runs = [[halves[0], "-o", out], [halves[1], "-o", out]]
    else:
        src = tmp_path / "in"
        src.mkdir()
        for name in names:
            shutil.copy(workload.inputs / name, src / name)
        extra = ["--overwrite"] if mode == "same_inputs_overwrite" else []
        runs = [[src, "-o", out, *extra], [src, "-o", out, *extra]]
        if extra:  # stale, damaged outputs from some earlier run: both processes replace them
            out.mkdir()
            for name in names:
                (out / name).write_bytes(workload.reference[name][:100])

    procs = [start(workload, *args) for args in runs]
    errs = [finish(p) for p in procs]
    codes = [p.returncode for p in procs]

    assert finals(out) == {name: workload.reference[name] for name in names}
    assert temps(out) == []
    if mode == "same_inputs":
        # whoever comes second refuses to clobber: skipped as existing, or noticed at write time
        assert set(codes) <= {0, 1}, errs
        for err in errs:
            for line in err.splitlines():
                if line.startswith("error:"):
                    assert re.search(r"exists|appeared while processing", line), line
    else:
        assert codes == [0, 0], errs


def test_ctrl_c_while_the_command_line_is_imported_exits_130_without_a_traceback(monkeypatch):
    """Importing the command line imports torch, which takes seconds: a Ctrl-C then ended with a
    traceback of the import. It ends as one later does, with 130."""
    import kpac_cli.__main__ as entry

    class CtrlCWhileImporting:  # a meta-path finder: the interrupt lands inside the import
        def find_spec(self, name, path=None, target=None):
            if name == "kpac_cli.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "kpac_cli.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [CtrlCWhileImporting(), *sys.meta_path])
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130


# --------------------------------------------------------------------------------------------
# the commands without a batch: kpac bench, kpac export, kpac convert

# Runs kpac with the benchmark's measurements held until the test's signal arrives; the file
# $KPAC_TEST_HELD is created once they are.
HOLD_BENCH = r"""
import os, time
import kpac_cli.bench

def held_benchmark(*args, **kwargs):
    open(os.environ["KPAC_TEST_HELD"], "w").close()
    time.sleep(120)
    raise AssertionError("the test's signal did not arrive")

kpac_cli.bench.run_benchmark = held_benchmark
""" + RUN_KPAC


def _kpac_with(prelude: str, *args) -> list[str]:
    return [sys.executable, "-c", prelude, *map(str, args)]


def _stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_bench_exits_with_the_signal_code_and_one_line(tmp_path, sig, code):
    held = tmp_path / "held"
    proc = launch(_kpac_with(HOLD_BENCH, "bench", "--size", "64x64", "--device", "cpu", "--quiet"),
                  env={"KPAC_TEST_HELD": str(held)})
    wait_until(held.exists, proc, "the measurements to start")
    proc.send_signal(sig)
    out, err = finish_with_stdout(proc)
    assert proc.returncode == code, err
    assert out == ""
    assert _stderr_lines(err) == ["interrupted while measuring setup"], err


def _interrupt_mid_write(cmd: list[str], tmp_path: Path, sig: signal.Signals) -> tuple[int, str]:
    """Run ``cmd`` (kpac's arguments) with its first atomic write stalled half-way, signal it there."""
    stalled = tmp_path / "stalled"
    proc = launch(_kpac_with(STALL_A_WRITE, *cmd), env={"KPAC_TEST_STALLED": str(stalled), "KPAC_TEST_STALL_AT": "1"})
    wait_until(stalled.exists, proc, "the output to be half written")
    proc.send_signal(sig)
    err = finish(proc)
    return proc.returncode, err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_export_interrupted_mid_write_leaves_no_file(tmp_path, sig, code):
    out = tmp_path / "out"
    code_seen, err = _interrupt_mid_write(["export", "--onnx", out / "net.onnx", "--config", "single_2level"], tmp_path, sig)
    assert code_seen == code, err
    assert _stderr_lines(err) == [f"interrupted: {out / 'net.onnx'} not written"], err
    assert sorted(p.name for p in out.iterdir()) == []  # neither the file nor its temporary file


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_convert_interrupted_mid_write_leaves_no_file(shared_dir, tmp_path, sig, code):
    npz = shared_dir / "reference" / "official-tf-2level" / "single_2level.npz"
    if not npz.is_file():
        pytest.skip(f"{npz.name} not in the reference material")
    out = tmp_path / "out"
    code_seen, err = _interrupt_mid_write(["convert", npz, "-o", out / "m.safetensors"], tmp_path, sig)
    assert code_seen == code, err
    assert _stderr_lines(err) == [f"interrupted: {out / 'm.safetensors'} not written"], err
    assert sorted(p.name for p in out.iterdir()) == []


# --------------------------------------------------------------------------------------------
# tables on stdout whose reader went away (`kpac eval | head -1`)


def _run_into_a_closed_pipe(cmd: list[str]) -> tuple[int, str]:
    """Run ``python -m kpac_cli`` with ``cmd`` and a stdout whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = launch([sys.executable, "-m", "kpac_cli", *map(str, cmd)], stdout=write_end)
    finally:
        os.close(write_end)
    err = finish(proc)
    return proc.returncode, err


@pytest.mark.parametrize("command", ["eval", "models"])
def test_a_table_whose_reader_went_away_exits_141(tmp_path, command):
    if command == "eval":
        for i in range(3):
            (tmp_path / f"p{i}.png").write_bytes(png_bytes(smooth_rgb(32, 40, seed=i)))
        cmd = ["eval", "--method", "identity", "--source", tmp_path, "--target", tmp_path, "--no-lpips", "--quiet"]
    else:
        cmd = ["models", "--quiet"]
    code, err = _run_into_a_closed_pipe(cmd)
    assert code == 141, err  # as a shell reports a writer that SIGPIPE ended, not 1 ("failed")
    assert "Exception ignored" not in err and "Error" not in err, err


def test_a_ctrl_c_that_typer_hands_on_as_abort_exits_130(monkeypatch):
    """Typer before 0.13 (the range allows 0.12) turns a Ctrl-C in a command into click's Abort,
    which printed "Aborted!" and exited 1 (a failure) instead of 130."""
    import typer
    from typer.core import TyperGroup

    import kpac_cli.cli as cli

    def ctrl_c_as_older_typer_hands_it_on(self, *args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise typer.Abort() from e

    monkeypatch.setattr(TyperGroup, "main", ctrl_c_as_older_typer_hands_it_on)
    monkeypatch.setattr(sys, "argv", ["kpac", "models"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 130
