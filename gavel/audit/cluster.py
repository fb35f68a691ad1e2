"""Audits on a Ray cluster: a pool of actors, each loading the model once and guarding whole batches of the audit,
in the same batches as the single-process audit, so the merged results are the same.

The driver sends each actor the CE bank and the parsed rules (as objects) and the model spec; every node needs
gavelkit (with the rules' plugins) installed and must be able to load the model: a built-in, a hub id in its cache,
or a path on a shared filesystem. Ray is imported only here, on demand (`pip install 'gavelkit[ray]'`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gavel.errors import DataError, GavelError
from gavel.io.conversations import Conversation
from gavel.probes.bank import CEBank
from gavel.rules import RuleSpec

if TYPE_CHECKING:
    from gavel.runtime.guard import Guard, GuardResult
    from gavel.runtime.monitor import Policy


@dataclass(frozen=True)
class GuardRecipe:
    """What a worker builds its guard from: the model spec (loaded on the worker), the bank and the rules."""

    model: str
    bank: CEBank
    rules: list[RuleSpec]
    device: str = "cpu"
    device_map: str | None = None      # "auto": spread a model larger than one GPU over the worker's GPUs
    policy: Policy = "fail_open"
    threads: int = 1


class AuditWorker:
    """One Ray actor: `start` loads the model and builds the guard (errors surface there, on the driver);
    `run` guards a batch as the single-process audit does."""

    def __init__(self, recipe: GuardRecipe) -> None:
        self.recipe = recipe
        self.guard: Guard | None = None

    def start(self) -> tuple[str, list[RuleSpec]]:
        """Load the model and build the guard; returns the model's name and the rules the guard reports."""
        import torch

        from gavel.models.loading import load_model
        from gavel.runtime.guard import Guard

        torch.set_num_threads(self.recipe.threads)
        handle = load_model(self.recipe.model, device=self.recipe.device, device_map=self.recipe.device_map)
        self.recipe.bank.manifest.fingerprint.check(handle.fingerprint(), what="CE bank")
        self.guard = Guard(handle, self.recipe.bank, self.recipe.rules, policy=self.recipe.policy)
        return handle.name, list(self.guard.monitor.rules)

    def run(self, conversations: list[Conversation], generate: bool, max_new_tokens: int) -> list[GuardResult]:
        assert self.guard is not None, "start() builds the guard before any run()"
        if generate:
            return self.guard.generate(conversations, max_new_tokens=max_new_tokens)
        return self.guard.check(conversations)


def _unwrapped(error: Exception) -> Exception:
    """The gavel error a Ray task raised, so the CLI reports it as it would locally."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, GavelError) else error


def ray_guard_items(recipe: GuardRecipe, conversations: Sequence[Conversation], *, generate: bool = True,
                    max_new_tokens: int = 64, batch_size: int = 16, workers: int = 2, address: str | None = None,
                    cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                    progress: Callable[[int], None] | None = None) -> tuple[str, list[RuleSpec], list]:
    """(model name, reported rules, one GuardResult per conversation in order), guarded by `workers` Ray actors.
    Connects to the cluster at `address` (e.g. `ray://head:10001` or `auto`), or starts a local one; a Ray
    session this call starts is shut down after it."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        raise DataError("--ray needs Ray installed", hint="pip install 'gavelkit[ray]'") from e
    if workers < 1 or batch_size < 1:
        raise DataError(f"workers and batch size must be at least 1 (got {workers} and {batch_size})")
    started = not ray.is_initialized()
    if started:
        num_cpus = None if address else max(1, int(workers * cpus_per_worker))   # None: the cluster's
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    actors = []
    try:
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(AuditWorker)
        shared = ray.put(recipe)
        actors = [remote.remote(shared) for _ in range(workers)]
        try:
            # ray: an actor method not decorated with @ray.method is typed as the plain method, without .remote
            name, rules = ray.get([a.start.remote() for a in actors])[0]  # type: ignore[attr-defined]
            batches = [list(conversations[i:i + batch_size]) for i in range(0, len(conversations), batch_size)]
            results: list = []
            for part in ActorPool(actors).map(lambda a, batch: a.run.remote(batch, generate, max_new_tokens),
                                               batches):
                results += part
                if progress is not None:
                    progress(len(part))
        except ray.exceptions.RayTaskError as e:
            raise _unwrapped(e) from None
        return name, rules, results
    finally:
        for actor in actors:
            ray.kill(actor)  # type: ignore[arg-type]  # ray: ActorClass.remote() is typed ActorHandle | type[T]
        if started:
            ray.shutdown()
