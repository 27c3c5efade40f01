"""verl's FSDP2 engines registered for device ``cpu`` (``EngineRegistry``), trained over gloo.

verl 0.9.1 registers its FSDP LM-head and value-head engines for ``cuda``/``npu`` only
(``verl/workers/engine/fsdp/transformer_impl.py:1143,1594``; lookup by device name in
``verl/workers/engine/base.py:426``). These subclasses register the same engines for ``cpu`` with
one change at build time:

* verl gives a forward-only engine (the reference model) an FSDP2 ``CPUOffloadPolicy(pin_memory=True)``
  (``transformer_impl.py:459-463``); pinned memory needs an accelerator ("Cannot access
  accelerator device"), and offloading host parameters to the host is pointless. The CPU engine
  builds every module without an offload policy (:meth:`_build_fsdp_module`, a private method of
  verl's ``FSDPEngine``: the one private this module uses).
* FSDP1 (``strategy=fsdp``) cannot wrap host parameters with ``sync_module_states=True``
  (``transformer_impl.py:437-449``): the engine refuses it with the fix in the message.

Everything else (micro-batching, dynamic batch size, checkpoints, ``get_per_tensor_param`` for
weight sync) is verl's code running on host tensors. Set ``fsdp_config.mixed_precision`` to fp32
on CPU (the recipes do): verl's default computes in bf16 under autocast.
"""

from __future__ import annotations

from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

from .compat import require_verl

require_verl("verl.workers.engine.fsdp.transformer_impl.FSDPEngine._build_fsdp_module (override)")

__all__ = ["CPUFSDPEngineWithLMHead", "CPUFSDPEngineWithValueHead"]


class _HostParameters:
    """Mixin for verl's FSDP engines: FSDP2 only, no CPU-offload policy (parameters already live on the host)."""

    def _build_fsdp_module(self, module):
        cfg = self.engine_config
        if cfg.strategy != "fsdp2":
            raise ValueError(
                f"the CPU backend trains with FSDP2 only (got strategy={cfg.strategy!r}): FSDP1 cannot wrap host "
                "parameters; set actor_rollout_ref.actor.strategy=fsdp2 (Stage 1: engine.strategy=fsdp2)"
            )
        if cfg.offload_policy:
            raise ValueError("offload_policy=True needs an accelerator; on the CPU backend set fsdp_config.offload_policy=False")
        forward_only = cfg.forward_only
        cfg.forward_only = False  # verl would give a forward-only module a pinned-memory offload policy
        try:
            module = super()._build_fsdp_module(module)
        finally:
            cfg.forward_only = forward_only
        if forward_only:  # as verl does for the reference model: no manual offload either
            self._is_offload_param = False
            self._is_offload_optimizer = False
        return module


@EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")
class CPUFSDPEngineWithLMHead(_HostParameters, FSDPEngineWithLMHead):
    """verl's ``FSDPEngineWithLMHead`` (actor, reference, Stage-1 policy) on host memory."""


@EngineRegistry.register(model_type="value_model", backend=["fsdp", "fsdp2"], device="cpu")
class CPUFSDPEngineWithValueHead(_HostParameters, FSDPEngineWithValueHead):
    """verl's ``FSDPEngineWithValueHead`` (critic) on host memory."""
