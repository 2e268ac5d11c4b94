"""Cluster in a box: K emulated nodes with a slow network on one Linux machine.

Each node is a network namespace with loopback (the fast intra-node link) and one veth
link to a bridge in a router namespace (the inter-node fabric). Both ends of every link
get a ``tc`` token-bucket rate limit (and optionally a netem delay), so each node's link is
limited in both directions like a NIC. Addresses (``10.77.0.100 + i``) exist only inside
these namespaces; nothing routes to or from the host's network. The link rate is
calibrated so that this CPU's FLOP/s per rank over the link's bytes/s per rank equals a
target GPU cluster's ratio (default H800: 989.4 TFLOP/s per GPU over a 400 Gb/s NIC per
GPU). See docs/cluster_in_a_box.md.

    python -m torchtitan_disagmoe.tools.cluster_in_a_box --nodes 2 -- --training.steps 10
    python -m torchtitan_disagmoe.tools.cluster_in_a_box --nodes 2 --ranks-per-node 2 \\
        --network-scale 0.25 -- --disagmoe.attention_ranks 2 --disagmoe.expert_ranks 2
    python -m torchtitan_disagmoe.tools.cluster_in_a_box --nodes 2 --exec -- python my_job.py
    python -m torchtitan_disagmoe.tools.cluster_in_a_box --calibrate-only --ranks-per-node 2
    python -m torchtitan_disagmoe.tools.cluster_in_a_box --cleanup   # leftovers of killed runs

Without ``--exec`` the arguments after ``--`` are trainer overrides; one ``torchrun``
per node starts ``torchtitan_disagmoe.train`` (node i holds ranks i*N .. i*N+N-1). With
``--exec`` they are a command run once per node inside its namespace, with ``{node}``,
``{nodes}``, ``{addr}``, ``{master_addr}``, ``{port}``, ``{ifname}``, ``{nproc}``,
``{is_host}`` (1 on node 0) substituted and the same values in ``TTD_NODE``, ``TTD_NODES``,
``TTD_ADDR``, ``TTD_MASTER_ADDR``, ``TTD_PORT``, ``GLOO_SOCKET_IFNAME``, ``TTD_NPROC``. A
torchrun of your own needs ``--rdzv-conf is_host={is_host} --local-addr {addr}``: inside a
namespace torchrun cannot tell which node hosts the rendezvous store, and c10d orders the
nodes by that address (node i gets ranks i*N ..).

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), ``ip`` and ``tc``. Where namespaces cannot
be made, it says so and runs the same job on plain loopback, without a network limit.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.77.0"  # node i is SUBNET.(HOST_BASE + i): same-width strings, so sorting = node order
HOST_BASE = 100
FIRST_PORT = 29400

from .netns import (ClusterError, Interrupted, NamespacesUnavailable, _descendants, _kill_pids,  # noqa: F401
                    _netns_pids, _run, cleanup_leftovers, list_netns, why_no_namespaces)
# Re-exported: bench_compare and the tests use them through this module.
from .calibration import (TARGETS, Calibration, calibrate, measure_rank_flops, node_cpus,  # noqa: F401
                          threads_per_rank, _pinned)


@dataclass
class NodeResult:
    node: int
    returncode: int
    output: str
    killed: bool = False  # stopped by us after another node failed or a timeout


@dataclass
class EmulatedCluster:
    """K nodes; ``emulate=False`` is the loopback fallback (same API, no namespaces, no limit).

    Use as a context manager: everything is torn down on exit, on exceptions, and on
    SIGINT/SIGTERM/SIGHUP (handlers installed while inside the ``with`` in the main thread).
    """

    nodes: int
    rate_bit: float | None = None  # per node link, each direction; None: no limit
    delay_ms: float = 0.0
    emulate: bool = True
    prefix: str = field(default_factory=lambda: f"ttd{os.getpid()}")
    log: object = print
    cpus: list[list[int]] | None | str = "auto"  # CPU set per node ("auto": node_cpus(nodes))
    _namespaces: list[str] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _old_handlers: dict = field(default_factory=dict)
    _next_port: int = FIRST_PORT
    started: bool = False

    def __post_init__(self):
        if self.cpus == "auto":
            self.cpus = node_cpus(self.nodes)

    # names and addresses
    def netns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    @property
    def router(self) -> str:
        return f"{self.prefix}r"

    def ifname(self, i: int) -> str:
        return f"{self.prefix}v{i}" if self.emulate else "lo"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{HOST_BASE + i}" if self.emulate else f"127.0.0.{HOST_BASE + i}"

    def new_port(self) -> int:
        self._next_port += 1
        return self._next_port

    # lifecycle
    def __enter__(self) -> Self:
        self._install_signal_handlers()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise Interrupted(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        if not self.emulate:
            return
        reason = why_no_namespaces()
        if reason:
            raise NamespacesUnavailable(reason)
        if len(self.netns(self.nodes - 1)) > 15 or len(f"{self.prefix}b{self.nodes - 1}") > 15:
            raise ClusterError(f"prefix {self.prefix!r} too long for 15-character interface names")
        if self.nodes > 250 - HOST_BASE:
            raise ClusterError(f"at most {250 - HOST_BASE} nodes")
        if self.router in list_netns():
            raise ClusterError(f"namespace {self.router} exists already (run --cleanup)")
        try:
            self._add_netns(self.router)
        except ClusterError as exc:
            raise NamespacesUnavailable(f"`ip netns add` was refused: {exc}") from exc
        bridge = f"{self.prefix}br"
        _run(["ip", "-n", self.router, "link", "add", bridge, "type", "bridge"])
        _run(["ip", "-n", self.router, "link", "set", bridge, "up"])
        for i in range(self.nodes):
            ns, veth, peer = self.netns(i), self.ifname(i), f"{self.prefix}b{i}"
            self._add_netns(ns)
            # Created directly in the two namespaces: nothing ever appears in the host's.
            _run(["ip", "-n", self.router, "link", "add", peer, "type", "veth", "peer", "name", veth, "netns", ns])
            _run(["ip", "-n", self.router, "link", "set", peer, "master", bridge])
            _run(["ip", "-n", self.router, "link", "set", peer, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", veth])
            _run(["ip", "-n", ns, "link", "set", veth, "up"])
            if self.rate_bit:
                self._shape(ns, veth)
                self._shape(self.router, peer)

    def _add_netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # IPv4 only: no IPv6 neighbour/router chatter on the shaped links (best effort).
        _run(["ip", "netns", "exec", ns, "sh", "-c",
              "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"],
             check=False)

    def _shape(self, ns: str, dev: str) -> None:
        """Egress of ``dev``: token bucket at rate_bit (+ netem delay as its child)."""
        rate = int(self.rate_bit)
        burst = max(32 * 1024, rate // 8 // 100)  # >= 10 ms of traffic, >= a 64 KiB GSO packet / 2
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
              "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"])
        if self.delay_ms > 0:
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                  "netem", "delay", f"{self.delay_ms}ms", "limit", "10000"])

    def close(self) -> None:
        """Stop every process we started, delete every namespace (with its veths). Idempotent."""
        try:
            for p in self._procs:
                if p.poll() is None:
                    _kill_pids(_descendants(p.pid))
                p.wait()
            self._procs.clear()
            if self.emulate:
                self._delete_namespaces()
        finally:
            self._restore_signal_handlers()

    def _delete_namespaces(self) -> None:
        ours = [ns for ns in list_netns() if ns in self._namespaces or re.fullmatch(rf"{self.prefix}(n\d+|r)", ns)]
        for ns in ours:
            _kill_pids(_netns_pids(ns), grace_s=3.0)
        for ns in ours:
            _run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()
        left = [ns for ns in list_netns() if re.fullmatch(rf"{self.prefix}(n\d+|r)", ns)]
        if left:
            self.log(f"cluster-in-a-box: WARNING could not delete {left}; run --cleanup")

    def link_bytes(self) -> int | None:
        """Bytes sent so far over all node links (each byte crossing the fabric counted once,
        at the sending node's veth); None on the loopback fallback."""
        if not self.emulate:
            return None
        total = 0
        for i in range(self.nodes):
            path = f"/sys/class/net/{self.ifname(i)}/statistics/tx_bytes"
            out = _run(["ip", "netns", "exec", self.netns(i), "cat", path]).stdout
            total += int(out.strip())
        return total

    # processes
    def node_env(self, i: int, env: dict | None = None, port: int | None = None) -> dict:
        env = dict(os.environ if env is None else env)
        env.update(TTD_NODE=str(i), TTD_NODES=str(self.nodes), TTD_ADDR=self.addr(i),
                   TTD_MASTER_ADDR=self.addr(0), GLOO_SOCKET_IFNAME=self.ifname(i))
        if port is not None:
            env["TTD_PORT"] = str(port)
        return env

    def popen(self, i: int, argv: list[str], env: dict | None = None, cwd=None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` on node i (inside its namespace when emulating)."""
        argv, extra = _pinned(list(argv), self.cpus[i] if self.cpus else None)  # inherited by torchrun's workers
        full = (["ip", "netns", "exec", self.netns(i)] if self.emulate else []) + argv
        proc = subprocess.Popen(full, env=env, cwd=cwd, start_new_session=True, **kwargs, **extra)
        self._procs.append(proc)
        return proc

    def run(self, commands: list[list[str]], envs: list[dict] | None = None, cwd=None,
            timeout: float | None = None, echo: bool = False, grace_s: float = 10.0) -> list[NodeResult]:
        """Run commands[i] on node i at once; wait for all. When one fails, the others get
        ``grace_s`` seconds and are then stopped (so that a crash never leaves a hang)."""
        outputs: list[list[str]] = [[] for _ in commands]
        procs, readers = [], []
        for i, argv in enumerate(commands):
            env = envs[i] if envs else self.node_env(i)
            p = self.popen(i, argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, errors="replace")
            procs.append(p)

            def read(i=i, p=p):
                for line in p.stdout:
                    outputs[i].append(line)
                    if echo:
                        sys.stdout.write(f"[node{i}] {line}" if len(commands) > 1 else line)
                        sys.stdout.flush()

            t = threading.Thread(target=read, daemon=True)
            t.start()
            readers.append(t)
        killed = [False] * len(procs)
        deadline = time.monotonic() + timeout if timeout else None
        failed_at = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if (failed_at is not None and now - failed_at > grace_s) or (deadline and now > deadline):
                for j, p in enumerate(procs):
                    if p.poll() is None:
                        killed[j] = True
                        _kill_pids(_descendants(p.pid) + (_netns_pids(self.netns(j)) if self.emulate else []))
                break
            time.sleep(0.1)
        results = []
        for j, (p, t) in enumerate(zip(procs, readers)):
            p.wait()
            t.join(timeout=5)
            self._procs.remove(p)
            results.append(NodeResult(j, p.returncode, "".join(outputs[j]), killed[j]))
        return results

    # training
    def torchrun_commands(self, ranks: int, ranks_per_node: int, module_args: list[str],
                          threads: int, env: dict | None = None) -> tuple[list[list[str]], list[dict]]:
        """One torchrun per node for ``ranks`` ranks, ``ranks_per_node`` per node, nodes filled
        in order (node i: ranks i*N .. i*N+N-1); fewer than N ranks use node 0 only."""
        nproc = min(ranks, ranks_per_node)
        if ranks % nproc:
            raise ValueError(f"{ranks} ranks do not fill nodes of {ranks_per_node}")
        nnodes = ranks // nproc
        if nnodes > self.nodes:
            raise ValueError(f"{ranks} ranks need {nnodes} nodes of {ranks_per_node}; the cluster has {self.nodes}")
        port = self.new_port()
        commands, envs = [], []
        for i in range(nnodes):
            # c10d rendezvous orders nodes by --local-addr (equal-width addresses): node i
            # gets group rank i, hence global ranks i*nproc .. The node-0 agent hosts the store.
            commands.append([
                sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={self.addr(0)}:{port}", f"--rdzv-id=ttd{port}",
                f"--rdzv-conf=is_host={1 if i == 0 else 0}", f"--local-addr={self.addr(i)}",
                "--role=rank", *module_args])
            node_env = self.node_env(i, env, port)
            node_env["OMP_NUM_THREADS"] = str(threads)
            envs.append(node_env)
        return commands, envs


def open_cluster(nodes: int, rate_bit: float | None, delay_ms: float = 0.0, emulate: bool = True,
                 log=print) -> EmulatedCluster:
    """An EmulatedCluster, or the loopback fallback with a clear message when namespaces
    cannot be made. Enter it with ``with``."""
    if emulate:
        reason = why_no_namespaces()
        if reason is None:
            return _FallbackOnEnter(nodes=nodes, rate_bit=rate_bit, delay_ms=delay_ms, log=log)
        _warn_fallback(reason, log)
    return EmulatedCluster(nodes=nodes, rate_bit=None, delay_ms=0.0, emulate=False, log=log)


def _warn_fallback(reason: str, log) -> None:
    log(f"cluster-in-a-box: NO NETWORK EMULATION: {reason}.\n"
        "  Falling back to plain loopback: the same job, ranks and placement, but every link is the "
        "host's loopback.\n  The numbers below are NOT network-limited.")


class _FallbackOnEnter(EmulatedCluster):
    """Falls back to loopback when the kernel refuses ``ip netns add`` at start."""

    def start(self) -> None:
        try:
            super().start()
        except NamespacesUnavailable as exc:
            self._delete_namespaces()  # whatever was made; the signal handlers stay for the run
            _warn_fallback(str(exc), self.log)
            self.emulate, self.rate_bit, self.delay_ms, self.started = False, None, 0.0, True


def train_module_args(config: str, overrides: list[str], threads: int) -> list[str]:
    return ["-m", "torchtitan_disagmoe.train", "--job.config_file", config,
            f"--training.threads_per_rank={threads}", *overrides]


# ---- CLI -----------------------------------------------------------------------------------

def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m torchtitan_disagmoe.tools.cluster_in_a_box", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=1)
    parser.add_argument("--target", default="h800", choices=sorted(TARGETS),
                        help="cluster whose FLOP/s : inter-node bandwidth ratio is emulated")
    parser.add_argument("--network-scale", type=float, default=1.0,
                        help="multiplies the calibrated link rate: 4 = 4x faster network, 0.25 = 4x slower")
    parser.add_argument("--rate-mbit", type=float, help="node link rate in Mbit/s instead of the calibration")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="netem delay added per link direction")
    parser.add_argument("--flops-per-rank", type=float, help="skip the GEMM measurement, use this FLOP/s per rank")
    parser.add_argument("--config", default="train_configs/debug_model.toml", help="job file of the training run")
    parser.add_argument("--exec", action="store_true", help="arguments after -- are a command run on every node")
    parser.add_argument("--timeout", type=float, help="stop the job after this many seconds")
    parser.add_argument("--no-emulation", action="store_true", help="run on plain loopback (for comparison)")
    parser.add_argument("--calibrate-only", action="store_true", help="print the chosen numbers and exit")
    parser.add_argument("--cleanup", action="store_true",
                        help="delete namespaces left by killed runs (ttd<pid>..., creator gone) and exit")
    parser.add_argument("--cleanup-all", action="store_true", help="with --cleanup: also those of live runs")
    if "--" in argv:
        cut = argv.index("--")
        args, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]
    else:
        args, rest = parser.parse_known_args(argv)
        if args.exec and rest:
            parser.error("--exec: put the command after --")
    if args.nodes < 1 or args.ranks_per_node < 1:
        parser.error("--nodes and --ranks-per-node must be >= 1")
    if args.exec and not rest:
        parser.error("--exec needs a command after --")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    if args.cleanup:
        reason = why_no_namespaces()
        if reason:
            print(f"cluster-in-a-box: nothing to clean up: {reason}")
            return 0
        removed = cleanup_leftovers(include_live=args.cleanup_all)
        if not removed:
            print("cluster-in-a-box: no leftover namespaces")
        return 0
    cal = calibrate(args.nodes, args.ranks_per_node, args.network_scale, args.target, args.delay_ms,
                    args.flops_per_rank, args.rate_mbit)
    print(cal.describe(), flush=True)
    if args.calibrate_only:
        return 0
    if args.no_emulation:
        print("cluster-in-a-box: --no-emulation: plain loopback, same ranks and placement; "
              "the numbers are NOT network-limited", flush=True)
    cluster = open_cluster(args.nodes, cal.rate_bit_per_node, args.delay_ms, emulate=not args.no_emulation)
    try:
        with cluster:
            if cluster.emulate:
                print(f"cluster-in-a-box: nodes {' '.join(cluster.netns(i) for i in range(args.nodes))} "
                      f"at {', '.join(cluster.addr(i) for i in range(args.nodes))}/24 via bridge in "
                      f"{cluster.router}", flush=True)
            ranks = args.nodes * args.ranks_per_node
            if args.exec:
                port = cluster.new_port()
                commands, envs = [], []
                for i in range(args.nodes):
                    values = {"node": i, "nodes": args.nodes, "addr": cluster.addr(i),
                              "master_addr": cluster.addr(0), "port": port, "ifname": cluster.ifname(i),
                              "nproc": args.ranks_per_node, "is_host": int(i == 0)}
                    commands.append([a.format(**values) for a in rest])
                    env = cluster.node_env(i, port=port)
                    env.update(TTD_NPROC=str(args.ranks_per_node), OMP_NUM_THREADS=str(cal.threads))
                    envs.append(env)
            else:
                commands, envs = cluster.torchrun_commands(
                    ranks, args.ranks_per_node, train_module_args(args.config, rest, cal.threads), cal.threads)
            results = cluster.run(commands, envs, cwd=REPO, timeout=args.timeout, echo=True)
    except Interrupted as exc:
        print(f"cluster-in-a-box: stopped by {exc}; torn down", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("cluster-in-a-box: interrupted; torn down", file=sys.stderr)
        return 130
    bad = [r for r in results if r.returncode != 0]
    for r in bad:
        print(f"cluster-in-a-box: node {r.node} exited with {r.returncode}"
              + (" (stopped after another node failed or the timeout)" if r.killed else ""), file=sys.stderr)
    if bad:
        return bad[0].returncode if bad[0].returncode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
