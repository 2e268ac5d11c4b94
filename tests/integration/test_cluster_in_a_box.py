"""Cluster in a box: emulated nodes (network namespaces + rate-limited veths) on this machine.

Namespace tests skip, with the reason, where namespaces cannot be made (not root, no
iproute2, refused by the kernel). The calibration and loopback-fallback tests run anywhere.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from torchtitan_disagmoe.tools import cluster_in_a_box as cib
from torchtitan_disagmoe.tools import netns

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    info = {"rank": rank, "node": int(os.environ["TTD_NODE"]), "addr": os.environ["TTD_ADDR"],
            "ifname": os.environ["GLOO_SOCKET_IFNAME"], "sum": t.item()}
    nbytes = int(sys.argv[1])
    if nbytes:  # rank 0 -> rank 1 (the other node): warm-up, then one timed transfer
        buf, warm, ack = torch.zeros(nbytes // 4), torch.zeros(256 * 1024), torch.zeros(1)
        if rank == 0:
            dist.send(warm, 1); dist.recv(ack, 1)
            start = time.perf_counter(); dist.send(buf, 1); dist.recv(ack, 1)
            info["bytes_per_s"] = nbytes / (time.perf_counter() - start)
        else:
            dist.recv(warm, 0); dist.send(ack, 0)
            dist.recv(buf, 0); dist.send(ack, 0)
    dist.barrier()
    print("PROBE " + json.dumps(info), flush=True)
    dist.destroy_process_group()
""")


@functools.cache
def _no_namespaces() -> str | None:
    reason = cib.why_no_namespaces()
    if reason:
        return reason
    name = f"ttd{os.getpid()}r"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` refused: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def needs_namespaces(fn):
    return pytest.mark.skipif(_no_namespaces() is not None,
                              reason=f"network namespaces unavailable: {_no_namespaces()}")(fn)


def _ours(prefix: str) -> list[str]:
    return [ns for ns in cib.list_netns() if ns.startswith(prefix + "n") or ns == prefix + "r"]


def _probes(results) -> list[dict]:
    found = []
    for r in results:
        for chunk in r.output.split("PROBE ")[1:]:
            found.append(json.loads(chunk.splitlines()[0]))
    return sorted(found, key=lambda p: p["rank"])


def test_calibration_matches_the_target_ratio():
    cal = cib.calibrate(2, 2, flops_per_rank=5e10)
    assert cal.flops_per_rank / cal.link_bytes_per_rank == pytest.approx(989.4e12 / 50e9)
    assert cal.rate_bit_per_node == pytest.approx(cal.link_bytes_per_rank * 8 * 2)
    faster = cib.calibrate(2, 2, network_scale=4.0, flops_per_rank=5e10)
    slower = cib.calibrate(2, 2, network_scale=0.25, flops_per_rank=5e10)
    assert faster.rate_bit_per_node == pytest.approx(4 * cal.rate_bit_per_node)
    assert slower.rate_bit_per_node == pytest.approx(cal.rate_bit_per_node / 4)
    assert cal.threads == max(1, (os.cpu_count() or 1) // 4)
    text = cal.describe()
    assert "GFLOP/s per rank" in text and "Mbit/s per node link" in text and "latency" in text
    measured = cib.measure_rank_flops(ranks=1, threads=1, size=256, seconds=0.3)
    assert measured > 1e8


def test_loopback_fallback_runs_the_same_job(tmp_path, monkeypatch, capsys):
    """Where namespaces cannot be made: a clear message, then the job on plain loopback."""
    monkeypatch.setattr(cib, "why_no_namespaces", lambda: "pretend: not root")
    cluster = cib.open_cluster(2, rate_bit=10e6)
    assert "NO NETWORK EMULATION: pretend: not root" in capsys.readouterr().out
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    with cluster:
        assert not cluster.emulate and cluster.link_bytes() is None
        commands, envs = cluster.torchrun_commands(2, 1, [str(script), "0"], threads=1)
        results = cluster.run(commands, envs, cwd=REPO, timeout=120)
    assert [r.returncode for r in results] == [0, 0], results[0].output[-2000:] + results[1].output[-2000:]
    assert [(p["rank"], p["node"], p["sum"]) for p in _probes(results)] == [(0, 0, 3.0), (1, 1, 3.0)]


@needs_namespaces
def test_namespaces_created_and_removed_after_success_failure_and_exception():
    with cib.EmulatedCluster(nodes=2, rate_bit=50e6) as cluster:
        prefix = cluster.prefix
        assert sorted(_ours(prefix)) == sorted([f"{prefix}n0", f"{prefix}n1", f"{prefix}r"])
        show = "cat /sys/class/net/$GLOO_SOCKET_IFNAME/address && tc qdisc show dev $GLOO_SOCKET_IFNAME"
        results = cluster.run([["sh", "-c", show], ["false"]], timeout=30)
        assert results[0].returncode == 0 and "tbf" in results[0].output and "rate 50Mbit" in results[0].output
        assert results[1].returncode == 1
    assert _ours(prefix) == []
    with pytest.raises(RuntimeError, match="boom"), cib.EmulatedCluster(nodes=2, rate_bit=50e6):
        assert len(_ours(prefix)) == 3
        raise RuntimeError("boom")
    assert _ours(prefix) == []


@needs_namespaces
def test_a_failing_node_stops_the_others_and_leaves_nothing():
    with cib.EmulatedCluster(nodes=2) as cluster:
        prefix = cluster.prefix
        start = time.monotonic()
        results = cluster.run([["sleep", "60"], ["sh", "-c", "exit 3"]], timeout=60, grace_s=1.0)
        assert time.monotonic() - start < 20
        assert results[1].returncode == 3 and results[0].killed
    assert _ours(prefix) == []


@needs_namespaces
def test_sigterm_tears_down_and_cleanup_removes_leftovers(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchtitan_disagmoe.tools.cluster_in_a_box", "--nodes", "2",
         "--flops-per-rank", "1e10", "--exec", "--", "sleep", "120"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prefix = f"ttd{proc.pid}"
    try:
        deadline = time.monotonic() + 30
        sleepers = []
        while time.monotonic() < deadline and len(sleepers) < 2:
            time.sleep(0.1)
            sleepers = cib._netns_pids(prefix + "n0") + cib._netns_pids(prefix + "n1")
        assert len(sleepers) == 2 and len(_ours(prefix)) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by signal SIGTERM; torn down" in out
    assert _ours(prefix) == []
    assert not any(netns._pid_alive(p) and not cib._is_zombie(p) for p in sleepers)

    # A run killed with SIGKILL leaves its namespaces; --cleanup removes them once its
    # creator is gone (and never those of a live run).
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"ttd{dead.pid}n0"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        out = subprocess.run([sys.executable, "-m", "torchtitan_disagmoe.tools.cluster_in_a_box", "--cleanup"],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False).stdout
        assert leftover in out
        assert leftover not in cib.list_netns()
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True, check=False)


@needs_namespaces
def test_gloo_job_across_two_nodes_at_the_set_rate(tmp_path):
    """2 ranks, one per emulated node: all_reduce works, placement is node order, and a
    24 MB send between the nodes runs within 20% of the set rate (80 Mbit/s = 10 MB/s)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    rate_bit = 80e6
    with cib.EmulatedCluster(nodes=2, rate_bit=rate_bit) as cluster:
        prefix = cluster.prefix
        commands, envs = cluster.torchrun_commands(2, 1, [str(script), str(24_000_000)], threads=1)
        before = cluster.link_bytes()
        results = cluster.run(commands, envs, cwd=REPO, timeout=120)
        crossed = cluster.link_bytes() - before
    assert [r.returncode for r in results] == [0, 0], results[0].output[-2000:] + results[1].output[-2000:]
    probes = _probes(results)
    assert [(p["rank"], p["node"], p["addr"], p["sum"]) for p in probes] == [
        (0, 0, "10.77.0.100", 3.0), (1, 1, "10.77.0.101", 3.0)]
    assert probes[0]["ifname"] == f"{prefix}v0"
    measured = probes[0]["bytes_per_s"]
    assert abs(measured / (rate_bit / 8) - 1) < 0.2, f"{measured / 1e6:.2f} MB/s for a 10 MB/s link"
    assert crossed > 24_000_000  # the payload went over the emulated links
    assert _ours(prefix) == []


@needs_namespaces
def test_training_two_steps_attention_and_experts_on_different_nodes(tmp_path):
    """The trainer (AF-Pipe, 1 attention + 1 expert rank) across two emulated nodes."""
    overrides = ["--training.steps=2", "--metrics.log_freq=1", "--checkpoint.enable=false",
                 "--metrics.enable_tensorboard=false", "--metrics.timeline_step=0",
                 "--disagmoe.attention_ranks=1", "--disagmoe.expert_ranks=1", f"--job.dump_folder={tmp_path / 'out'}"]
    with cib.EmulatedCluster(nodes=2, rate_bit=200e6) as cluster:
        commands, envs = cluster.torchrun_commands(
            2, 1, cib.train_module_args("train_configs/debug_model.toml", overrides, 1), threads=1)
        results = cluster.run(commands, envs, cwd=REPO, timeout=180)
    assert [r.returncode for r in results] == [0, 0], results[0].output[-3000:] + results[1].output[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["dispatch_bytes"] > 0
