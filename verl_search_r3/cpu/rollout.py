"""The ``hf`` rollout backend: ``actor_rollout_ref.rollout.name=hf`` (transformers ``generate`` on the host).

verl 0.9.1 looks a rollout backend up in two places, and this module registers ``hf`` in both:

* :class:`HFReplica` in ``RolloutReplicaRegistry`` (public API, ``verl/workers/rollout/replica.py``):
  the trainer's ``LLMServerManager`` creates one replica per ``tensor_model_parallel_size`` training
  processes (set it to 1); each replica starts one :class:`~verl_search_r3.cpu.server.HFServer`
  Ray actor, named ``hf_server_<replica>``, that verl's load balancer and agent loops call.
* :class:`HFServerAdapter` in the worker-side ``_ROLLOUT_REGISTRY`` (a private dict with no register
  function, ``verl/workers/rollout/base.py:89-110``): the training worker builds it in
  ``init_model`` and, in the sync trainer's ``naive`` weight sync (``trainer_base.py:382``), hands it
  the full-weights generator of the FSDP engine; the adapter sends the state dict to its replica's
  server and wakes/sleeps it. It consumes the generator on every rank, since FSDP2 gathers each
  tensor collectively.

Only the colocated ("hybrid") mode of verl's synchronous trainers is exercised by this project.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import ray
import torch
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry

from .compat import require_verl
from .server import HFServer

require_verl("verl.workers.rollout.base._ROLLOUT_REGISTRY")

__all__ = ["ROLLOUT_NAME", "HFReplica", "HFServerAdapter", "server_name", "register"]

ROLLOUT_NAME = "hf"
"""``actor_rollout_ref.rollout.name`` of this backend."""


def server_name(replica_rank: int, suffix: str = "") -> str:
    """Ray actor name of a replica's server (also its address in verl's load balancer)."""
    return f"{ROLLOUT_NAME}_server_{replica_rank}{suffix}"


class HFReplica(RolloutReplica):
    """A replica served by one :class:`~verl_search_r3.cpu.server.HFServer` actor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.world_size != 1:
            raise ValueError(
                "the hf rollout serves a replica from one process: set actor_rollout_ref.rollout.tensor_model_parallel_size=1 "
                f"(and data/pipeline parallel 1); got a replica world size of {self.world_size}"
            )

    async def launch_servers(self) -> None:
        kind = "_reward" if self.is_reward_model else "_teacher" if self.is_teacher_model else ""
        name = server_name(self.replica_rank, kind + self.name_suffix)
        server = ray.remote(HFServer).options(name=name, max_concurrency=self.max_concurrency).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = name
        await server.ready.remote()

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        results = [await s.abort_all_requests.remote(reject_request=reject_request) for s in self.servers]
        ids = [i for r in results for i in r["request_ids"]]
        return {"aborted_count": len(ids), "request_ids": ids, "server_results": results}

    async def abort_request(self, request_id: str) -> dict[str, Any]:
        for s in self.servers:
            result = await s.abort_request.remote(request_id)
            if result["aborted"]:
                return result
        return {"aborted": False, "request_id": request_id}


class HFServerAdapter(BaseRollout):
    """Training-worker side of the ``hf`` rollout: weight sync and wake/sleep of the replica's server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        c = self.config
        world = c.tensor_model_parallel_size * c.data_parallel_size * c.pipeline_model_parallel_size
        rank = int(os.environ.get("RANK", "0"))
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self._server: Any = None

    def _handle(self) -> Any:
        """The replica's server (looked up on first use: servers start after the training workers)."""
        if self.is_leader_rank and self._server is None:
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server if self.is_leader_rank else None

    async def resume(self, tags: list[str]) -> None:
        if self.config.free_cache_engine and self._handle() is not None:
            await self._handle().wake_up.remote(tags=tags)

    async def release(self) -> None:
        if self.config.free_cache_engine and self._handle() is not None:
            await self._handle().sleep.remote()

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]] | AsyncIterator[tuple[str, torch.Tensor]],
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> None:
        """Send the full weights to the server; every rank drains ``weights`` (FSDP2 gathers collectively)."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the hf rollout receives full tensors only (wire_format={wire_format!r})")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("the hf rollout receives merged weights only; set actor_rollout_ref.model.lora.merge=True")
        state: dict[str, torch.Tensor] = {}
        if hasattr(weights, "__aiter__"):
            async for name, tensor in weights:
                state[name] = tensor.detach().to("cpu", copy=True)
        else:
            for name, tensor in weights:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self._handle() is not None:
            await self._handle().update_weights.remote(state, global_steps)


def register() -> None:
    """Register ``hf`` in verl's replica registry and in the worker-side rollout registry; idempotent."""
    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFReplica)
    rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{HFServerAdapter.__module__}.{HFServerAdapter.__qualname__}"
