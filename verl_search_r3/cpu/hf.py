"""The ``hf`` rollout alone, without the CPU platform: for a GPU node without vLLM.

``VERL_USE_EXTERNAL_MODULES=verl_search_r3.cpu.hf`` (also in the job's Ray runtime environment)
registers :mod:`~verl_search_r3.cpu.rollout` in every verl process; then
``actor_rollout_ref.rollout.name=hf`` generates with transformers in a Ray actor on the host CPU
while training runs on the GPU (weights are sent to it after each update). Slow, but enough to
check the rest of the pipeline where vLLM cannot be installed (``scripts/gpu_smoke.sh --rollout hf``).
"""

from .rollout import register

register()
