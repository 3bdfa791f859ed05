"""fxfuse.fuse inside a torch.distributed process group: two gloo processes on CPU, launched as torchrun does."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import fxfuse

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.environ.get("FXFUSE_TEST_WORKER", os.path.join(HERE, "dist_worker.py"))
sys.path.insert(0, HERE)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(case, method, out, *flags, world=2, timeout=120):
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()),
           "FXFUSE_DIST_TIMEOUT": "20", "OMP_NUM_THREADS": "1"}
    procs = []
    for r in range(world):
        e = {**env, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world)}
        procs.append(subprocess.Popen([sys.executable, WORKER, case, method, str(out), *flags], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.perf_counter()
    results = []
    for p in procs:
        try:
            o, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, err))
    return results, time.perf_counter() - t0


def _single(case, method):
    from dist_worker import METHOD_OPTIONS, case as make

    models, x = make(case)
    return fxfuse.fuse(models, x, method=method, progress=False, device="cpu", **METHOD_OPTIONS.get(method, {}))


@pytest.mark.parametrize("case,method", [("mlp", "hf-linear"), ("mlp", "kf-linear"), ("mlp", "git-rebasin"),
                                         ("cnn", "hf-linear"), ("cnn", "kf-linear"), ("cnn", "git-rebasin")])
def test_two_ranks_with_half_the_data_each_equal_one_process_with_all(case, method, tmp_path):
    out = tmp_path / "fused.pt"
    results, _ = _launch(case, method, out)
    assert all(rc == 0 for rc, _ in results), [err[-3000:] for _, err in results]
    got = torch.load(out)["state"]
    want = _single(case, method).state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        if v.is_floating_point():
            scale = float(v.abs().max()) or 1.0
            assert float((got[k] - v).abs().max()) <= 1e-4 * scale, k


def test_kf_gradient_under_ddp_reaches_the_single_process_loss(tmp_path):
    out = tmp_path / "fused.pt"
    results, _ = _launch("mlp", "kf-gradient", out)
    assert all(rc == 0 for rc, _ in results), [err[-3000:] for _, err in results]
    dist_levels = torch.load(out)["levels"]
    single_levels = _single("mlp", "kf-gradient").meta["fxfuse"]["levels"]
    for d, s in zip(dist_levels, single_levels):
        if "gradient" in d["approximation"]:
            assert d["approx_error"] <= 1.01 * s["approx_error"] + 1e-6, (d["name"], d["approx_error"], s["approx_error"])


def test_a_failing_rank_stops_both_within_the_timeout_and_is_named(tmp_path):
    results, secs = _launch("mlp", "kf-linear", tmp_path / "x.pt", "--fail", timeout=90)
    assert all(rc != 0 for rc, _ in results) and secs < 60
    assert "rank 1 of 2" in results[1][1] and "NaN" in results[1][1]
    assert "rank 0 of 2" in results[0][1]
    assert not (tmp_path / "x.pt").exists()


def test_ranks_with_different_models_stop_before_any_level(tmp_path):
    results, _ = _launch("mlp", "kf-linear", tmp_path / "x.pt", "--other-models")
    assert all(rc != 0 for rc, _ in results)
    for _, err in results:
        assert "base models' parameters (checksums) differ across ranks" in err
    assert not (tmp_path / "x.pt").exists()
