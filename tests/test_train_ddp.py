"""Multi-process training: 2 CPU ranks (gloo) end with identical weights; rank 0 alone writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kpac_cli.model import KPACConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_dpdd  # noqa: E402

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
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    from kpac_cli.checkpoints import load_checkpoint

    assert load_checkpoint(out / "model.safetensors").provenance["hardware"]["processes"] == 2


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
