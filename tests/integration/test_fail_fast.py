"""Fail fast: a rank that dies (SIGKILL) or raises ends a 4-rank af_pipe job under
torchrun within a bounded time, with a report that names the failed rank, its pool and
what it was doing. Real launcher, real processes, gloo."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BOUND_S = 60.0  # the bound from failure to job exit


def _job_args(dump: Path) -> list[str]:
    return ["--job.config_file", "train_configs/debug_model.toml", "--disagmoe.attention_ranks", "2",
            "--disagmoe.expert_ranks", "2", "--training.steps", "500", "--metrics.timeline_step", "0",
            "--metrics.enable_tensorboard", "false", "--metrics.log_freq", "1", "--checkpoint.enable", "false",
            "--job.dump_folder", str(dump)]


def _launch(tmp_path: Path, entry: list[str]) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, DISAGMOE_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--monitor-interval", "0.5",
           *entry]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for_steps(proc, lines, metrics: Path, steps: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, "job ended early:\n" + "".join(lines)[-4000:]
        assert time.monotonic() < end, "job did not reach its first steps:\n" + "".join(lines)[-4000:]
        time.sleep(0.2)


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with this RANK (children of the launcher)."""
    def children(pid):
        out = []
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += [int(child)] + children(int(child))
        return out
    for pid in children(launcher_pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    raise AssertionError(f"no worker with RANK={rank}")


def _finish(proc, lines, start: float) -> tuple[int, float, str]:
    try:
        rc = proc.wait(timeout=BOUND_S + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the job hung after the failure:\n" + "".join(lines)[-4000:])
    elapsed = time.monotonic() - start
    time.sleep(0.3)  # let the reader thread drain
    return rc, elapsed, "".join(lines)


@pytest.mark.parametrize("victim,pool", [(0, "attention"), (3, "expert")])
def test_killed_rank_ends_the_job_with_a_report(tmp_path, victim, pool):
    dump = tmp_path / "out"
    proc, lines = _launch(tmp_path, ["-m", "torchtitan_disagmoe.train", *_job_args(dump)])
    _wait_for_steps(proc, lines, dump / "metrics.jsonl", 3)
    os.kill(_worker_pid(proc.pid, victim), signal.SIGKILL)
    rc, elapsed, out = _finish(proc, lines, time.monotonic())
    assert rc != 0
    assert elapsed < BOUND_S, f"{elapsed:.1f} s from the kill to the job's exit"
    reports = [line for line in out.splitlines() if line.startswith("training failed:")]
    assert reports, out[-4000:]
    # Some surviving rank names the dead one, its pool, and its last step and action.
    named = [r for r in reports if f"rank {victim} ({pool} pool" in r and "stopped reporting" in r]
    assert named, "\n".join(reports)
    assert "micro-batch" in named[0] and "at step" in named[0]
    print(f"SIGKILL of rank {victim} ({pool}): job exited in {elapsed:.1f} s")


def test_hung_rank_is_detected_by_the_timeouts(tmp_path):
    """A rank that stops without dying (SIGSTOP: its sockets stay open) is caught by the
    transfer timeouts, then named from its stale heartbeat."""
    dump = tmp_path / "out"
    args = _job_args(dump) + ["--comm.train_timeout_seconds", "5"]
    proc, lines = _launch(tmp_path, ["-m", "torchtitan_disagmoe.train", *args])
    _wait_for_steps(proc, lines, dump / "metrics.jsonl", 3)
    victim = _worker_pid(proc.pid, 2)
    os.kill(victim, signal.SIGSTOP)
    try:
        rc, elapsed, out = _finish(proc, lines, time.monotonic())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    assert rc != 0 and elapsed < BOUND_S, f"rc {rc}, {elapsed:.1f} s"
    reports = [line for line in out.splitlines() if line.startswith("training failed:")]
    assert any("Timed out" in r or "timed out" in r for r in reports), "\n".join(reports)
    assert any("rank 2 (expert pool" in r and "stopped reporting" in r for r in reports), "\n".join(reports)
    print(f"SIGSTOP of rank 2 (expert): job exited in {elapsed:.1f} s")


def test_exception_on_an_expert_rank_is_reported_as_the_first_failure(tmp_path):
    dump = tmp_path / "out"
    entry = [str(REPO / "tests" / "integration" / "faulty_train.py"), "3", "4", *_job_args(dump)]
    proc, lines = _launch(tmp_path, entry)
    start = time.monotonic()
    rc, elapsed, out = _finish(proc, lines, start)
    assert rc != 0
    reports = [line for line in out.splitlines() if line.startswith("training failed:")]
    mine = [r for r in reports if r.startswith("training failed: rank 3 (expert pool")]
    assert mine and "injected fault on rank 3" in mine[0] and "at step 4" in mine[0], "\n".join(reports)
    assert "FORWARD of F(" in mine[0]
    others = [r for r in reports if not r.startswith("training failed: rank 3 ")]
    assert all("rank 3 (expert pool" in r for r in others), "\n".join(others)
    # The job ran 3 steps and stopped at the fault; nothing was logged for step 4.
    assert len((dump / "metrics.jsonl").read_text().splitlines()) == 3
