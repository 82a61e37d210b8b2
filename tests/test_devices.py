"""The devices users have, proved where they can be: MPS's lack of float64 under a dispatch mode on the
CPU, CUDA- and MPS-shaped RNG states forged into checkpoints, and the CUDA policy (AMP dtype, fused
optimizer, cuDNN, compile shapes) as pure functions called with the device facts as arguments."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fixtures.devices import NoFloat64

from trainer.checkpoint import load_checkpoint, save_checkpoint
from runspec.config import TrainConfig
from trainer.train import fit


def small(tmp_path, mnist_dir, **overrides) -> TrainConfig:
    base = dict(data_dir=str(mnist_dir), out_dir=str(tmp_path / "runs"), train_limit=1024, eval_limit=300,
                epochs=2, batch_size=128, progress=False, threads=2, report=False, device="cpu")
    return TrainConfig(**{**base, **overrides})


def epochs(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


# ---------------------------------------------------------------------------------- MPS: no float64
def float64_tensors(obj, path="") -> list[str]:
    if isinstance(obj, torch.Tensor):
        return [path] if obj.dtype == torch.float64 else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in float64_tensors(v, f"{path}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in float64_tensors(v, f"{path}[{i}]")]
    return []


@pytest.mark.slow
def test_no_float64_tensor_in_train_evaluate_checkpoint_resume_report_predict(tmp_path, mnist_dir):
    from trainer.inference import load_model, predict, test_accuracy
    from trainer.report import write_report

    with NoFloat64():
        stopped = fit(small(tmp_path, mnist_dir, run_id="f", stop_after=1, rotate=10, perspective=0.5, crop=0.5,
                            brightness=0.2, contrast=0.2, label_smoothing=0.1))
        assert stopped["status"] == "stopped"
        run_dir = tmp_path / "runs" / "f"
        result = fit(TrainConfig(resume=str(run_dir), progress=False, report=True),
                     explicit={"resume", "progress", "report"})
        assert result["status"] == "completed" and result["epochs"] == 2
        model, _ = load_model(run_dir, torch.device("cpu"))
        _, acc, n = test_accuracy(model, str(mnist_dir), torch.device("cpu"))
        assert n == 10000 and 0 < acc <= 100
        assert predict(model, torch.zeros(1, 28, 28, dtype=torch.uint8), torch.device("cpu")).shape == (10,)
        write_report(run_dir)
    # what a checkpoint carries to an MPS machine must load there too
    for name in ("last.pt", "best.pt", "model.pt"):
        assert float64_tensors(load_checkpoint(run_dir / name)) == [], name


def test_the_float64_guard_catches_float64():
    """The guard itself must be able to fail."""
    with pytest.raises(AssertionError, match="float64"):
        with NoFloat64():
            torch.zeros(3).double().sum()


# ---------------------------------------------------------------------------------- resume across devices
def _forge(ckpt_path, **rng):
    ckpt = load_checkpoint(ckpt_path)
    ckpt["rng"].update(rng)
    save_checkpoint(ckpt_path, {k: v for k, v in ckpt.items() if k != "format"})


CUDA_STATE = {"device": "cuda", "state": torch.arange(16, dtype=torch.uint8)}  # seed + offset: 16 bytes


@pytest.mark.parametrize("forged", [
    pytest.param(dict(generator=CUDA_STATE, accelerator=CUDA_STATE), id="cuda-run"),
    pytest.param(dict(generator={"device": "mps", "state": torch.zeros(44, dtype=torch.uint8)}), id="mps-run"),
    # before states carried their device: a bare 16-byte CUDA state, and every GPU of an 8-GPU machine
    pytest.param(dict(generator=torch.arange(16, dtype=torch.uint8),
                      cuda=[torch.arange(16, dtype=torch.uint8)] * 8), id="legacy-cuda-run"),
])
@pytest.mark.slow
def test_a_gpu_run_resumes_on_the_cpu_reseeded_and_repeatable(tmp_path, mnist_dir, capfd, forged):
    import shutil

    fit(small(tmp_path, mnist_dir, run_id="gpu", stop_after=1))
    run_dir = tmp_path / "runs" / "gpu"
    _forge(run_dir / "last.pt", **forged)
    shutil.copytree(run_dir, tmp_path / "runs" / "again")
    capfd.readouterr()
    first = fit(TrainConfig(resume=str(run_dir), progress=False, report=False),
                explicit={"resume", "progress", "report"})
    err = capfd.readouterr().err
    assert first["status"] == "completed" and first["epochs"] == 2
    notes = [l for l in err.splitlines() if "random state" in l]
    assert len(notes) == 1 and "re-seeded from (seed 1, epoch 2, step 0)" in notes[0], err
    # the re-seeding is a function of (seed, epoch, step): the same resume twice gives the same run
    fit(TrainConfig(resume=str(tmp_path / "runs" / "again"), progress=False, report=False),
        explicit={"resume", "progress", "report"})
    strip = lambda rows: [{k: v for k, v in r.items() if k not in {"seconds", "train_seconds", "img_per_s", "elapsed"}}
                          for r in rows]
    assert strip(epochs(run_dir)) == strip(epochs(tmp_path / "runs" / "again"))


def test_a_cpu_state_restores_exactly_and_a_foreign_one_reseeds():
    from trainer.device import derived_seed, generator_state, restore_generator

    gen = torch.Generator().manual_seed(5)
    saved = generator_state(gen)
    assert saved["device"] == "cpu" and saved["state"].numel() == 5056
    expected = torch.rand(3, generator=gen)
    fresh = torch.Generator().manual_seed(99)
    assert restore_generator(fresh, saved, fallback_seed=1) is True
    assert torch.equal(torch.rand(3, generator=fresh), expected)
    # a CUDA-shaped state cannot be set on a CPU generator: re-seeded, deterministically
    assert restore_generator(fresh, CUDA_STATE, fallback_seed=derived_seed(1, 2, 3, 4)) is False
    assert torch.equal(torch.rand(3, generator=fresh),
                       torch.rand(3, generator=torch.Generator().manual_seed(derived_seed(1, 2, 3, 4))))
    assert len({derived_seed(1, e, s, k) for e in range(3) for s in range(3) for k in range(3)}) == 27


@pytest.mark.slow
def test_checkpoints_record_each_generators_device(tmp_path, mnist_dir):
    fit(small(tmp_path, mnist_dir, run_id="r", epochs=1))
    rng = load_checkpoint(tmp_path / "runs" / "r" / "last.pt")["rng"]
    assert rng["generator"]["device"] == "cpu" and "cuda" not in rng and "accelerator" not in rng


# ---------------------------------------------------------------------------------- CUDA policy, as pure functions
@pytest.mark.parametrize("device_type,amp,cap,expected", [
    ("cuda", "auto", (8, 0), None),  # fp32 unless asked: these nets are launch-bound
    ("cuda", "on", (7, 5), torch.float16),  # a T4: bf16 only emulated
    ("cuda", "on", (8, 0), torch.bfloat16),  # A100
    ("cuda", "on", (8, 6), torch.bfloat16),  # A10G
    ("cuda", "on", (9, 0), torch.bfloat16),  # H100
    ("mps", "on", None, torch.float16),
    ("mps", "auto", None, None),
    ("cpu", "on", None, torch.bfloat16),
    ("cpu", "off", None, None),
])
def test_amp_dtype_follows_the_hardware(device_type, amp, cap, expected):
    from trainer.device import amp_dtype, needs_grad_scaler

    assert amp_dtype(device_type, amp, cap) == expected
    assert needs_grad_scaler(expected) == (expected == torch.float16)


def test_fused_optimizer_on_cuda_only():
    from trainer.device import fused_optimizer
    from trainer.optim import make_optimizer

    assert fused_optimizer("cuda") and not fused_optimizer("cpu") and not fused_optimizer("mps")
    model = torch.nn.Linear(2, 2)
    for name in ("sgd", "adam", "adamw"):
        assert not make_optimizer(TrainConfig(optimizer=name), model, "cpu").defaults.get("fused")


def test_cudnn_benchmark_unless_deterministic():
    from trainer.device import configure_backends

    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    try:
        configure_backends(torch.device("cuda"), deterministic=False)
        assert cudnn.benchmark and not cudnn.deterministic
        configure_backends(torch.device("cuda"), deterministic=True)
        assert not cudnn.benchmark and cudnn.deterministic and torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # ops without a deterministic kernel warn
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2])


def test_static_shapes_drop_the_last_partial_batch():
    from trainer.optim import epoch_steps

    assert epoch_steps(TrainConfig(), 50000) == 391  # 390 full batches and one of 80
    assert epoch_steps(TrainConfig(compile=True), 50000) == 390
    assert epoch_steps(TrainConfig(cuda_graph=True), 50000) == 390


@pytest.mark.slow
def test_compile_keeps_one_graph_and_reports_compile_time_apart(tmp_path, mnist_dir, monkeypatch):
    """1,000 images = 7 batches of 128 and one of 104: a ragged batch would compile a second graph.
    (Dynamo's graph count does not depend on the backend: aot_eager keeps this test fast.)"""
    import torch._dynamo.utils as dynamo_utils

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, dynamic=None: real_compile(
        model, backend="aot_eager", dynamic=dynamic))
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    fit(small(tmp_path, mnist_dir, run_id="c", train_limit=1000, compile=True))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    rows = epochs(tmp_path / "runs" / "c")
    assert rows[0]["compile_seconds"] > 0 and "compile_seconds" not in rows[1]
    log = [l for l in (tmp_path / "runs" / "c" / "train.log").read_text().splitlines() if l.startswith("Epoch:")]
    assert "s compile)" in log[0] and "compile" not in log[1]


@pytest.mark.slow
def test_distributed_stop_check_is_every_n_steps_on_every_rank(tmp_path, mnist_dir):
    """Agreeing on a stop is an all-reduce + host sync: not every step, and at the same steps on all ranks."""
    from trainer.data import load_mnist, make_splits
    from trainer.distributed import Dist
    from trainer.models import build_model
    from trainer.engine import Engine
    from trainer.epoch import STOP_CHECK_EVERY, EpochProgress, train_one_epoch

    asked = []

    class TwoRanks(Dist):
        def any(self, flag, device):
            asked.append(len(progress_steps))
            return flag

    cfg = small(tmp_path, mnist_dir, train_limit=4096)
    data = make_splits(load_mnist(mnist_dir), 0, 1, torch.device("cpu"), 4096)
    model = build_model("net8k")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    progress_steps = []
    model.register_forward_hook(lambda *a: progress_steps.append(1))
    engine = Engine(device=torch.device("cpu"), amp_dtype=None, memory_format=torch.contiguous_format,
                    generator=torch.Generator().manual_seed(0), scaler=None, dist=TwoRanks(rank=0, world=2))
    assert train_one_epoch(model, data.train, opt, None, False, cfg, engine, EpochProgress(1), False)
    assert 4096 // 128 == 32 and asked == [STOP_CHECK_EVERY, 2 * STOP_CHECK_EVERY]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_cpu_runs_optimizer_state_fits_a_cuda_runs_fused_optimizer(optimizer):
    """A checkpoint carries its machine's optimizer flags and layouts; the resuming machine's win.
    (CUDA gets fused optimizers; their CPU kernels stand in for them here.)"""
    from trainer.optim import load_optimizer_state, make_optimizer

    torch.manual_seed(0)
    cfg = TrainConfig(optimizer=optimizer, lr=0.01)
    saved_model = torch.nn.Conv2d(3, 4, 3)  # the laptop: contiguous, not fused
    saved = make_optimizer(cfg, saved_model, "cpu")
    saved_model(torch.randn(2, 3, 5, 5)).sum().backward()
    saved.step()
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)  # the GPU box: channels-last, fused
    model.load_state_dict(saved_model.state_dict())
    fused = make_optimizer(cfg, model, "cuda")
    load_optimizer_state(fused, saved.state_dict())
    assert fused.param_groups[0]["fused"] is True
    for p in model.parameters():
        for name, value in fused.state[p].items():
            if value.shape == p.shape:
                assert value.stride() == p.stride(), name
    # what the GradScaler does with a fused optimizer: refused by a group that lost its fused flag
    model(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).sum().backward()
    fused.grad_scale, fused.found_inf = torch.tensor(1.0), torch.zeros(())
    fused.step()
    fused.grad_scale = fused.found_inf = None
    saved_model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mps_amp_needs_torch_2_8():
    from trainer.device import amp_dtype, torch_version
    from trainer.errors import UserError

    assert amp_dtype("mps", "on", version=(2, 8)) == torch.float16
    with pytest.raises(UserError, match="needs torch 2.8"):
        amp_dtype("mps", "on", version=(2, 7))
    assert amp_dtype("mps", "auto", version=(2, 4)) is None
    assert torch_version("2.14.1+cu130") == (2, 14) and torch_version("2.11.0a0") == (2, 11)


def test_fused_sgd_survives_a_first_step_the_grad_scaler_skips():
    """fp16 often overflows at the GradScaler's initial scale, so the first step is skipped. Fused SGD
    (what CUDA gets; its CPU kernel behaves the same) would leave its momentum uninitialized then."""
    from trainer.optim import make_optimizer

    torch.manual_seed(0)
    fused_model, plain_model = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    plain_model.load_state_dict(fused_model.state_dict())
    cfg = TrainConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fused, plain = make_optimizer(cfg, fused_model, "cuda"), make_optimizer(cfg, plain_model, "cpu")
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    x = torch.randn(8, 4)
    # step 1: an overflow; the scaler hands the fused kernel found_inf=1 and it skips the update
    fused_model(x).sum().backward()
    fused.grad_scale, fused.found_inf = torch.tensor(65536.0), torch.ones(())
    junk = [torch.full_like(p, 1e30) for p in fused_model.parameters()]  # what uninitialized memory may hold
    del junk
    fused.step()
    fused.grad_scale = fused.found_inf = None
    for model, opt in ((fused_model, fused), (plain_model, plain)):
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------- the --cuda-graph step, eagerly
def test_static_sgd_is_torch_sgd_with_device_scalars():
    """The capturable update reads lr and momentum from device tensors by a device step counter."""
    from trainer.graphstep import StaticSGD

    torch.manual_seed(0)
    ours, ref = torch.nn.Conv2d(2, 3, 3), torch.nn.Conv2d(2, 3, 3)
    ref.load_state_dict(ours.state_dict())
    lrs, moms = [0.01, 0.05, 0.1, 0.07, 0.02], [0.95, 0.9, 0.85, 0.88, 0.93]  # OneCycle moves both
    for nesterov in (True, False):
        opt = torch.optim.SGD(ours.parameters(), lr=lrs[0], momentum=moms[0], nesterov=nesterov, weight_decay=5e-4)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=lrs[0], momentum=moms[0], nesterov=nesterov,
                                  weight_decay=5e-4)
        step = torch.zeros((), dtype=torch.long)
        sgd = StaticSGD(opt, torch.tensor(lrs), torch.tensor(moms), step)
        for i in range(len(lrs)):
            x = torch.randn(4, 2, 6, 6)
            for model in (ours, ref):
                model.zero_grad()
                model(x).pow(2).mean().backward()
            sgd.step()
            ref_opt.param_groups[0].update(lr=lrs[i], momentum=moms[i])
            ref_opt.step()
        assert int(step) == len(lrs)
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        # the momentum lives in the real optimizer's state: checkpoints stay torch's own format
        assert all(torch.allclose(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"], atol=1e-6)
                   for a, b in zip(ours.parameters(), ref.parameters()))


def test_the_static_step_augments_the_epoch_ahead_in_batch_order(tmp_path, mnist_dir):
    """Batch k of the epoch buffer is perm[k*B:(k+1)*B], prepared as the eager step prepares it; with
    augmentation on, the epoch's draws come from the augmentation generator, the same on a re-draw."""
    from types import SimpleNamespace

    from trainer import graphstep
    from trainer.distributed import Dist
    from trainer.engine import make_engine

    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (100,))
    split = SimpleNamespace(images=images, labels=labels)
    model = torch.nn.Conv2d(1, 1, 3)
    for rotate in (0.0, 10.0):
        cfg = small(tmp_path, mnist_dir, batch_size=12, input_size=24, rotate=rotate, cuda_graph=True)
        engine = make_engine(cfg, Dist(), torch.device("cpu"), False)
        static = graphstep.StaticStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), cfg, engine,
                                      split, steps=8)
        perm = torch.randperm(100)
        state = engine.aug_gen.get_state()
        static.start_epoch(perm, 1, 0)
        assert torch.equal(static.epoch_y.flatten(), labels[perm[:96]])
        if not rotate:
            assert torch.equal(static.epoch_x.flatten(0, 1), engine.prepare(images[perm[:96]].float() / 255))
        else:
            first = static.epoch_x.clone()
            engine.aug_gen.set_state(state)
            static.start_epoch(perm, 1, 0)
            assert torch.equal(static.epoch_x, first)  # a resume's re-draw is the same epoch
            plain = engine.prepare(images[perm[:96]].float() / 255)
            assert not torch.equal(first.flatten(0, 1), plain)  # and it is augmented


@pytest.mark.slow
def test_cuda_graph_run_interrupted_mid_epoch_resumes_exactly(tmp_path, mnist_dir, monkeypatch):
    """The static step augments an epoch ahead; a run stopped mid-epoch draws the same epoch again on
    resume (from the generator state saved at the epoch's start), so it ends where an unbroken run ends."""
    import signal

    from trainer import graphstep, train

    common = dict(train_limit=2048, eval_limit=500, rotate=10, cuda_graph=True)
    fit(small(tmp_path, mnist_dir, run_id="straight", **common))
    steps = {"n": 0}
    real_run = graphstep.StaticStep.run

    def counted(static):
        steps["n"] += 1
        return real_run(static)

    class StopsInEpochTwo(train.StopFlag):
        def __bool__(self):
            if steps["n"] >= 16 + 5:  # 16 steps an epoch: 5 steps into epoch 2
                self.signal = signal.SIGTERM
            return self.signal is not None

    monkeypatch.setattr(graphstep.StaticStep, "run", counted)
    monkeypatch.setattr(train, "StopFlag", StopsInEpochTwo)
    result = fit(small(tmp_path, mnist_dir, run_id="split", **common))
    assert result["status"] == "interrupted"
    monkeypatch.undo()
    fit(TrainConfig(resume=str(tmp_path / "runs" / "split"), progress=False, report=False),
        explicit={"resume", "progress", "report"})
    timing = {"seconds", "train_seconds", "img_per_s", "elapsed", "compile_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    straight, split = strip(epochs(tmp_path / "runs" / "straight")), strip(epochs(tmp_path / "runs" / "split"))
    assert [r["epoch"] for r in split] == [1, 2]
    for a, b in zip(straight, split):
        for k in a:  # the epoch's loss sum is added in two parts on resume: equal to rounding
            assert b[k] == (None if a[k] is None else pytest.approx(a[k], rel=1e-9, abs=1e-12)), (k, a[k], b[k])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["onecycle", "step", "cyclic"])
def test_schedule_table_is_the_lr_the_trainer_used(tmp_path, mnist_dir, schedule):
    from trainer.optim import epoch_steps, schedule_table

    cfg = small(tmp_path, mnist_dir, run_id=schedule, epochs=3, max_steps=5, eval_limit=100, schedule=schedule)
    fit(cfg)
    rows = epochs(tmp_path / "runs" / schedule)
    steps = epoch_steps(cfg, 1024)
    lrs, moms = schedule_table(cfg, steps)
    assert len(lrs) == len(moms) == 3 * steps
    # a row's lr is the optimizer's after the epoch's steps: the lr of the next epoch's first step
    for row in rows[:-1]:
        assert lrs[row["epoch"] * steps] == pytest.approx(row["lr"], rel=1e-12)


@pytest.mark.slow
def test_cuda_graph_flag_on_the_cpu_runs_the_static_step_like_the_eager_one(tmp_path, mnist_dir):
    """Off CUDA --cuda-graph runs the same static step without capture: same batches and schedule; only
    the optimizer's rounding differs. (Its augmentation is drawn for the whole epoch ahead instead of
    per step, so other draws: compared without it here, and on its own in the epoch-ahead test.)"""
    common = dict(train_limit=2048, eval_limit=1000, rotate=0)
    fit(small(tmp_path, mnist_dir, run_id="eager", **common))
    fit(small(tmp_path, mnist_dir, run_id="static", cuda_graph=True, stop_after=1, **common))
    fit(TrainConfig(resume=str(tmp_path / "runs" / "static"), progress=False, report=False),
        explicit={"resume", "progress", "report"})
    eager, static = epochs(tmp_path / "runs" / "eager"), epochs(tmp_path / "runs" / "static")
    assert [r["epoch"] for r in static] == [1, 2]
    for a, b in zip(eager, static):
        assert a["lr"] == b["lr"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02)
        assert abs(a["val_acc"] - b["val_acc"]) < 5
    assert static[-1]["val_acc"] > 30  # it learns (2 short epochs)


class NoHostData(TorchDispatchMode):
    """What CUDA refuses while a stream is capturing, seen on the CPU: a tensor made from Python data
    (`torch.tensor([...])` lifts a host buffer: a host-to-device copy on CUDA) and a read back to the
    host (`.item()`, `.tolist()`: a sync)."""

    FORBIDDEN = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default,
                 torch.ops.aten._local_scalar_dense.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"{func} inside the captured step: CUDA refuses it during graph capture")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("knobs", [
    dict(input_size=24, rotate=7),  # the default recipe: the 24-px crop inside the warp
    dict(input_size=24, rotate=10, translate=0.1, scale=0.1, shear=5, perspective=0.5, crop=0.5,
         brightness=0.2, contrast=0.2),
], ids=["default-recipe", "every-knob"])
def test_the_captured_step_makes_no_tensor_from_host_data_after_warm_up(tmp_path, mnist_dir, monkeypatch, knobs):
    """--cuda-graph captures the step after WARMUP_STEPS eager ones; off CUDA that step runs eagerly, so
    run every later step under the guard: what it would refuse at capture fails here."""
    from trainer import graphstep

    real_step, calls = graphstep.StaticStep._step, []

    def guarded(static):
        calls.append(1)
        if len(calls) <= graphstep.WARMUP_STEPS:
            return real_step(static)
        with NoHostData():
            return real_step(static)

    monkeypatch.setattr(graphstep.StaticStep, "_step", guarded)
    result = fit(small(tmp_path, mnist_dir, run_id="guarded", cuda_graph=True, epochs=1, max_steps=6,
                       eval_limit=100, **knobs))
    assert result["status"] == "completed" and len(calls) == 6


@pytest.mark.parametrize("overrides,message", [
    (dict(optimizer="adam", lr=0.003), "--optimizer sgd only"),
    (dict(schedule="plateau"), "schedule plateau"),
    (dict(compile=True), "pick one"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path, mnist_dir, overrides, message):
    from trainer.errors import UserError

    with pytest.raises(UserError, match=message):
        fit(small(tmp_path, mnist_dir, cuda_graph=True, **overrides))
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_gpu_bench_script_runs_and_prints_its_table(tmp_path, mnist_dir):
    """scripts/gpu_bench.py is for a GPU; on the CPU with --quick it still runs end to end, so it is
    ready the day a GPU is lent."""
    import subprocess
    import sys

    from fixtures import REPO

    proc = subprocess.run([sys.executable, "scripts/gpu_bench.py", "--device", "cpu", "--quick", "--seeds", "1",
                           "--variants", "fp32,graph", "--data-dir", str(mnist_dir), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"fp32", "graph"} <= rows.keys() and "failed" not in proc.stdout
    assert "not a measurement" in proc.stdout
    results = json.loads((tmp_path / "gpu_bench.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["fp32", "graph"] and all(r["train_s"] > 0 for r in results)
    for r in results:  # the delivered weights' number, as the run reported it (per-epoch test is null)
        assert r["test_acc"] == json.loads((tmp_path / f"gpu-{r['variant']}-s1" / "result.json").read_text())["test_acc"]
        config = json.loads((tmp_path / f"gpu-{r['variant']}-s1" / "config.json").read_text())["config"]
        assert config["early_epochs"] == 0  # eager or captured, each variant trains the same recipe at one size


# ---------------------------------------------------------------------------------- the CUDA default per capability
@pytest.fixture
def gpu_of(monkeypatch):
    """Make the trainer's CLI see a CUDA GPU of the given capability (the policy is a pure function of it)."""
    from trainer import device as dev

    def install(capability):
        monkeypatch.setattr(dev, "resolve_device", lambda name: torch.device("cuda"))
        monkeypatch.setattr(dev, "capability", lambda device: capability)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return install


def parsed(argv):
    from trainer.cli import parse_train_args

    args, _ = parse_train_args(argv)
    return {k: getattr(args, k) for k in ("cuda_graph", "amp", "batch_size", "lr")}


@pytest.mark.parametrize("capability,argv,expected", [
    ((9, 0), [], dict(cuda_graph=True, amp="on", batch_size=256, lr=0.4)),  # an H100/H200: bf16 in the graph
    ((8, 6), [], dict(cuda_graph=True, amp="on", batch_size=256, lr=0.4)),  # an A10G
    ((7, 5), [], dict(cuda_graph=True, amp="off", batch_size=128, lr=0.2)),  # a T4: no real bf16, fp16 can't be captured
    ((9, 0), ["--amp", "off"], dict(cuda_graph=True, amp="off", batch_size=256, lr=0.4)),  # a typed flag wins
    ((9, 0), ["--batch-size", "512"], dict(cuda_graph=True, amp="off", batch_size=512, lr=0.8)),  # yours: fp32 graph
    ((9, 0), ["--lr", "0.3"], dict(cuda_graph=True, amp="off", batch_size=128, lr=0.3)),  # an LR typed for 128
    ((9, 0), ["--no-cuda-graph"], dict(cuda_graph=False, amp="auto", batch_size=128, lr=0.2)),  # opted out
    ((9, 0), ["--compile"], dict(cuda_graph=False, amp="auto", batch_size=128, lr=0.2)),
    ((9, 0), ["--optimizer", "adamw", "--lr", "0.003"], dict(cuda_graph=False, amp="auto", batch_size=128, lr=0.003)),
    ((9, 0), ["--ema", "0.999"], dict(cuda_graph=False, amp="auto", batch_size=128, lr=0.2)),
    ((9, 0), ["--val-size", "10000", "--schedule", "plateau"], dict(cuda_graph=False, amp="auto", batch_size=128, lr=0.2)),
    ((7, 5), ["--amp", "on"], dict(cuda_graph=False, amp="on", batch_size=128, lr=0.2)),  # fp16: not capturable
    ((9, 0), ["--model", "seed002-gap"], dict(cuda_graph=True, amp="off", batch_size=128, lr=0.1)),  # not validated at 256
    ((9, 0), ["--resume", "runs/x"], dict(cuda_graph=False, amp="auto", batch_size=128, lr=0.1)),  # its saved config
], ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_cuda_default_follows_the_capability_and_the_typed_flags(gpu_of, capsys, capability, argv, expected):
    gpu_of(capability)
    assert parsed(argv) == pytest.approx(expected)
    note = [line for line in capsys.readouterr().err.splitlines() if "CUDA default" in line]
    assert len(note) == (1 if expected["cuda_graph"] and "--cuda-graph" not in argv else 0)


def test_cuda_default_is_off_under_torchrun_and_off_cuda(gpu_of, monkeypatch):
    gpu_of((9, 0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parsed([])["cuda_graph"] is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parsed([])["cuda_graph"] is True
    from trainer import device as dev

    monkeypatch.setattr(dev, "resolve_device", lambda name: torch.device("cpu"))
    assert parsed([]) == dict(cuda_graph=False, amp="auto", batch_size=128, lr=0.2)  # the laptop's own


def test_every_cuda_default_is_a_variant_the_bench_measures():
    """The rule's table names variants as scripts/gpu_bench.py does, and each one's flags are that name's."""
    import importlib.util

    from fixtures import REPO
    from trainer.device import CUDA_VARIANTS

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "scripts" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for v in CUDA_VARIANTS:
        flags = bench.variant_flags(v.name)
        assert ("--cuda-graph" in flags) == v.cuda_graph
        assert flags[flags.index("--amp") + 1] == v.amp
        assert (int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 128) == v.batch_size


def test_measured_epoch_times_name_variants_the_bench_knows_and_include_each_gpus_default():
    """infra/measured.py (what `plan` prices from) holds measurements only: each names a variant as
    scripts/gpu_bench.py does, says where it was measured, and its GPU's CUDA default is among them."""
    import importlib.util

    from fixtures import REPO
    from infra.measured import MEASURED, epoch_times
    from trainer.device import cuda_default

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "scripts" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for m in MEASURED:
        bench.variant_flags(m.variant)  # a name the bench measures
        assert m.measured and m.epoch_s > 0 and m.run_s > m.epoch_s
        default = cuda_default(m.capability, capturable=True, batches={128, 256})
        assert default.name in {e.variant for e in epoch_times(gpu=m.gpu)}
    assert epoch_times(instance_type="g4dn.xlarge") == []  # no T4 was measured: nothing is made up
    assert [e.variant for e in epoch_times(instance_type="p5e.48xlarge")][0] == "graph-amp-b256"


@pytest.mark.slow
def test_a_cuda_run_in_bf16_resumed_on_the_cpu_continues_in_the_cpus_precision(tmp_path, mnist_dir, capfd,
                                                                                monkeypatch):
    """The CUDA default trains in bf16 (--amp on); on a laptop CPU bf16 is 5x slower than fp32, so a
    resume there takes the CPU's own default unless --amp on is typed again. The run is forged as a
    CUDA one by its config.json (CI has no GPU)."""
    fit(small(tmp_path, mnist_dir, run_id="gpu", amp="on", stop_after=1, train_limit=512, eval_limit=100))
    run_dir = tmp_path / "runs" / "gpu"
    config = json.loads((run_dir / "config.json").read_text())
    config["device"]["type"] = "cuda"
    (run_dir / "config.json").write_text(json.dumps(config))
    capfd.readouterr()
    from trainer import train

    engines, real_make_engine = [], train.make_engine
    monkeypatch.setattr(train, "make_engine", lambda *a, **k: engines.append(real_make_engine(*a, **k)) or engines[-1])
    # no report on the resumes: it is not what this test is about, and plotting it was most of its time
    fit(TrainConfig(resume=str(run_dir), device="cpu", progress=False, report=False),
        explicit={"resume", "device", "progress", "report"})
    assert "continues in this device's default precision" in capfd.readouterr().err
    assert [e.amp_dtype for e in engines] == [None]  # fp32
    fit(small(tmp_path, mnist_dir, run_id="again", amp="on", stop_after=1, train_limit=512, eval_limit=100))
    engines.clear()
    fit(TrainConfig(resume=str(tmp_path / "runs" / "again"), device="cpu", progress=False, report=False),
        explicit={"resume", "device", "progress", "report"})
    assert [e.amp_dtype for e in engines] == [torch.bfloat16]  # saved on the CPU: kept as it was
