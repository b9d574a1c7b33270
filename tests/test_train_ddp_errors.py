"""Multi-process training, how runs end: a rank that fails between two agreements (in its
backward pass, while DDP's gradient all-reduce is in flight on the others), rank 0's end of
the run that fails, a signal sent to one rank. Every rank ends, in bounded time, with the same
exit status and one message. 2 CPU ranks (gloo), as tests/test_train_ddp.py runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_dpdd  # noqa: E402
from test_train_ddp import REPO, _free_port, _run_ranks, _spawn_ranks, _TINY_RUN, _train_and_dump  # noqa: E402

# The backward pass of one rank's given iteration raises an error (RANK, ITERATION, ERROR).
_FAILING_BACKWARD = """
import os
import torch
from kpac_cli.train import loop

RANK, ITERATION, ERROR = {rank}, {iteration}, {error}
calls = [0]


class Fails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise ERROR


l1_loss = loop.l1_loss


def failing_l1_loss(pred, target):
    calls[0] += 1
    if int(os.environ.get("RANK", "0")) == RANK and calls[0] == ITERATION:
        pred = Fails.apply(pred)
    return l1_loss(pred, target)


loop.l1_loss = failing_l1_loss
"""
_RUN_KPAC = "from kpac_cli.__main__ import main\nmain()\n"

_OOM = 'torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 79.10 GiB")'


def _failing_backward(rank: int, iteration: int, error: str) -> str:
    """kpac's command line, with the backward pass of ``rank``'s ``iteration`` raising ``error`` (Python source)."""
    return _FAILING_BACKWARD.format(rank=rank, iteration=iteration, error=error) + _RUN_KPAC


def test_running_out_of_memory_says_so_in_one_line(tmp_path, monkeypatch):
    """An out-of-memory error mid-run is a TrainingError that says what to change (it was a
    traceback): a GPU's, and the CPU allocator's, which names the process under torchrun."""
    from kpac_cli.distributed import DistInfo
    from kpac_cli.train import TrainingError, loop, train
    from test_train import tiny_cfg

    monkeypatch.setattr(loop, "l1_loss", loop.l1_loss)  # put back after the test
    exec(_FAILING_BACKWARD.format(rank=0, iteration=3, error=_OOM), {})
    data = make_dpdd(tmp_path / "dpdd", {"train": 4, "val": 1}, size=(32, 32))
    with pytest.raises(TrainingError, match=r"^ran out of GPU memory after 2 iterations \(allocating 2\.00 GiB\); "
                                            r"try a smaller --batch or --crop$"):
        train(tiny_cfg(tmp_path / "run", data, iterations=4, val_count=1))
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")
    assert str(loop._out_of_memory(cpu, DistInfo(rank=3, world_size=4), 7)) == (
        "process 3 ran out of memory after 7 iterations (allocating 1073741824 bytes); try a smaller --batch or --crop")
    assert loop._out_of_memory(RuntimeError("shapes do not match"), DistInfo(), 7) is None


@pytest.fixture(scope="module")
def dpdd(tmp_path_factory) -> Path:
    return make_dpdd(tmp_path_factory.mktemp("dpdd"), {"train": 4, "val": 1}, size=(32, 32))


def _train_args(data: Path, run: Path, iterations: int = 6) -> list[str]:
    return ["train", "--data", str(data), "--allow-count-mismatch", "--run-dir", str(run), *_TINY_RUN,
            "--val-crop", "32", "--iterations", str(iterations), "--workers", "0", "-q"]


@pytest.mark.slow
def test_running_out_of_memory_in_one_ranks_backward_ends_every_rank(dpdd, tmp_path):
    """Rank 1 runs out of memory in its second backward pass while rank 0 waits for its gradients
    in DDP's all-reduce: rank 1 leaves without waiting for rank 0 in any collective (it used to
    wait in the teardown's barrier, and rank 0 in the all-reduce, for the process group's
    timeout), says why in one line; rank 0 stops on losing it; both exit 1."""
    r0, r1 = _run_ranks(_train_args(dpdd, tmp_path / "run"), timeout=180,
                        program=("-c", _failing_backward(rank=1, iteration=2, error=_OOM)))
    assert (r0.returncode, r1.returncode) == (1, 1), (r0.stderr[-3000:], r1.stderr[-3000:])
    assert r1.stderr.splitlines() == ["error: process 1 ran out of GPU memory after 1 iteration (allocating 2.00 GiB); "
                                      "try a smaller --batch or --crop"], r1.stderr
    assert re.fullmatch(r"error: process 0 stopped after 1 iteration: it lost contact with another process of the run "
                        r"\(.*by peer.*\), which ended or stopped answering; that process's "
                        r"message, or its exit status, says why\n", r0.stderr), r0.stderr


@pytest.mark.slow
def test_torchrun_ends_the_run_when_one_rank_fails_in_its_backward_pass(dpdd, tmp_path):
    """The same under torchrun, with an unexpected error on rank 0: rank 0 exits at once (with
    the error's traceback), so torchrun stops rank 1 and exits 1; rank 1, the one that lost the
    other, says nothing."""
    script = tmp_path / "failing_backward.py"
    script.write_text(_failing_backward(rank=0, iteration=2, error='RuntimeError("an unexpected error")'))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           str(script), *_train_args(dpdd, tmp_path / "run")]
    torchrun = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = torchrun.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        torchrun.terminate()  # torchrun then ends its workers (a kill would leave them behind)
        torchrun.communicate(timeout=90)
        pytest.fail("torchrun did not end within 180 s (a rank waits for another)")
    assert torchrun.returncode == 1, stderr[-3000:]
    assert "RuntimeError: an unexpected error" in stderr, stderr[-3000:]
    assert "lost contact" not in stderr and "Timed out" not in stderr, stderr[-3000:]


def _rank_whose_end_fails(rank: int, world: int, port: int, data: str, out: str, dump: str, what: str) -> None:
    """Rank 0 cannot write the model at the end (``what`` = export) or the log mid-run (log):
    what each rank raises goes to ``dump``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from kpac_cli.model import KPACConfig
    from kpac_cli.train import TrainConfig, loop

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    if what == "export":
        loop.save_checkpoint = full_disk
    else:
        write = loop._Log.write

        def write_until_full(self, event, **fields):
            if event == "train" and fields["step"] == 2:
                full_disk()
            write(self, event, **fields)

        loop._Log.write = write_until_full
    cfg = TrainConfig(out=Path(out), data=Path(data), allow_count_mismatch=True, model=KPACConfig(levels=2, channels=8),
                      iterations=4, batch=1, crop="32", val_count=1, val_crop=32, log_every=1, workers=0, device="cpu",
                      tensorboard=False)
    _train_and_dump(cfg, rank, dump)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["export", "log"])
def test_a_failure_of_rank_0s_writes_ends_every_rank_alike(dpdd, tmp_path, what):
    """Rank 0's export at the end of the run (rank 1 used to end as if the run had succeeded:
    exit 0 beside rank 0's 1), or its log mid-run (rank 1 used to wait for it in the next
    agreement), fails: rank 0 raises the error, rank 1 a RankFailed naming it (silent, exit 1)."""
    _spawn_ranks(_rank_whose_end_fails, (2, _free_port(), str(dpdd), str(tmp_path / "run"), str(tmp_path), what), timeout=180)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == ["OSError", "[Errno 28] No space left on device"]
    assert r1 == ["RankFailed", "process 0 stopped the run: [Errno 28] No space left on device"]
    assert not (tmp_path / "run" / "model.safetensors").exists()



def _two_ranks_without_torchrun(dpdd, run: Path, *extra: str) -> list[subprocess.Popen]:
    """Two training processes joined by RANK/WORLD_SIZE/MASTER_* alone (no launcher to end them)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "kpac_cli", *_train_args(dpdd, run, iterations=100_000),
                                       "--log-every", "1", *extra], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _wait_until_training(procs: list[subprocess.Popen], log: Path) -> None:
    """Until the run has logged two training records (every rank past its set-up)."""
    deadline = time.monotonic() + 180
    while not (log.is_file() and log.read_text().count('"event": "train"') >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(0.2)

@pytest.mark.slow
def test_a_sigterm_to_one_rank_stops_every_rank_with_its_status(dpdd, tmp_path):
    """SIGTERM to rank 1 alone: every rank stops at the same iteration, rank 0 saves last.pt, and
    every rank exits 143 (rank 0, which received no signal, used to exit 130, and its log said
    signal null)."""
    run = tmp_path / "run"
    procs = _two_ranks_without_torchrun(dpdd, run)
    log = run / "log.jsonl"
    try:
        _wait_until_training(procs, log)
        procs[1].send_signal(signal.SIGTERM)
        ended = [p.communicate(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks did not stop on the signal")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in ended]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["event"] == "interrupted" and events[-1]["signal"] == signal.SIGTERM
    from kpac_cli.train import load_state

    assert load_state(run / "last.pt")["step"] == events[-1]["step"]


@pytest.mark.slow
def test_a_rank_stranded_by_one_that_hangs_gives_up_after_dist_timeout(dpdd, tmp_path):
    """Ranks started without torchrun, whose launcher would end the others: rank 0 hangs (stopped)
    mid-run, and rank 1 waited in its collective for the process group's default timeout (30 min
    with gloo, 10 with NCCL). With --dist-timeout 3 it gives up within seconds, says so in one
    line (rank 0, which would speak for the run, cannot) and exits 1."""
    run = tmp_path / "run"
    procs = _two_ranks_without_torchrun(dpdd, run, "--dist-timeout", "3")
    try:
        _wait_until_training(procs, run / "log.jsonl")
        procs[0].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, stranded = procs[1].communicate(timeout=60)
        waited = time.monotonic() - stopped
    except subprocess.TimeoutExpired:
        pytest.fail("rank 1 did not give up on the rank that hung")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # also a stopped process
            p.communicate()
    assert procs[1].returncode == 1 and waited < 30, (waited, stranded[-3000:])
    assert re.fullmatch(r"error: process 1 stopped after \d+ iterations: another process of the run did not answer within "
                        r"--dist-timeout 3 s \(Timed out .*\): it hung, or ended without closing its connections\n",
                        stranded), stranded


def test_a_rank_that_no_other_joins_gives_up_after_dist_timeout_in_one_line(dpdd, tmp_path, monkeypatch):
    """Rank 0 of two whose other process never starts: joining them failed after the timeout with a
    traceback; now one line, exit 1, and no run folder. --dist-timeout is a usage error where it would
    do nothing (a single process) or is no time."""
    from typer.testing import CliRunner

    from kpac_cli.cli import app

    run = tmp_path / "run"
    args = _train_args(dpdd, run)
    single = CliRunner().invoke(app, [*args, "--dist-timeout", "1"])
    assert single.exit_code == 2 and "--dist-timeout applies to runs of several processes" in single.stderr, single.output
    for env, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(env, value)
    for bad in ("0", "nan"):
        r = CliRunner().invoke(app, [*args, "--dist-timeout", bad])
        assert r.exit_code == 2 and "--dist-timeout must be a number of seconds > 0" in r.stderr, r.output
    started = time.monotonic()
    alone = CliRunner().invoke(app, [*args, "--dist-timeout", "1"])
    assert alone.exit_code == 1 and time.monotonic() - started < 20, alone.output
    assert re.fullmatch(r"error: process 0 could not join the other processes of the run \(Timed out .*\); are they all "
                        r"started, with the same MASTER_ADDR and MASTER_PORT\?\n", alone.stderr), alone.stderr
    assert not run.exists()
