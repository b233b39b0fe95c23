"""The engine's compiled steps: a fixed set of graphs, compiled ahead of time once, saved, and loaded by every later
engine instead of compiled again.

Each step (the vision tower, ``extend``, ``decode_step``) is compiled with ``torch.compile(...).aot_compile``, one
graph per *variant* of its inputs that a size cannot cover (one row or several, greedy or sampling, the attention
mode), every size dynamic. So the set of graphs is fixed by what the engine can run, not by the data it meets: the
engine's warm-up walks every variant, and after it nothing compiles. A call whose guards no graph of its variant
passes compiles one more (logged as a warning once the engine is warm) rather than running a wrong graph.

Compiling a step costs minutes on a CPU (tracing, Inductor, the C++ compiler); loading it costs about a second. An
engine given a cache directory saves its graphs there (``save_compiled_function``) with the Inductor cache they were
compiled into (their C++ or Triton kernels, so a fresh machine does not compile those either), in a folder named by
a digest of what makes them valid (:func:`artifact_key`); the next engine with the same key loads them. A folder
that fails to load is set aside with a warning, never trusted.

Sizes the graphs do not depend on (slots, cache length, tiles per call) are not in the key: the graphs are
dynamic in them, and the guards of each graph check every call.
"""

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from fms_smolvlm.errors import one_line

logger = logging.getLogger(__name__)

GRAPHS_DIR = "graphs"
KERNELS_DIR = "inductor"  # the Inductor cache the graphs were compiled into: their C++ or Triton kernels
MANIFEST = "manifest.json"
ARTIFACT_FORMAT = 1
SOURCE_DIR = Path(__file__).resolve().parent
TRACED_SOURCES = ("generation.py", "smolvlm.py", "compiled.py")


def default_compile_cache() -> Path:
    """``$FMS_SMOLVLM_COMPILE_CACHE``, else ``~/.cache/fms_smolvlm/compiled`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("FMS_SMOLVLM_COMPILE_CACHE"):
        return Path(os.environ["FMS_SMOLVLM_COMPILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fms_smolvlm" / "compiled"


def device_kind(device: torch.device) -> str:
    """What compiled kernels are specific to: the GPU model and CUDA version, or the CPU's vector ISA."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}:cuda{torch.version.cuda}"
    return f"{device.type}:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"


def source_digest() -> str:
    """The code the graphs were traced from and compiled by (the engine's steps, the model, this module): a changed
    file must not load old graphs. (FMS's modules are pinned by its version in the key.)"""
    digest = hashlib.sha256()
    for name in TRACED_SOURCES:
        digest.update(name.encode() + (SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def artifact_key(model_config, dtype: torch.dtype, device: torch.device, options: dict) -> dict:
    """What makes compiled graphs valid: the versions of everything that traced and compiled them, the model's
    shape and dtype, the device kind and the compile options."""
    from importlib.metadata import version

    return {
        "format": ARTIFACT_FORMAT,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ibm_fms": version("ibm-fms"),
        "source": source_digest(),
        "device": device_kind(device),
        "dtype": str(dtype),
        "model": json.dumps(dataclasses.asdict(model_config), sort_keys=True, default=str),
        "options": json.dumps(options, sort_keys=True, default=str),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def _tracing_config() -> Iterator[None]:
    """Settings for tracing one graph that must hold for every later call (scoped to the trace):
    - no duck sizing: two sizes that are equal by chance in the example (a batch of 8 rows and 8 slots) would
      become one symbol, and the next call where they differ would fail the graph's guards;
    - floats stay constants: a float made symbolic restarts Dynamo's analysis, which an AOT compile cannot do."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False), torch._dynamo.config.patch(specialize_float=True):
        yield


class CompiledStep:
    """One of the engine's steps, compiled ahead of time: graphs per variant of its inputs (``variant(*args)`` names
    it), each compiled when its variant is first met (the warm-up meets them all) or loaded from an artifact."""

    def __init__(self, name: str, fn: Callable, variant: Callable[..., str], dynamic_dims: Callable = None, **compile_kwargs):
        """``dynamic_dims(*args)``: ``(tensor, dim)`` pairs to trace as dynamic (for ``dynamic=None`` steps whose
        other sizes stay static); ``compile_kwargs`` go to ``torch.compile`` (``fullgraph`` is implied)."""
        self.name = name
        self.fn = fn
        self.variant = variant
        self.dynamic_dims = dynamic_dims
        self.compile_kwargs = compile_kwargs
        self.graphs: dict[str, list] = {}
        self.compiled = 0  # graphs compiled in this process
        self.loaded = 0
        self.kernels: Callable = nullcontext  # the Inductor cache scope compiles run in (set by CompiledSteps)
        self.warm = False  # set once the engine's warm-up is done: a compile after it is a stall worth a warning

    def __call__(self, *args):
        variant = self.variant(*args)
        for graph in self.graphs.get(variant, ()):
            if graph.guard_check(*args):
                return graph(*args)
        return self._compile(variant, args)(*args)

    def _compile(self, variant: str, args: tuple):
        if self.warm:
            logger.warning("compiling the %s step's graph %r after warm-up: a call the warm-up did not cover "
                           "(this replica stalls while it compiles)", self.name, variant)
        started = time.perf_counter()
        for tensor, dim in self.dynamic_dims(*args) if self.dynamic_dims else ():
            torch._dynamo.mark_dynamic(tensor, dim)
        with self.kernels(), _tracing_config():
            compiled = torch.compile(self.fn, fullgraph=True, **self.compile_kwargs)
            graph = compiled.aot_compile((args, {}))
        graph.disable_guard_check()  # __call__ checks each call's guards once, to choose the graph
        self.graphs.setdefault(variant, []).append(graph)
        self.compiled += 1
        logger.info("compiled the %s step's graph %r in %.1f s", self.name, variant, time.perf_counter() - started)
        return graph

    def save(self, directory: Path) -> list[str]:
        names = []
        for variant, graphs in self.graphs.items():
            for index, graph in enumerate(graphs):
                name = f"{self.name}.{variant}.{index}.pt"
                graph.save_compiled_function(str(directory / name))
                names.append(name)
        return names

    def load(self, path: Path) -> None:
        variant = path.name.split(".")[1]
        with open(path, "rb") as handle:
            graph = torch.compiler.load_compiled_function(handle)
        graph.disable_guard_check()
        self.graphs.setdefault(variant, []).append(graph)
        self.loaded += 1


class CompiledSteps:
    """The engine's compiled steps, and their artifact folder ``cache / key_digest(key)`` (``cache=None``: nothing
    is loaded or saved; the graphs compile into Inductor's default cache)."""

    def __init__(self, steps: list[CompiledStep], key: dict, cache: Optional[Path]):
        self.steps = {step.name: step for step in steps}
        self.key = key
        self.digest = key_digest(key)
        self.directory = None if cache is None else Path(cache) / self.digest
        self._kernels: Optional[Path] = None  # the Inductor cache new graphs compile into (None: Inductor's default)
        self._staging: Optional[Path] = None  # a folder that :meth:`save` publishes as the artifact
        for step in steps:
            step.kernels = self.kernels

    @contextmanager
    def kernels(self) -> Iterator[None]:
        """Compiles run against the artifact's own Inductor cache (the one being built, or the one loaded), so that
        it holds their kernels."""
        if self._kernels is None:
            yield
            return
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

        with temporary_cache_dir(str(self._kernels)):
            yield

    @property
    def compiled(self) -> int:
        return sum(step.compiled for step in self.steps.values())

    @property
    def loaded(self) -> int:
        return sum(step.loaded for step in self.steps.values())

    def seal(self) -> None:
        for step in self.steps.values():
            step.warm = True

    def load(self) -> bool:
        """Load the artifact's graphs; False (and a warning for a broken one) when there is none to use."""
        if self.directory is None or not (self.directory / MANIFEST).exists():
            return False
        self._kernels = self.directory / KERNELS_DIR
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
            if manifest.get("key") != self.key:
                raise ValueError("its key does not match this engine's (a digest collision, or an edited file)")
            with self.kernels():
                for name in manifest["graphs"]:
                    self.steps[name.split(".")[0]].load(self.directory / GRAPHS_DIR / name)
        except Exception as error:  # a corrupt or foreign artifact: compile instead, never run it
            logger.warning("ignoring the compiled artifact %s: %s", self.directory, one_line(error, with_type=True))
            for step in self.steps.values():
                step.graphs.clear()
                step.loaded = 0
            self._kernels = None
            self._set_aside()
            return False
        logger.info("loaded %d compiled graphs from %s", self.loaded, self.directory)
        return True

    def begin_artifact(self) -> None:
        """Compile from here on into a fresh folder beside the artifact's, which :meth:`save` publishes."""
        if self.directory is not None:
            self._staging = self.directory.with_name(f"{self.directory.name}.partial-{uuid.uuid4().hex[:8]}")
            self._kernels = self._staging / KERNELS_DIR

    def save(self) -> Optional[Path]:
        """Publish the graphs compiled since :meth:`begin_artifact` (with their kernels) as the artifact, in one
        rename; an artifact another engine published first is kept (it is just as valid). Returns the artifact's
        folder, None when there is none."""
        if self._staging is None:
            return self.directory if self.directory is not None and self.directory.exists() else None
        graphs = self._staging / GRAPHS_DIR
        graphs.mkdir(parents=True, exist_ok=True)
        names = [name for step in self.steps.values() for name in step.save(graphs)]
        manifest = {"key": self.key, "graphs": names, "created": time.time()}
        (self._staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            self._staging.rename(self.directory)
            logger.info("saved %d compiled graphs to %s", len(names), self.directory)
        except OSError:  # published meanwhile by another engine with the same key
            shutil.rmtree(self._staging, ignore_errors=True)
        self._staging, self._kernels = None, self.directory / KERNELS_DIR
        return self.directory

    def _set_aside(self) -> None:
        aside = self.directory.with_name(f"{self.directory.name}.broken-{uuid.uuid4().hex[:8]}")
        try:
            self.directory.rename(aside)
        except OSError:  # another engine set it aside first
            pass
