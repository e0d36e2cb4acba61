"""examples/insightface/train.py at world size 2 on gloo: it trains, and a resumed run continues
exactly where the uninterrupted run was.

One forkserver spawn of 2 workers; each worker calls the script's ``main()`` four times with the
environment torchrun would give it (a fresh process group and port per call): for each head
optimizer (row-sparse PartialFCSGD with sharded checkpoints, plain torch SGD with full ones), an
uninterrupted 8-step run that saves at step 4, then a run resumed from that step-4 checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import traceback

import pytest
import torch

from tests.distributed.harness import free_port, spawn_and_wait

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "insightface", "train.py")
WORLD = 2
STEPS, RESUME_AT = 8, 4
SPAWN_TIMEOUT_S = 240.0
# head optimizer -> checkpoint format it is run with
VARIANTS = {"partialfc-sgd": "sharded", "sgd": "full"}


def _load_script():
    spec = importlib.util.spec_from_file_location("insightface_train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(outdir: str):
    """(name, argv) of the four calls, in order (each resume after the run that wrote its checkpoint)."""
    for optimizer, fmt in VARIANTS.items():
        common = ["--steps", str(STEPS), "--head-optimizer", optimizer, "--checkpoint-format", fmt, "--amp", "bf16",
                  "--backend", "torch"]
        full_dir = os.path.join(outdir, optimizer, "full")
        yield f"{optimizer}-full", common + ["--output", full_dir, "--save-every", str(RESUME_AT),
                                             "--log-json", os.path.join(outdir, f"{optimizer}-full.jsonl")]
        yield f"{optimizer}-resumed", common + ["--output", os.path.join(outdir, optimizer, "resumed"),
                                                "--resume", os.path.join(full_dir, f"step_{RESUME_AT}"),
                                                "--log-json", os.path.join(outdir, f"{optimizer}-resumed.jsonl")]


def _worker(rank, world, ports, outdir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    try:
        script = _load_script()
        for port, (_, argv) in zip(ports, _runs(outdir)):
            os.environ["MASTER_PORT"] = str(port)  # torchrun's environment, one rendezvous per run
            assert script.main(argv) == 0
    except BaseException:
        with open(os.path.join(outdir, f"error_r{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise



def _run_world(outdir: str) -> dict:
    ports = [free_port() for _ in range(2 * len(VARIANTS))]
    spawn_and_wait(_worker, (WORLD, ports, outdir), WORLD, SPAWN_TIMEOUT_S, outdir)
    logs = {}
    for name, _ in _runs(outdir):
        with open(os.path.join(outdir, f"{name}.jsonl")) as f:
            logs[name] = {rec["step"]: rec for rec in map(json.loads, f)}
    return logs


def test_insightface_example_trains_and_resumes_exactly(tmp_path):
    logs = _run_world(str(tmp_path))
    for optimizer in VARIANTS:
        full, resumed = logs[f"{optimizer}-full"], logs[f"{optimizer}-resumed"]
        assert sorted(full) == list(range(1, STEPS + 1))
        assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1))
        losses = [full[s]["loss"] for s in range(1, STEPS + 1)]
        assert all(math.isfinite(v) for v in losses), (optimizer, losses)
        assert all(full[s]["world_size"] == WORLD for s in full)
        # ArcFace at s = 64 on 64 random classes starts near 50; separable identities bring it down
        assert losses[0] > 40.0, (optimizer, losses)
        assert sum(losses[-3:]) / 3 < 0.6 * losses[0], (optimizer, losses)
        # the resumed run restores weights, momentum, schedule and the Partial FC sampler:
        # its steps are the uninterrupted run's, bit for bit
        for step in range(RESUME_AT + 1, STEPS + 1):
            assert resumed[step]["loss"] == full[step]["loss"], (optimizer, step, resumed[step], full[step])
            assert resumed[step]["lr"] == full[step]["lr"], (optimizer, step)
    # the row-sparse optimizer leaves unsampled rows alone, torch SGD decays them: the runs part ways
    assert logs["partialfc-sgd-full"][1]["loss"] == logs["sgd-full"][1]["loss"]
    assert logs["partialfc-sgd-full"][STEPS]["loss"] != logs["sgd-full"][STEPS]["loss"]


def test_example_script_is_the_one_documented():
    with open(os.path.join(REPO, "examples", "insightface", "README.md")) as f:
        readme = f.read()
    assert "torchrun --standalone --nproc_per_node=2 examples/insightface/train.py" in readme
    assert os.path.isfile(SCRIPT) and SCRIPT.endswith(os.path.join("insightface", "train.py"))
    sys.modules.pop("insightface_train_example", None)
    args = _load_script().parse_args([])
    assert (args.margin_list, args.grad_scale, args.head_optimizer) == ("1.0,0.5,0.0", "ddp", "partialfc-sgd")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # "trained" with loss 0
    (["--num-classes", "0"], "--num-classes must be >= 1, got 0"),
    (["--steps", "-1"], "--steps must be >= 1, got -1"),
    (["--sample-rate", "0"], "--sample-rate must be in (0, 1], got 0.0"),
    (["--sample-rate", "1.5"], "--sample-rate must be in (0, 1], got 1.5"),
    (["--scale", "inf"], "--scale must be finite and > 0, got inf"),
    (["--lr", "-0.1"], "--lr must be finite and >= 0, got -0.1"),
    (["--margin-list", "1,0.5"], "--margin-list must be three numbers m1,m2,m3"),
    (["--margin-list", "a,b,c"], "--margin-list must be three numbers m1,m2,m3"),
    (["--resume", "/nonexistent/step_4"], "--resume /nonexistent/step_4: no such checkpoint directory"),
])
def test_example_script_refuses_bad_values_with_one_error_line(capsys, args, message):
    """Bad values used to end in tracebacks from deep inside the run (or to train on empty batches)."""
    sys.modules.pop("insightface_train_example", None)
    with pytest.raises(SystemExit) as exit_:
        _load_script().parse_args(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: {message}" in err and "Traceback" not in err


def test_example_script_help_shows_the_defaults(capsys):
    sys.modules.pop("insightface_train_example", None)
    with pytest.raises(SystemExit):
        _load_script().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: output_insightface)" in out and "(default: 16)" in out and "(default: 0.5)" in out
