"""What every model stage is, so the Ray adapter and the flows can treat them alike.

    validated config -> Stage.setup() loads the model once -> Stage(batch) pure -> teardown()

A per-sample failure is data: the stage returns a `Reject` (reason code + detail) in that
sample's place and the batch goes on. A bad config is an exception, raised when the stage is
built. Heavy imports (torch, diffusers, transformers, ...) happen inside `setup`, never at
import time, so the CLI and the flows stay light.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from datagen.core.config import NonNegativeFloat, config_class
from datagen.core.native_heap import trim_native_heap

In = TypeVar("In")
Out = TypeVar("Out")


@config_class
class Resources:
    """What one actor of a stage needs. Fractional GPUs let small models share a device."""

    num_gpus: NonNegativeFloat = 0.0
    num_cpus: NonNegativeFloat = 1.0

    def __post_init__(self) -> None:
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"more than one GPU must be a whole number, got {self.num_gpus}")


@dataclass(frozen=True)
class Reject:
    """A sample a stage could not process: where, why (a reason code) and the detail."""

    sample_id: str
    stage: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ModelRef:
    """What produced an output: model id (hub id or path) and revision (commit or sha256:...)."""

    id: str
    revision: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "revision": self.revision}


@dataclass
class StageStats:
    """Counters a stage keeps about itself (read by benchmarks and the orchestration tests)."""

    loads: int = 0
    load_seconds: float = 0.0
    batches: int = 0
    samples: int = 0
    rejects: int = 0
    compute_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Stage(ABC, Generic[In, Out]):
    """Base class of the model stages (control, stylize, animate, caption, score)."""

    name: ClassVar[str]
    # Attributes that hold what `_load` built. A stage naming them pickles as its config: they
    # are dropped and the process that unpickles it loads again (a connection pool does not
    # pickle, an API key must not travel).
    loaded_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, resources: Resources | None = None):
        self.resources = resources or Resources()
        self.stats = StageStats()
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        if self.loaded_attributes:
            state.update(dict.fromkeys(self.loaded_attributes), _loaded=False)
        return state

    def setup(self) -> None:
        """Load the model(s) once; calling it again does nothing."""
        if self._loaded:
            return
        started = time.perf_counter()
        self._load()
        self.stats.loads += 1
        self.stats.load_seconds += time.perf_counter() - started
        self._loaded = True

    def __call__(self, batch: Sequence[In]) -> list[Out | Reject]:
        """Process a batch; one result per input, in order: an output or a Reject."""
        self.setup()
        started = time.perf_counter()
        results = self._process_within_memory(list(batch))
        if len(results) != len(batch):
            raise RuntimeError(
                f"{self.name}: returned {len(results)} results for {len(batch)} inputs"
            )
        self.stats.compute_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.samples += len(batch)
        self.stats.rejects += sum(isinstance(r, Reject) for r in results)
        trim_native_heap()  # the batch's buffers are free now: give their pages back
        return results

    def _process_within_memory(self, batch: list[In]) -> list[Out | Reject]:
        """Run a batch; on an out-of-memory error, free memory and retry it in two halves,
        down to single samples, which are then rejected with reason `out_of_memory`."""
        try:
            return self._process(batch)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            release_accelerator_memory()
            self.stats.extra["oom_splits"] = self.stats.extra.get("oom_splits", 0) + 1
            if len(batch) == 1:
                sample_id = getattr(batch[0], "sample_id", repr(batch[0]))
                return [
                    self.reject(
                        sample_id, "out_of_memory", f"out of memory even alone: {str(error)[:200]}"
                    )
                ]
            half = len(batch) // 2
            return self._process_within_memory(batch[:half]) + self._process_within_memory(
                batch[half:]
            )

    def teardown(self) -> None:
        """Release the model(s) (and GPU memory)."""
        if self._loaded:
            self._unload()
            self._loaded = False
            release_accelerator_memory()

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _process(self, batch: list[In]) -> list[Out | Reject]: ...

    def _unload(self) -> None:
        """Drop references to models; subclasses with extra state extend this."""
        for attribute in list(vars(self)):
            if attribute.startswith("model") or attribute.startswith("pipe"):
                setattr(self, attribute, None)

    def models(self) -> dict[str, ModelRef]:
        """Role -> model that produced this stage's outputs (recorded in every row)."""
        return {}

    def params(self) -> dict[str, Any]:
        """The settings that shaped this stage's outputs (recorded in the row's params)."""
        return {}

    def reject(self, sample_id: str, reason: str, detail: str = "") -> Reject:
        return Reject(sample_id=sample_id, stage=self.name, reason=reason, detail=detail)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, whatever class the library raised."""
    if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError and kin
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_accelerator_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but teardown must not fail
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pick_device(resources: Resources) -> str:
    """'cuda' when the stage asked for a GPU and one is visible, else 'cpu'."""
    import torch

    return "cuda" if resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
