"""A private 3-node RabbitMQ cluster for tests that kill nodes under quorum queues.

    with RabbitCluster(tmp_path) as cluster:   # the first node boots, then the others join it
        cluster.url                     # amqp://…:p1,…:p2,…:p3 (OUTBOX_AMQP_URL's node list)
        cluster.urls                    # one URL per node
        cluster.leader(queue)           # the RabbitNode that leads a quorum queue now
        cluster.kill(node); cluster.start_node(node)   # it rejoins from its own data
        cluster.restart_all()           # every node killed, then all started together
        cluster.flush()                 # every node writes out its metadata (before a crash)
        cluster.wait_leader(queue)      # until a quorum queue has a leader (after a restart)

Built on `tests.rabbit_node.RabbitNode`: the nodes run as the same user with the same HOME, so
they share one Erlang cookie, and the second and third join the first with ``rabbitmqctl
join_cluster``-equivalent peer discovery (``classic_config``) at their first boot. Nodes boot in
threads: the boots overlap.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.rabbit_node import RabbitNode

CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
QUEUES = "/usr/lib/rabbitmq/bin/rabbitmq-queues"
# Mnesia's transaction log and Ra's registry of queue members and their metadata, to disk
FLUSH = "mnesia:sync_log(), [ok = dets:sync(T) || T <- [ra_directory_reverse, ra_log_meta]], ok."


def ctl(node: RabbitNode, *args: str, timeout: float = 60, tool: str = CTL) -> str:
    """``rabbitmqctl -n <node> …`` as the user that holds the Erlang cookie; raises on failure."""
    kwargs: dict[str, Any] = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env["ERL_EPMD_ADDRESS"] = "127.0.0.1"
    if os.geteuid() == 0:
        kwargs.update(user="rabbitmq", group="rabbitmq")
        env["HOME"] = "/var/lib/rabbitmq"
    out = subprocess.run([tool, "-n", node.nodename, *args], env=env, capture_output=True,
                         timeout=timeout, cwd="/tmp", **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(tool).name} -n {node.nodename} {' '.join(args)} failed: "
                           f"{(out.stderr or out.stdout).decode()[-500:]}")
    return out.stdout.decode()


def in_parallel(calls: Sequence[Callable[[], object]]) -> None:
    """Run the calls in threads; re-raise the first error once all have ended."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # re-raised below, once every thread has ended
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class RabbitCluster:
    """Three (or ``size``) clustered private nodes; see the module docstring."""

    def __init__(self, tmpdir: str | os.PathLike[str], size: int = 3,
                 start_timeout: float = 90.0) -> None:
        first = RabbitNode(tmpdir, start_timeout=start_timeout)
        # the others join the first at their first boot (peer discovery), which saves the
        # stop_app / join_cluster / start_app round trips of rabbitmqctl (a VM start each)
        joining = ("cluster_formation.peer_discovery_backend = classic_config\n"
                   f"cluster_formation.classic_config.nodes.1 = {first.nodename}\n"
                   "cluster_formation.randomized_startup_delay_range.min = 0\n"
                   "cluster_formation.randomized_startup_delay_range.max = 0\n")
        self.nodes = [first, *(RabbitNode(tmpdir, start_timeout=start_timeout,
                                          extra_config=joining) for _ in range(size - 1))]
        self._formed = False

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """One URL listing every node, the form OUTBOX_AMQP_URL takes for failover."""
        return ",".join(self.urls)

    def start(self) -> RabbitCluster:
        """Boot the nodes (in parallel, but the first alone the first time: the others join it)."""
        if not self._formed:
            self.nodes[0].start()  # the others discover it at boot and join it
        in_parallel([n.start for n in self.nodes if not n.running])
        if not self._formed:
            self.wait_formed()
            self._formed = True
        return self

    def wait_formed(self, timeout: float = 60) -> None:
        """Until every node reports every other as a running member."""
        deadline = time.monotonic() + timeout
        want = {n.nodename for n in self.nodes}
        while True:
            try:
                out = ctl(self.nodes[0], "eval",
                          "lists:sort([atom_to_list(N) || N <- rabbit_nodes:all_running()]).")
                if all(name in out for name in want):
                    return
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not formed after {timeout}s")
            time.sleep(0.3)

    def node_by_port(self, port: int) -> RabbitNode:
        return next(n for n in self.nodes if n.port == port)

    def by_name(self, nodename: str) -> RabbitNode:
        return next(n for n in self.nodes if n.nodename == nodename)

    def running_node(self) -> RabbitNode:
        return next(n for n in self.nodes if n.running)

    def leader(self, queue: str, via: RabbitNode | None = None) -> RabbitNode:
        """The node that leads the quorum queue ``queue`` now (asked of a running node)."""
        asked = via or self.running_node()
        out = ctl(asked, "list_queues", "-q", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return self.by_name(parts[1])
        raise LookupError(f"no quorum queue {queue!r} on {asked.nodename}: {out!r}")

    def wait_leader(self, queue: str, timeout: float = 60) -> RabbitNode:
        """Until a member of the quorum queue ``queue`` reports that it leads it (``rabbitmq-queues
        quorum_status``, asked of each running node in turn); the node that leads it."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            for node in [n for n in self.nodes if n.running]:
                try:
                    out = ctl(node, "quorum_status", queue, "--formatter", "json", timeout=15,
                              tool=QUEUES)
                    members = json.loads(out)
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                    last = str(exc)
                    continue
                for m in members:
                    if m.get("Raft State") == "leader":
                        return self.by_name(str(m["Node Name"]))
                last = out
            if time.monotonic() > deadline:
                raise TimeoutError(f"quorum queue {queue!r} has no leader after {timeout:g}s: "
                                   f"{last[-300:]}")
            time.sleep(0.3)

    def flush(self) -> None:
        """Every running node writes out what it still holds in memory of the cluster's metadata
        (Mnesia's transaction log; Ra's registry of queue members and their terms). Call it
        before crashing every node at once: on RabbitMQ 3.10 a quorum queue declared seconds
        before all the nodes were SIGKILLed is not recovered when they start again (each logs
        "Recovering 0 queues of type rabbit_quorum_queue"), its members never run, and it has
        no leader again: every publish to it goes unconfirmed."""
        in_parallel([functools.partial(ctl, n, "eval", FLUSH) for n in self.nodes if n.running])

    def kill(self, node: RabbitNode) -> None:
        node.kill()

    def start_node(self, node: RabbitNode) -> None:
        """Start a node again; it rejoins the cluster from its own data."""
        node.start()

    def restart_all(self) -> None:
        """Every node killed, then all started together (a clustered node that was not the last
        to stop waits at boot for the others, so they must come up at once; killed together,
        none stopped last). See `flush` for what a crash of every node forgets."""
        in_parallel([n.kill for n in self.nodes])
        in_parallel([n.start for n in self.nodes])

    def close(self) -> None:
        in_parallel([n.close for n in self.nodes])

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
