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


# what gloo prints when it aborts while a rank tears its process group down (after the work was done)
_TEARDOWN_ABORT = "terminate called without an active exception"


def _launch(case, method, out, *flags, world=2, timeout=120):
    """Run the worker on ``world`` ranks. Relaunched (at most twice) only when the free port found was taken
    meanwhile, or when a rank aborted in gloo's teardown after the output was written (rare, seen on a loaded
    machine); any other failure is returned as it is."""
    for attempt in range(3):
        if os.path.exists(out):
            os.remove(out)
        results, secs = _launch_once(case, method, out, *flags, world=world, timeout=timeout)
        errs = [err.lower() for _, err in results]
        port = any("address already in use" in e or "eaddrinuse" in e for e in errs)
        teardown = (os.path.exists(out) and any(rc != 0 for rc, _ in results)
                    and all(rc == 0 or _TEARDOWN_ABORT in err for rc, err in results))
        if not (port or teardown):
            break
    return results, secs


def _launch_once(case, method, out, *flags, world=2, timeout=120):
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
                                         ("cnn", "hf-linear"), ("cnn", "kf-linear"), ("cnn", "git-rebasin"),
                                         ("mixer", "kf-linear")])
def test_two_ranks_with_half_the_data_each_equal_one_process_with_all(case, method, tmp_path):
    out = tmp_path / "fused.pt"
    results, _ = _launch(case, method, out)
    assert all(rc == 0 for rc, _ in results), [err[-3000:] for _, err in results]
    saved = torch.load(out)
    got = saved["state"]
    single = _single(case, method)
    want = single.state_dict()
    # the report counts every rank's rows once, for each level and each op of a block level
    rows = [[(r.get("rows"), [op["rows"] for op in r.get("ops") or []]) for r in levels]
            for levels in (saved["levels"], single.meta["fxfuse"].get("levels", []))]
    assert rows[0] == rows[1]
    assert got.keys() == want.keys()
    for k, v in want.items():
        if v.is_floating_point():
            scale = float(v.abs().max()) or 1.0
            assert float((got[k] - v).abs().max()) <= 1e-5 * scale, k  # statistics are float64


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


@pytest.mark.parametrize("flag,message", [
    ("--other-shape", "per-sample shapes of the fusion data differ across ranks"),
    ("--other-models", "base models' parameters (checksums) differ across ranks"),
])
def test_ranks_that_disagree_stop_before_any_work(flag, message, tmp_path):
    results, _ = _launch("mlp", "kf-linear", tmp_path / "x.pt", flag)
    assert all(rc != 0 for rc, _ in results)
    for _, err in results:
        assert message in err
    assert not (tmp_path / "x.pt").exists()


RECIPE = """\
format: fxfuse-recipe/1
models:
  - {model: test_resnet, checkpoint: a.safetensors, model_args: {num_classes: 10, in_chans: 1}}
  - {model: test_resnet, checkpoint: b.safetensors, model_args: {num_classes: 10, in_chans: 1}}
data:
  fusion: {source: digits, split: train, samples: 96}
  eval: {source: digits, split: test}
  transform: {input_size: [1, 16, 16]}
method: {name: kf-linear, options: {n_init: 2}}
device: cpu
output: {path: OUT, formats: [safetensors]}
"""


def test_torchrun_runs_a_recipe_on_two_ranks_like_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m fxfuse run recipe.yaml`: each rank fuses half the samples, rank 0 writes the
    timm directory, and its weights equal those of a one-process run."""
    import timm
    from safetensors.torch import load_file, save_file

    for k, name in enumerate("ab"):
        torch.manual_seed(k)
        m = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
        save_file({n: v.contiguous() for n, v in m.state_dict().items()}, tmp_path / f"{name}.safetensors")
    (tmp_path / "two.yaml").write_text(RECIPE.replace("OUT", "two"))
    (tmp_path / "one.yaml").write_text(RECIPE.replace("OUT", "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FXFUSE_DIST_TIMEOUT": "30"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_port()}", "-m", "fxfuse", "run", "two.yaml"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("fused (kf-linear)") >= 1 and "rank 0 of 2: samples 0..47" in res.stdout
    one = subprocess.run([sys.executable, "-m", "fxfuse", "run", "one.yaml", "--quiet"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert float((a[k] - b[k]).abs().max()) <= 1e-4 * max(float(b[k].abs().max()), 1.0), k
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]


def _kl_to_ensemble(model, models, x):
    with torch.no_grad():
        p = torch.stack([m(x).softmax(-1) for m in models]).mean(0)
        return float(torch.nn.functional.kl_div(model(x).log_softmax(-1), p, reduction="batchmean"))


@pytest.mark.parametrize("method", ["np-merge", "np-merge-levelwise", "last-layer-kd"])
def test_gradient_methods_train_under_ddp(method, tmp_path):
    """The methods that learn by gradient on the fusion data (NP Merge's α, last-layer distillation) train under
    DistributedDataParallel on the ranks' shards and end as close to the ensemble as one process on all the data."""
    import copy

    from dist_worker import case

    out = tmp_path / "fused.pt"
    results, _ = _launch("mlp", method, out)
    assert all(rc == 0 for rc, _ in results), [err[-3000:] for _, err in results]
    single = _single("mlp", method)
    spread = copy.deepcopy(single)
    spread.load_state_dict(torch.load(out)["state"])
    models, x = case("mlp")
    kl_single, kl_spread = _kl_to_ensemble(single, models, x), _kl_to_ensemble(spread, models, x)
    assert kl_spread <= 1.5 * kl_single + 1e-4, (kl_spread, kl_single)


def test_finetune_under_ddp(tmp_path):
    from dist_worker import case

    out = tmp_path / "fused.pt"
    results, _ = _launch("mlp", "kf-linear", out, "--finetune")
    assert all(rc == 0 for rc, _ in results), [err[-3000:] for _, err in results]
    losses = torch.load(out)["finetune"]["loss"]
    models, x = case("mlp")
    with torch.no_grad():
        labels = models[0](x).argmax(-1)
    single = fxfuse.finetune(_single("mlp", "kf-linear"), (x, labels), epochs=5, lr=1e-3, progress=False)
    want = single.meta["fxfuse"]["finetune"]["loss"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert losses[-1] <= 1.25 * want[-1] + 1e-3, (losses, want)
