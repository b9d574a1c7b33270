"""Multi-process training: 2 CPU ranks (gloo) end with identical weights; rank 0 alone writes;
a failure of one rank ends every rank, in bounded time, with one message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kpac_cli.model import KPACConfig
from kpac_cli.train import load_state
from kpac_cli.train.data import _EpochOrder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_dpdd, write_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from kpac_cli.train import TrainConfig, train

    cfg = TrainConfig(out=Path(out), data=Path(data), allow_count_mismatch=True, model=KPACConfig(levels=2, channels=8),
                      iterations=4, batch=2, crop="32", lr=1e-3, val_count=1, val_crop=32, workers=0, device="cpu",
                      tensorboard=False)
    res = train(cfg)
    torch.save({"model": {k: v.detach().clone() for k, v in res.model.state_dict().items()}, "step": res.step,
                "model_path": None if res.model_path is None else str(res.model_path), "losses": res.losses},
               Path(dump) / f"rank{rank}.pt")


def test_two_gloo_ranks_hold_identical_weights(tmp_path):
    data = make_dpdd(tmp_path / "dpdd", {"train": 6, "val": 1}, size=(48, 48))
    out = tmp_path / "run"
    mp.spawn(_rank_main, args=(2, _free_port(), str(data), str(out), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == 4
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    # Each rank saw its own shard: the losses differ, the weights do not.
    assert r0["losses"] != r1["losses"]
    # Only rank 0 wrote the run's files, and they hold the shared weights.
    assert r0["model_path"] == str(out / "model.safetensors") and r1["model_path"] is None
    from kpac_cli.checkpoints import load_checkpoint

    saved = load_checkpoint(out / "model.safetensors")
    assert all(torch.equal(saved.state_dict[k], r0["model"][k]) for k in r0["model"])
    assert saved.provenance["global_batch"] == 4 and saved.provenance["hardware"]["processes"] == 2
    torch.manual_seed(0)  # the untrained weights (train() seeds with cfg.seed=0), for comparison
    from kpac_cli.model import build_model

    fresh = build_model(KPACConfig(levels=2, channels=8)).state_dict()
    assert any(not torch.equal(fresh[k], r0["model"][k]) for k in fresh)


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """The documented command line: torchrun --nproc_per_node=2 -m kpac_cli train ..."""
    data = make_dpdd(tmp_path / "dpdd", {"train": 4, "val": 1}, size=(32, 32))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "kpac_cli", "train", "--data", str(data), "--allow-count-mismatch", "--run-dir", str(out), "--levels", "2",
           "--channels", "8", "--batch", "1", "--crop", "32", "--val-crop", "32", "--iterations", "3", "--device", "cpu",
           "--workers", "0", "--no-tensorboard", "-q"]
    r = subprocess.run([*cmd, "--json"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    from kpac_cli.checkpoints import load_checkpoint

    assert load_checkpoint(out / "model.safetensors").provenance["hardware"]["processes"] == 2
    # rank 0 speaks for the run: one JSON record, the one with the model, not one per process
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1 and records[0]["model_path"] == str(out / "model.safetensors"), r.stdout


def _run_ranks(args: list[str], timeout: float = 240, program: tuple[str, ...] = ("-m", "kpac_cli")
               ) -> list[subprocess.CompletedProcess]:
    """``kpac ARGS`` in 2 processes, as torchrun starts them (its environment, gloo on the CPU);
    they must all end within ``timeout`` seconds (a rank left waiting for another fails the test).
    ``program``: what python runs instead of ``-m kpac_cli`` (``-c CODE`` that calls it)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *program, *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not end within {timeout:g} s (one waits for another)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _pairs_with_one_broken(root: Path, broken_key: int) -> str:
    """4 paired photos; the one the sample of ``broken_key`` reads (none: -1) has a target whose
    header reads but whose pixels do not (a problem met only when the sample is decoded)."""
    rng = np.random.default_rng(0)
    names = [f"p{i}" for i in range(4)]
    broken = names[_EpochOrder(4, 0)(broken_key)] if broken_key >= 0 else ""
    for folder in ("src", "tgt"):
        (root / folder).mkdir(parents=True)
    for name in names:
        img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        write_png(root / "src" / f"{name}.png", img // 2)  # an input that is its own target is refused
        write_png(root / "tgt" / f"{name}.png", img)
    if broken:
        truncated = root / "tgt" / f"{broken}.png"
        data = truncated.read_bytes()
        truncated.write_bytes(data[: len(data) // 2] + data[-12:])  # IDAT cut short, IEND kept
    return broken


_TINY_RUN = ["--levels", "2", "--channels", "8", "--batch", "1", "--crop", "32", "--device", "cpu", "--no-tensorboard"]


@pytest.mark.slow
def test_a_data_problem_of_one_rank_ends_every_rank_with_one_message(tmp_path):
    """Rank 1 meets a broken pair at its second batch: both ranks stop (exit 1) instead of rank 0
    waiting for it forever; rank 0 names the pair and where last.pt stands, rank 1 says nothing."""
    # batch 1, 2 ranks: step s reads sample 2s + rank, so sample 3 is rank 1's second
    broken = _pairs_with_one_broken(tmp_path, broken_key=3)
    run = tmp_path / "run"
    r0, r1 = _run_ranks(["train", "--source", str(tmp_path / "src"), "--target", str(tmp_path / "tgt"),
                         "--run-dir", str(run), *_TINY_RUN, "--iterations", "6", "--val-count", "0", "--cache", "no",
                         "--workers", "1", "-q"])
    assert r0.returncode == 1 and r1.returncode == 1, (r0.stderr[-3000:], r1.stderr[-3000:])
    [line] = r0.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path / 'tgt' / broken}.png: PNG file is truncated"), r0.stderr
    assert line.endswith(f"(training stopped at iteration 1; {run / 'last.pt'} holds iteration 1)"), r0.stderr
    assert r1.stderr == "", r1.stderr
    assert load_state(run / "last.pt")["step"] == 1


def test_each_rank_gets_its_own_gpu_for_auto_and_plain_cuda(monkeypatch):
    from kpac_cli.distributed import DistInfo, device_for_rank

    two_ranks = DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for_rank("auto", two_ranks) == "cuda:1"
    assert device_for_rank("cuda", two_ranks) == "cuda:1"  # not every rank on cuda:0
    assert device_for_rank("cuda:0", two_ranks) == "cuda:0"  # an explicit index is kept
    assert device_for_rank("cpu", two_ranks) == "cpu"
    assert device_for_rank("cuda", DistInfo()) == "cuda"  # a single process is unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for_rank("auto", two_ranks) == "cpu"


@pytest.mark.slow
def test_a_set_up_failure_of_one_rank_ends_every_rank(tmp_path):
    """Only rank 0 reads the validation photos: one that cannot be read is a usage error there
    (exit 2, as with one process), and rank 1 stops with it (exit 1, silent) instead of waiting
    for rank 0 in DDP's first broadcast. No run folder is left behind."""
    _pairs_with_one_broken(tmp_path, broken_key=-1)
    (tmp_path / "vs").mkdir()
    (tmp_path / "vt").mkdir()
    write_png(tmp_path / "vs" / "v.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "vt" / "v.png").write_text("not an image")
    run = tmp_path / "run"
    r0, r1 = _run_ranks(["train", "--source", str(tmp_path / "src"), "--target", str(tmp_path / "tgt"),
                         "--val-source", str(tmp_path / "vs"), "--val-target", str(tmp_path / "vt"), "--val-crop", "32",
                         "--run-dir", str(run), *_TINY_RUN, "--iterations", "4", "--workers", "0", "-q"])
    assert (r0.returncode, r1.returncode) == (2, 1), (r0.stderr[-3000:], r1.stderr[-3000:])
    assert len(r0.stderr.splitlines()) == 1 and f"{tmp_path / 'vt' / 'v.png'}: not a recognised image" in r0.stderr
    assert r1.stderr == "", r1.stderr
    assert not run.exists()


def _train_and_dump(cfg, rank: int, dump: str) -> None:
    """Run ``cfg`` on this rank and write what it raised (type and message, or null) to ``dump``/rank<N>.json."""
    from kpac_cli.train import train

    try:
        train(cfg)
        raised = None
    except Exception as e:  # noqa: BLE001 - what the rank raised is the result
        raised = [type(e).__name__, str(e)]
    (Path(dump) / f"rank{rank}.json").write_text(json.dumps(raised))


def _rank_whose_checkpoint_fails(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    """Rank 0 cannot write last.pt at iteration 2 (a full disk): what each rank raises goes to ``dump``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from kpac_cli.train import TrainConfig
    from kpac_cli.train import loop

    def full_disk(_obj, _path):
        raise OSError(28, "No space left on device")

    loop.save_state = full_disk
    cfg = TrainConfig(out=Path(out), data=Path(data), allow_count_mismatch=True, model=KPACConfig(levels=2, channels=8),
                      iterations=6, save_every=2, batch=1, crop="32", val_count=0, workers=0, device="cpu",
                      tensorboard=False)
    _train_and_dump(cfg, rank, dump)


def _spawn_ranks(function, args: tuple, timeout: float) -> None:
    """Run ``function(rank, *args)`` in 2 spawned processes and wait for both to end; a test
    failure (and both killed) when they have not ended after ``timeout`` seconds (one waits for
    another)."""
    ranks = mp.start_processes(function, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("the ranks did not end (one waits for another)")


def test_a_checkpoint_rank_0_cannot_write_ends_every_rank(tmp_path):
    """Rank 0's failure after a step (writing last.pt) reaches rank 1 at the next step's agreement:
    rank 0 raises its own error, rank 1 a RankFailed naming it; neither waits forever."""
    data = make_dpdd(tmp_path / "dpdd", {"train": 4, "val": 1}, size=(32, 32))
    _spawn_ranks(_rank_whose_checkpoint_fails, (2, _free_port(), str(data), str(tmp_path / "run"), str(tmp_path)), timeout=240)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == ["OSError", "[Errno 28] No space left on device"]
    assert r1 == ["RankFailed", "process 0 stopped the run: [Errno 28] No space left on device"]
