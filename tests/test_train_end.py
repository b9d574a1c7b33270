"""How a single-process training run ends: a signal during the final validation, while last.pt
is written at the end or during a periodic validation; a validation that fails. The run stops
cleanly (last.pt holds every iteration done, the log says where it stopped) and a resume
finishes what was left without training. A run that fails says so last in its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import REPO, assert_same_tensors, make_dpdd, tiny_cfg, weights  # noqa: E402

from kpac_cli.checkpoints import load_checkpoint  # noqa: E402
from kpac_cli.distributed import DistInfo  # noqa: E402
from kpac_cli.train import TrainingError, load_state, train  # noqa: E402
from kpac_cli.train import loop as L  # noqa: E402

# `kpac ARGS` whose first validation image waits, once it has said so (the file MARKER), until
# the test has sent its signals (the file SENT): the signals reach it during the final validation.
_VALIDATION_THAT_WAITS = """
import sys, time
from pathlib import Path
from kpac_cli.train import loop

marker, sent = Path(sys.argv[1]), Path(sys.argv[2])
psnr = loop.psnr


def waiting_psnr(*args, **kwargs):
    if not marker.exists():
        marker.touch()
        deadline = time.monotonic() + 60
        while not sent.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return psnr(*args, **kwargs)


loop.psnr = waiting_psnr
sys.argv = ["kpac", *sys.argv[3:]]
from kpac_cli.__main__ import main
main()
"""


@pytest.fixture(scope="module")
def dpdd(tmp_path_factory) -> Path:
    return make_dpdd(tmp_path_factory.mktemp("dpdd"))


@pytest.fixture(autouse=True)
def unhandled_sigterm_fails():
    """A SIGTERM that the run does not handle fails the test (its default action would end pytest)."""
    def fail(_signum, _frame):
        pytest.fail("the run met SIGTERM without handling it")

    previous = signal.signal(signal.SIGTERM, fail)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def cli():
    from kpac_cli.cli import app

    return app


def _cli_args(dpdd: Path, run: Path) -> list[str]:
    return ["train", "--data", str(dpdd), "--allow-count-mismatch", "--run-dir", str(run), "--levels", "2",
            "--channels", "8", "--batch", "1", "--crop", "32", "--iterations", "6", "--val-count", "2", "--val-crop", "32",
            "--save-every", "4", "--workers", "0", "--threads", "1", "--no-tensorboard"]


def _signalled_in_final_validation(tmp_path: Path, args: list[str], signals: list[int]) -> tuple[int, str]:
    """Run ``kpac ARGS`` and send it ``signals`` during its final validation: its exit status and stderr."""
    marker, sent = tmp_path / "validating", tmp_path / "sent"
    p = subprocess.Popen([sys.executable, "-c", _VALIDATION_THAT_WAITS, str(marker), str(sent), *args], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
            time.sleep(0.05)
        for signum in signals:
            p.send_signal(signum)
            time.sleep(0.2)
        sent.touch()
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _record(record: dict) -> dict:
    """A log record without its time."""
    return {k: v for k, v in record.items() if k != "time"}


def _out_of_memory(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB")


def _since_the_last_start(run: Path) -> list[dict]:
    """The log of the run's last call of train (a resume's)."""
    log = _log(run)
    return log[max(i for i, r in enumerate(log) if r["event"] == "start"):]


def test_sigterm_during_the_final_validation_keeps_every_iteration_and_a_resume_finishes(tmp_path, dpdd, cli):
    """The final validation ran without the signal handlers: SIGTERM killed the process there,
    losing the iterations since the last periodic save, with nothing said in the log."""
    run = tmp_path / "run"
    status, err = _signalled_in_final_validation(tmp_path, _cli_args(dpdd, run), [signal.SIGTERM])
    assert status == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"stopped during the final validation, after all 6 iterations (saved in {run / 'last.pt'}); "
                                    f"to finish it without training, continue with: kpac train --resume {run}")
    assert load_state(run / "last.pt")["step"] == 6
    last = _log(run)[-1]
    assert (last["event"], last["step"], last["signal"], last["during"]) == ("interrupted", 6, signal.SIGTERM, "final validation")
    assert sorted(p.name for p in run.iterdir() if "model" in p.name or "tmp" in p.name) == []
    # The resume trains nothing: it validates and exports, as the uninterrupted run does.
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert [r["event"] for r in _since_the_last_start(run)] == ["start", "val", "checkpoint", "checkpoint", "end"]
    straight = CliRunner().invoke(cli, _cli_args(dpdd, tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    model, expected = load_checkpoint(run / "model.safetensors"), load_checkpoint(tmp_path / "straight/model.safetensors")
    assert_same_tensors(model.state_dict, expected.state_dict)
    assert model.provenance["scores"] == expected.provenance["scores"] and model.provenance["iterations"] == 6


def test_a_second_ctrl_c_during_the_final_validation_stops_at_once(tmp_path, dpdd):
    run = tmp_path / "run"
    status, err = _signalled_in_final_validation(tmp_path, _cli_args(dpdd, run), [signal.SIGINT, signal.SIGINT])
    assert status == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "stopped during" not in err
    assert not (run / "model.safetensors").exists()


def test_a_signal_in_the_last_iteration_stops_before_the_final_validation(tmp_path, dpdd):
    """A signal met after the last iteration's agreement used to be ignored: the run went on to
    validate and export, and ended as complete."""
    straight = train(tiny_cfg(tmp_path / "a", dpdd, iterations=6, save_every=4))

    def signal_in_the_last_iteration(ev):
        if ev.kind == "step" and ev.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "b"
    events = []
    part = train(tiny_cfg(run, dpdd, iterations=6, save_every=4),
                 callback=lambda ev: (events.append(ev), signal_in_the_last_iteration(ev)))
    assert part.interrupted and part.signal == signal.SIGTERM and part.interrupted_during == "final validation"
    assert part.step == 6 and part.model_path is None and "val" not in [e.kind for e in events]
    assert load_state(run / "last.pt")["step"] == 6 and not (run / "model.safetensors").exists()
    assert _log(run)[-1]["event"] == "interrupted"
    events.clear()
    done = train(tiny_cfg(run, dpdd, iterations=6, save_every=4, resume=True), callback=events.append)
    assert not done.interrupted and done.losses == [] and [e.kind for e in events].count("val") == 1
    assert_same_tensors(load_checkpoint(done.model_path).state_dict, load_checkpoint(straight.model_path).state_dict)
    assert done.scores == straight.scores


def test_a_signal_while_last_pt_is_written_at_the_end_leaves_the_export_to_a_resume(tmp_path, dpdd):
    validated = []

    def signal_while_saving_after_validation(ev):
        validated.append(ev.kind == "val")
        if ev.kind == "checkpoint" and ev.data["kind"] == "last" and ev.step == 6 and any(validated):
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    part = train(tiny_cfg(run, dpdd, iterations=6), callback=signal_while_saving_after_validation)
    assert part.interrupted and part.interrupted_during == "export" and not (run / "model.safetensors").exists()
    assert load_state(run / "last.pt")["scores"]["step"] == 6
    events = []
    done = train(tiny_cfg(run, dpdd, iterations=6, resume=True), callback=events.append)
    assert done.model_path is not None and "val" not in [e.kind for e in events]  # validated before the signal
    assert load_checkpoint(done.model_path).provenance["scores"] == part.scores
    assert_same_tensors(load_checkpoint(done.model_path).state_dict, weights(run / "last.pt"))


def test_a_signal_during_a_periodic_validation_stops_it_and_the_run(tmp_path, dpdd, monkeypatch):
    """The validation used to run to its end (minutes, on a large set) before the run stopped."""
    psnr = L.psnr

    def signal_while_validating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return psnr(*args, **kwargs)

    monkeypatch.setattr(L, "psnr", signal_while_validating)
    run = tmp_path / "run"
    events = []
    part = train(tiny_cfg(run, dpdd, iterations=10, val_every=4), callback=events.append)
    assert part.interrupted and part.interrupted_during == "training" and part.step == 5
    assert "val" not in [e.kind for e in events] and not (run / "best.pt").exists()
    assert [(r["event"], r["step"]) for r in _log(run) if r["event"] in ("val_stopped", "interrupted")] == [
        ("val_stopped", 4), ("interrupted", 5)]
    assert load_state(run / "last.pt")["step"] == 5


def test_a_final_validation_that_fails_keeps_every_iteration(tmp_path, dpdd, monkeypatch):
    """last.pt is written before the final validation: a failure there (out of memory on whole
    images...) used to lose the iterations since the last periodic save."""
    def fails(*_args, **_kwargs):
        raise TrainingError("validation failed")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(L, "validate", fails)
        with pytest.raises(TrainingError) as raised:
            train(tiny_cfg(run, dpdd, iterations=6, save_every=4))
    assert str(raised.value) == f"validation failed (training stopped at iteration 6; {run / 'last.pt'} holds iteration 6)"
    assert load_state(run / "last.pt")["step"] == 6 and not (run / "model.safetensors").exists()
    done = train(tiny_cfg(run, dpdd, iterations=6, save_every=4, resume=True))
    assert done.losses == [] and done.scores["step"] == 6 and done.model_path is not None


def test_a_full_disk_at_the_export_says_where_the_run_stands_and_a_resume_exports(tmp_path, dpdd, cli, monkeypatch):
    """The message named the run folder and the error only: not that last.pt holds every
    iteration, nor how to finish the run."""
    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(L, "save_checkpoint", full_disk)
        failed = CliRunner().invoke(cli, [*_cli_args(dpdd, run), "-q"])
    assert failed.exit_code == 1, failed.output
    assert failed.stderr.splitlines() == [f"error: {run}: No space left on device; {run / 'last.pt'} holds iteration 6: "
                                          f"make room, then continue with: kpac train --resume {run}"]
    assert _record(_log(run)[-1]) == {"event": "failed", "step": 6, "error": "[Errno 28] No space left on device"}
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "--json", "-q"])
    assert resumed.exit_code == 0, resumed.output
    record = json.loads(resumed.stdout)
    assert record["model_path"] == str(run / "model.safetensors") and record["step"] == 6 and not record["already_complete"]
    assert [r["event"] for r in _since_the_last_start(run)] == ["start", "checkpoint", "end"]  # nothing trained again


def _rank_0_signalled_in_final_validation(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """Rank 0 receives SIGTERM in its final validation: what each rank's train() returns goes to ``dump``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from kpac_cli.model import KPACConfig
    from kpac_cli.train import TrainConfig, loop

    psnr = loop.psnr

    def signal_while_validating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return psnr(*args, **kwargs)

    loop.psnr = signal_while_validating
    cfg = TrainConfig(out=Path(out), data=Path(data), allow_count_mismatch=True, model=KPACConfig(levels=2, channels=8),
                      iterations=4, batch=1, crop="32", val_count=2, val_crop=32, workers=0, device="cpu", tensorboard=False)
    result = train(cfg)
    (Path(dump) / f"rank{rank}.json").write_text(json.dumps([result.interrupted, result.signal, result.step]))


@pytest.mark.slow
def test_a_signal_to_rank_0_in_its_final_validation_stops_every_rank_with_its_status(tmp_path):
    """Rank 1, which has nothing to do at the end, reports the run as rank 0 does: stopped by SIGTERM."""
    from test_train_ddp import _free_port, _spawn_ranks

    data = make_dpdd(tmp_path / "dpdd", {"train": 4, "val": 2}, size=(32, 32))
    run = tmp_path / "run"
    _spawn_ranks(_rank_0_signalled_in_final_validation, (2, _free_port(), str(data), str(run), str(tmp_path)), timeout=180)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [[True, signal.SIGTERM, 4]] * 2
    assert load_state(run / "last.pt")["step"] == 4 and not (run / "model.safetensors").exists()
    assert (_log(run)[-1]["event"], _log(run)[-1]["during"]) == ("interrupted", "final validation")


@pytest.mark.parametrize("val_every, step", [(5, 5), (1000, 6)], ids=["periodic", "final"])
def test_running_out_of_memory_in_a_validation_keeps_every_iteration_and_advises_on_the_validation(
        tmp_path, dpdd, cli, monkeypatch, val_every, step):
    """A periodic validation that failed lost the iterations since the last periodic save (last.pt
    held 4 of 5), and running out of memory in any validation advised a smaller --batch or --crop,
    which a validation does not use."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(L, "validate", _out_of_memory)
        failed = CliRunner().invoke(cli, [*_cli_args(dpdd, run), "--val-every", str(val_every), "-q"])
    message = (f"ran out of GPU memory in a validation after {step} iterations (allocating 2.00 GiB); try a --val-crop "
               f"smaller than this run's 32 (training stopped at iteration {step}; {run / 'last.pt'} holds iteration {step})")
    assert failed.exit_code == 1, failed.output
    assert load_state(run / "last.pt")["step"] == step
    assert failed.stderr.splitlines() == [f"error: {message}"]
    assert _record(_log(run)[-1]) == {"event": "failed", "step": step, "error": message}
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in _since_the_last_start(run) if r["event"] == "val"] == [6]


def _out_of_memory_above(size: int) -> Callable[..., dict]:
    """``validate`` that runs out of memory on samples larger than ``size`` pixels a side."""
    validate = L.validate

    def validate_up_to(model, samples, *args, **kwargs):
        if samples and samples[0]["input"].shape[-1] > size:
            _out_of_memory()
        return validate(model, samples, *args, **kwargs)

    return validate_up_to


def test_the_val_crop_the_memory_advice_names_works_on_resume(tmp_path, dpdd, cli, monkeypatch):
    """A validation that ran out of memory advised a smaller --val-crop, which a resume refused
    (the flag could not change): the advice only helped a new run, which lost the iterations done."""
    run = tmp_path / "run"
    monkeypatch.setattr(L, "validate", _out_of_memory_above(16))
    failed = CliRunner().invoke(cli, [*_cli_args(dpdd, run), "--val-every", "5", "-q"])
    assert failed.exit_code == 1 and "try a --val-crop smaller than this run's 32" in failed.stderr, failed.output
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "--val-crop", "16", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert [(r["event"], r["step"]) for r in _since_the_last_start(run) if r["event"].startswith("val")] == [
        ("validation_changed", 5), ("val", 6)]
    assert load_state(run / "last.pt")["train_config"]["val_crop"] == 16
    assert load_checkpoint(run / "model.safetensors").provenance["iterations"] == 6


def test_running_out_of_memory_validating_synthetic_renders_names_their_size(tmp_path, monkeypatch):
    """Synthetic data render their validation pairs at 256 px for --val-crop 0, not whole images,
    which the advice used to name."""
    from kpac_cli.model import KPACConfig
    from kpac_cli.train import TrainConfig

    monkeypatch.setattr(L, "validate", _out_of_memory)
    cfg = TrainConfig(out=tmp_path / "run", procedural=1, model=KPACConfig(levels=2, channels=8), iterations=1, batch=1,
                      crop="32", max_radius=2, val_count=1, val_crop=0, workers=0, device="cpu", tensorboard=False)
    with pytest.raises(TrainingError, match=r"in a validation after 1 iteration .*; try a --val-crop smaller than this run's 256 "):
        train(cfg)


def test_running_out_of_memory_validating_whole_images_says_to_crop_them():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")
    assert str(L._out_of_memory(cpu, DistInfo(rank=0, world_size=2), 7, val_crop=0)) == (
        "process 0 ran out of memory in a validation after 7 iterations (allocating 1073741824 bytes); this run "
        "validates whole images: try --val-crop SIZE (a centre crop of each), or smaller validation images")
    assert str(L._out_of_memory(cpu, DistInfo(), 7)) == (
        "ran out of memory after 7 iterations (allocating 1073741824 bytes); try a smaller --batch or --crop")


def _nonfinite_losses(pred, target):
    return (pred - target).abs().mean() * float("inf")


def _out_of_memory_at_the_third_iteration():
    calls = [0]
    l1_loss = L.l1_loss

    def l1_loss_until_out_of_memory(pred, target):
        calls[0] += 1
        if calls[0] == 3:
            _out_of_memory()
        return l1_loss(pred, target)

    return l1_loss_until_out_of_memory


@pytest.mark.parametrize("failure", ["non-finite losses", "out of memory"])
def test_a_run_that_fails_says_so_last_in_its_log(tmp_path, dpdd, monkeypatch, failure):
    """The log recorded the start, the steps and the checkpoints of a run that failed, then
    nothing: read later, the run could not be told from one still going, or killed."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(L, "l1_loss", _nonfinite_losses if failure == "non-finite losses" else _out_of_memory_at_the_third_iteration())
        with pytest.raises(TrainingError) as raised:
            train(tiny_cfg(run, dpdd, iterations=6, max_nonfinite=2, log_every=1))
    assert "\n" not in str(raised.value)  # the error's one line, not torch's message
    assert _record(_log(run)[-1]) == {"event": "failed", "step": 2, "error": str(raised.value)}


class _LogFileFailingOnce:
    """A log file that cannot take one record (the disk was full for a moment); as a file's
    buffer would, that record fails again when the file is closed."""

    def __init__(self, f, fails: Callable[[dict], bool]) -> None:
        self.f, self.fails, self.failed = f, fails, False

    def write(self, text: str) -> int:
        if not self.failed and self.fails(json.loads(text)):
            self.failed = True
            raise OSError(28, "No space left on device")
        return self.f.write(text)

    def close(self) -> None:
        self.f.close()
        if self.failed:
            raise OSError(28, "No space left on device")


def _log_failing_on(monkeypatch, fails: Callable[[dict], bool]) -> None:
    """Runs from now on get a log that cannot take the first record for which ``fails`` is true."""
    opened = L._Log.__init__

    def opened_failing(self, out, tensorboard):
        opened(self, out, tensorboard)
        if self.f is not None:
            self.f = _LogFileFailingOnce(self.f, fails)

    monkeypatch.setattr(L._Log, "__init__", opened_failing)


def test_a_run_whose_log_fails_writes_nothing_more_there(tmp_path, dpdd, monkeypatch):
    """The failure of the log itself is not recorded in it: the record after one that could not be
    written would make the log look whole."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _log_failing_on(m, lambda r: r["event"] == "train" and r["step"] == 2)
        with pytest.raises(OSError, match="No space left"):
            train(tiny_cfg(run, dpdd, iterations=6, log_every=1))
    assert [(r["event"], r.get("step")) for r in _log(run)][-1] == ("train", 1)


def test_a_failed_record_the_full_disk_refuses_leaves_the_runs_error_as_it_was(tmp_path, dpdd, monkeypatch):
    """Writing the failed record on a full disk fails too, and again when the log is closed:
    the run's own error (last.pt that cannot be written) is still the one raised."""
    def full_disk(_obj, path):
        raise OSError(28, "No space left on device", str(path))

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(L, "save_state", full_disk)
        _log_failing_on(m, lambda r: r["event"] == "failed")
        with pytest.raises(OSError) as raised:
            train(tiny_cfg(run, dpdd, iterations=6, save_every=4))
    assert raised.value.filename == str(run / "last.pt")
    assert "failed" not in [r["event"] for r in _log(run)]
