"""What a config says, as frozen objects: ``Config``, ``ModelSpec``, ``DaemonSpec`` and the rest.

A leaf module: it imports nothing of the orchestrator (only ``states``), so that the config
parser (``orchestrator.config``), the backends and the runtime all import it without
importing each other. Sizes are bytes; YAML's GiB are converted once, by the parser.

Two per-model keys bound the work one model takes on (``models.<name>.max_concurrent`` and
``models.<name>.limits``); the orchestrator checks them before anything loads:

``max_concurrent``
    How many requests the model serves at once (leases in flight on it); a whole number of at
    least 1, or ``null`` for no limit of ours. When the config does not say:

    - ``diffusers`` and ``tts``: 1 (one pipeline draws one image, or speaks one text, at a time);
    - ``vllm``: the server's own batch limit, its ``--max-num-seqs`` when ``args`` sets one,
      else vLLM's default for its OpenAI server (vLLM 0.32, ``EngineArgs``: 1024 on a GPU of
      70 GiB or more other than an A100, 256 on other GPUs, 128 for the CPU build, which is
      what runs when ``hardware.device`` is ``simulated``);
    - ``server``, ``simulated``, ``synthetic``: ``null`` (no limit) unless set.

``limits``
    How much work one request may ask for; a request over a limit is refused (HTTP 400 naming
    the limit and this key) before its model loads. All keys are optional:

    - ``max_input_chars`` (4096): a speech request's ``input``, in characters. OpenAI's own
      limit; a VITS model's memory grows about quadratically with the input's length (10,000
      characters took 24 GB of host memory), so this is what keeps a TTS model within its
      reservation.
    - ``max_steps`` (50): an image request's inference steps. Steps cost time, not memory; 50
      is the diffusers SDXL pipeline's own default number of steps and bounds how long one
      request holds the pipeline.
    - ``max_width``, ``max_height`` (1024 each): an image's size in pixels. 1024x1024 is SDXL's
      native resolution; the VAE decode's peak memory grows with width x height, so larger
      images would take the model past the estimate its ``vram_gb`` was measured at.
    - ``max_n`` (4): images per request (each is drawn in turn on the one pipeline).
    - ``max_tokens`` (``null``): the largest ``max_tokens`` a completion request may ask for;
      ``null`` leaves it to the server (vLLM caps it at the model's context length).

    Example::

        models:
          sdxl-base:
            kind: sdxl
            vram_gb: 10.5
            max_concurrent: 1
            limits: {max_steps: 40, max_width: 1024, max_height: 1024, max_n: 2}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from states.scheduling import Mode

__all__ = [
    "BackendOptions",
    "CacheSpec",
    "Config",
    "DaemonSpec",
    "ModelSpec",
    "RequestLimits",
    "SimSpec",
]


@dataclass(frozen=True)
class SimSpec:
    """How a simulated backend behaves (latencies at time scale 1, true footprint)."""

    load_s: float
    unload_s: float
    offload_s: float
    restore_s: float
    true_vram_bytes: int  # what it really takes on the simulated device once loaded
    use_peak_bytes: int = 0  # extra it takes for a moment while used (SDXL's VAE decode)


@dataclass(frozen=True)
class RequestLimits:
    """How much work one request may ask of a model (``limits:`` of a model; see the module's
    docstring). ``None`` is no limit of ours."""

    max_input_chars: int = 4096  # speech input, characters (OpenAI's own limit)
    max_steps: int = 50  # image inference steps
    max_width: int = 1024  # image pixels
    max_height: int = 1024
    max_n: int = 4  # images per request
    max_tokens: int | None = None  # completion max_tokens; None: the server caps it


@dataclass(frozen=True)
class BackendOptions:
    """A backend type's ``backend:`` options, parsed once and frozen.

    Each backend type has its own subclass, in its own module (``ServerOptions``,
    ``VllmOptions``, ``DiffusersOptions``...), made by the parser its registry entry names
    (``orchestrator.backends.registry``). This base is the options of a type that takes none
    (``simulated``, ``synthetic``).
    """

    def default_max_concurrent(self, *, device: str, total_bytes: int, gpu_name: str) -> int | None:
        """``max_concurrent`` when the config does not set it (None: no limit)."""
        return None

    def limit_problem(self, limits: RequestLimits) -> tuple[str, str, str] | None:
        """(option key, problem, fix) when these options contradict the model's limits."""
        return None


NO_OPTIONS = BackendOptions()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    vram_bytes: int
    confidence: str = "medium"
    backend: str = "simulated"
    options: BackendOptions = NO_OPTIONS  # the backend type's parsed options
    offload: bool = False  # keep a host copy on eviction when the host tier has room
    host_bytes: int = 0
    sim: SimSpec | None = None
    aliases: tuple[str, ...] = ()  # other names acquire() and the monitor accept
    max_concurrent: int | None = None  # requests in flight at once; None: unlimited
    limits: RequestLimits = field(default_factory=RequestLimits)
    gpus: tuple[int, ...] | None = None  # the cards it may use (models.<name>.gpus); None: any
    tensor_parallel: int = 1  # cards it spans at once (vLLM's --tensor-parallel-size)

    @property
    def card_bytes(self) -> int:
        """What it reserves on each card it uses: all of it on one card; spanning ``k``
        cards, its ``k``-th share plus each process's own overhead (``TP_OVERHEAD_BYTES``)."""
        return card_share_bytes(self.vram_bytes, self.tensor_parallel)


# What each process of a model spanning several cards holds beyond its share of the weights
# and cache: its CUDA context and the NCCL buffers between the cards (vLLM starts one worker
# per card).
TP_OVERHEAD_BYTES = 512 * 2**20


def card_share_bytes(vram_bytes: int, tensor_parallel: int) -> int:
    if tensor_parallel <= 1:
        return vram_bytes
    return -(-vram_bytes // tensor_parallel) + TP_OVERHEAD_BYTES


@dataclass(frozen=True)
class CardSpec:
    """One GPU of the machine (``hardware``, or one entry of ``hardware.gpus``)."""

    index: int  # as CUDA and NVML number it
    name: str
    total_bytes: int
    budget_bytes: int  # the most the orchestrator may commit on it


@dataclass(frozen=True)
class DaemonSpec:
    """The ``daemon:`` section: how ``vram-orchestrator serve`` listens and treats leases."""

    host: str = "127.0.0.1"
    port: int = 8470
    token: str | None = None  # bearer token; VRAM_ORCHESTRATOR_TOKEN overrides it
    lease_ttl_s: float = 30.0  # a remote lease not renewed within this expires
    max_lease_ttl_s: float = 3600.0  # the longest ttl a client may ask for
    grace_s: float = 10.0  # at shutdown, how long requests in flight may take to finish
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    request_timeout_s: float = 600.0  # a gateway request waits this long for its model


@dataclass(frozen=True)
class CacheSpec:
    """The ``cache:`` section: the packed checkpoint cache of in-process models (the disk tier
    at disk speed, ``orchestrator.backends.diskcache``). Absent: no cache."""

    path: str  # the cache folder ("~" expanded when used)
    budget_bytes: int  # the most the cache may hold on disk; least recently used entries go first
    verify: bool = True  # check each chunk's checksum while loading (catches a damaged data file)


@dataclass(frozen=True)
class Config:
    source: str
    gpu_name: str
    device: str
    device_index: int
    total_bytes: int
    budget_bytes: int
    exclusive_kinds: frozenset[str]
    light_kinds: frozenset[str]
    models: Mapping[str, ModelSpec]
    defaults: Mapping[str, str]
    mode: Mode = Mode.FAIR
    # When a busy model drains for another's waiters: "cost" (their accumulated wait against
    # the measured cost of the switch, see states/scheduling.py) or "time" (fairness_s)
    fairness: str = "cost"
    fairness_s: float = 5.0
    max_wait_s: float = 300.0
    load_timeout_s: float = 300.0
    unload_timeout_s: float = 60.0
    retry_backoff_s: float = 2.0
    host_budget_bytes: int = 0
    time_scale: float = 1.0
    events_path: str | None = None  # JSON lines of every event, appended
    foreign_memory: str = "wait"  # when other processes leave too little room: wait, or fail
    # learned footprints (orchestrator/footprints.py)
    learn_footprints: bool = True
    footprints_path: str | None = None  # None: in memory only
    footprint_margin: float = 0.05  # plan with the learned high-water mark plus this fraction
    sample_hz: float = 20.0  # the peak sampler's rate (0: off)
    daemon: DaemonSpec = field(default_factory=DaemonSpec)
    cache: CacheSpec | None = None  # the packed checkpoint cache; None: off
    # Several GPUs (hardware.gpus); empty: the one card the fields above describe. With
    # several, budget_bytes and total_bytes are the machine's sums.
    gpus: tuple[CardSpec, ...] = ()

    @property
    def cards(self) -> tuple[CardSpec, ...]:
        """Every card of the machine, in the config's order."""
        return self.gpus or (CardSpec(self.device_index, self.gpu_name, self.total_bytes, self.budget_bytes),)

    def card(self, index: int) -> CardSpec:
        for c in self.cards:
            if c.index == index:
                return c
        raise KeyError(index)

    def resolve(self, name_or_kind: str) -> ModelSpec | None:
        """A model by name or alias, or the default model of a kind."""
        if name_or_kind in self.models:
            return self.models[name_or_kind]
        default = self.defaults.get(name_or_kind)
        if default is not None:
            return self.models[default]
        for spec in self.models.values():
            if name_or_kind in spec.aliases:
                return spec
        return None
