"""The scheduler: wires a validated graph into channels and node runners, and owns them.

Every node gets one input channel (shared by all its upstream edges); each node's
outputs are its downstream nodes' input channels, or the :class:`Sink` for the exit
node. Workers are started in the engine's task group; the end of input flows from the
source channel through every node as each node's last worker closes its outputs.
"""

from __future__ import annotations

import anyio.abc

from ..graph import Graph, Plan, resolve
from ._backend import Backend
from ._channel import Channel
from ._request import Item, Sink
from ._worker import NodeRunner, Output
from .executors._thread import default_intra_op_threads

__all__ = ["Scheduler"]


class Scheduler:
    """Owns the channels, runners and threads of one running graph."""

    def __init__(self, graph: Graph, plan: Plan, backend: Backend) -> None:
        self.graph = graph
        self.plan = plan
        self.backend = backend
        nodes = graph.nodes
        self.placements = {name: resolve(nodes[name]) for name in plan.order}
        for name, placement in self.placements.items():
            if placement == "ray":
                # Imported only for graphs that use Ray: `import dataflow` never imports it.
                from .executors._ray import ray_options

                ray_options(nodes[name])  # GraphError for an unknown or invalid option
        # Ray replicas run in other processes: they take no share of this one's cores.
        thread_replicas = sum(
            nodes[n].replicas for n, p in self.placements.items() if p not in ("loop", "ray")
        )
        default_threads = default_intra_op_threads(thread_replicas)
        self.inboxes: dict[str, Channel[Item]] = {
            name: Channel(
                backend,
                nodes[name].input_capacity,
                senders=max(1, len(plan.upstream[name])),
                name=name,
            )
            for name in plan.order
        }
        self.sink = Sink()
        self.runners: dict[str, NodeRunner] = {}
        for name in plan.order:
            node = nodes[name]
            outputs: list[Output] = [
                (self.inboxes[d], plan.upstream[d].index(name)) for d in plan.downstream[name]
            ] or [(self.sink, 0)]
            placement = self.placements[name]
            self.runners[name] = NodeRunner(
                node,
                placement,
                backend,
                self.inboxes[name],
                outputs,
                fan_in=len(plan.upstream[name]),
                intra_op_threads=(
                    None if placement == "loop" else (node.threads or default_threads)
                ),
            )
        if "ray" in self.placements.values():
            # How Ray nodes hand on values (ObjectRefs, compiled chains): runner.ray_hints.
            from .executors._ray import plan_ray

            plan_ray(plan, self.placements, self.runners)
        self._started: list[NodeRunner] = []
        self.inline = True  # let idle simple nodes run in their producer's task

    @property
    def source(self) -> Channel[Item]:
        return self.inboxes[self.plan.source]

    async def start_replicas(self) -> None:
        """Create every replica, running constructors and ``setup()`` where they live.

        Raises:
            NodeError: a node could not start; the replicas already made are stopped.
        """
        try:
            for name in self.plan.order:
                runner = self.runners[name]
                self._started.append(runner)
                await runner.start()
        except BaseException:
            await self.stop()
            raise

    def start_workers(self, tg: anyio.abc.TaskGroup) -> None:
        """Start one worker task per replica in ``tg``."""
        for runner in self.runners.values():
            if self.inline:
                runner.enable_inline()
        self.sink.tg = tg
        for runner in self.runners.values():
            runner.tg = tg
            for index in range(runner.worker_count()):
                tg.start_soon(runner.run_worker, index, name=f"dataflow:{runner.name}:{index}")

    async def stop(self, grace: float = float("inf")) -> list[str]:
        """Tear down replicas and join every thread; the names of the nodes whose body
        was still running ``grace`` seconds on (their threads are left behind)."""
        started, self._started = self._started, []
        stuck = []
        for runner in reversed(started):
            if not await runner.stop(grace):
                stuck.append(runner.name)
        return stuck

    def close_input(self, *, cancel: bool = False) -> None:
        """No more requests: the end flows through the graph. With ``cancel``, callers
        still waiting to enter are refused at once."""
        self.source.close_sender()
        if cancel:
            for inbox in self.inboxes.values():
                inbox.close_receiver()

    def holding_capacity(self) -> int:
        """How many items the graph can hold at once: every channel full, every replica
        busy. A window this large keeps every stage of a pipeline busy."""
        return sum(ch.capacity for ch in self.inboxes.values()) + sum(
            r.replicas for r in self.runners.values()
        )

    def items_inside(self) -> int:
        """Items held by the graph right now (in channels and merges), for tests and stats."""
        return (
            sum(len(ch) for ch in self.inboxes.values())
            + sum(r.pending_parts() for r in self.runners.values())
            + self.sink.late()
        )
