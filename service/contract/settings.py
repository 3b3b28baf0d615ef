"""The one settings object of k5serve, read from K5_* environment variables and validated at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.contract import parallel as parallel_layout


def _split(value: Any) -> Any:
    """A comma-separated setting (an environment variable) as its list, parsed once at start-up. Brackets are
    allowed around it, as in upstream's config files; a list passes through."""
    if isinstance(value, str):
        return [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
    return value


# A list setting, written comma-separated in its environment variable.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="K5_", extra="ignore")

    # Gateway bind address.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Public base URL of the gateway, used for links it hands out; derived from host/port when unset.
    public_url: str | None = None

    redis_url: str = "redis://127.0.0.1:6379/0"

    # Where videos go: "s3://bucket/prefix" (any S3-compatible endpoint) or "file:///abs/dir" (one machine).
    storage_url: str = "file://" + str(Path(".k5/data").absolute())
    # Endpoint of an S3-compatible store (SeaweedFS, MinIO, R2...); unset means AWS. Credentials come from the
    # standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles).
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Lifetime of a presigned download URL handed out by /content redirects.
    presign_ttl_s: int = Field(3600, ge=60, le=7 * 86400)
    # How long a worker keeps retrying the upload of a finished video while the object store is away (a
    # restart, a failover), keeping the encoded files, before the job fails with storage_error.
    storage_retry_window_s: float = Field(300.0, ge=0)
    # A local-disk store with less free space than this is full: not ready, and new jobs get 503.
    storage_min_free_mb: int = Field(256, ge=0)
    # How long finished videos are kept; the video object's expires_at is completed_at + this.
    asset_ttl_s: int = Field(7 * 86400, ge=60)

    # What a worker serves: a catalogue id, a hub repo id, or a local diffusers directory.
    model: str | None = None
    # The model a request without `model` goes to; unset means the one text-to-video model that is online.
    default_model: str | None = None
    # Comma-separated model ids the gateway accepts even while no worker for them is online (scale-to-zero).
    served_models: CommaList = []
    # Worker device and weight dtype ("auto": cuda + bfloat16 when available, else cpu + float32).
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Local directory for hub downloads (the model cache volume in Kubernetes).
    hf_cache_dir: str | None = None
    # Upper bound of one job's run time on a worker, after which RQ kills it.
    job_timeout_s: int = Field(3 * 3600, ge=10)
    # Seconds between a worker's liveness heartbeats in Redis; a worker is offline after 3 missed beats.
    heartbeat_s: float = Field(5.0, gt=0)
    # Name of this worker in Redis and logs; defaults to host + pid.
    worker_name: str | None = None

    # Upper bound of an uploaded image (input_reference) in bytes and in pixels (decompression bombs).
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    # Images decoded at once per gateway process (a large PNG costs ~100 MB while it is decoded); past this
    # POST answers 503 with Retry-After.
    max_concurrent_decodes: int = Field(2, ge=1)

    # -- slow and greedy clients (the gateway's HTTP server) ------------------------------------------------
    # A request's header block must arrive within this many seconds of its first byte (or of the connection).
    header_timeout_s: float = Field(10.0, gt=0)
    # And its body within this many seconds of the headers (a 27 MB upload at 1 MB/s takes 27 s).
    body_timeout_s: float = Field(60.0, gt=0)
    # Connections one client address may hold open to one gateway process; 0 = no bound. Behind a proxy that
    # does not pool connections every client shares the proxy's address: raise it or set 0 there.
    max_connections_per_client: int = Field(256, ge=0)

    # Model aliases, "alias=served-id" comma-separated (e.g. "sora-2=kandinsky-5.0-t2v-lite-sft-5s"), so apps
    # written for another OpenAI-compatible provider work unchanged; the video reports the served model's id.
    model_aliases: str = ""

    # -- access (API keys, limits) --------------------------------------------------------------------------
    # Comma-separated bearer tokens; or a file with one per line (a mounted Secret). Kept hashed in memory.
    api_keys: CommaList = []
    api_keys_file: Path | None = None
    # Serve without keys when none are configured (local development only; the gateway says so loudly).
    allow_anonymous: bool = False
    # Per-key request rate (requests per minute to any /v1 route) and jobs queued or running at once.
    rate_limit_per_min: int = Field(600, ge=1)
    max_inflight_per_key: int = Field(16, ge=1)
    # Per-model cap on queued jobs; beyond it new requests get 429.
    max_queue_depth: int = Field(1000, ge=1)
    # The highest lane a key may ask for ("interactive", ahead of "batch"), and the lane of its requests that
    # name none; a key's own entry overrides it ("<key> priority=batch" in K5_API_KEYS or the keys file).
    priority_ceiling: Literal["interactive", "batch"] = "interactive"
    # -- usage (GET /v1/usage, k5_usage_* metrics) ------------------------------------------------------------
    # Days an owner's daily usage totals stay in Redis (and the longest range GET /v1/usage sums).
    usage_retention_days: int = Field(400, ge=1, le=3660)
    # The `key` label of the k5_usage_* metrics, "owner=label" comma-separated (owner: key_ + the first 16 hex
    # of the key's sha256); every other key counts as "other", so the label set is bounded by this list.
    usage_labels: str = ""

    # Event streams (GET /v1/videos/{id}/events): open at once per API key and gateway process, and how long one
    # lasts before the client reconnects (with Last-Event-ID); a comment line keeps idle proxies open meanwhile.
    sse_max_streams_per_key: int = Field(16, ge=1)
    sse_max_lifetime_s: float = Field(600.0, gt=0)
    sse_ping_s: float = Field(15.0, gt=0)
    # -- webhooks -----------------------------------------------------------------------------------------
    # Standard Webhooks signing secret(s), "whsec_<base64>"; several space-separated during a rotation.
    webhook_secret: str | None = None
    # Deployment-wide endpoint that receives every event (in addition to a request's webhook_url).
    webhook_url: str | None = None
    # Comma-separated hosts or CIDRs that webhooks may reach even though they are private (tests, in-cluster).
    webhook_allowed_hosts: CommaList = []
    # Retry schedule: exponential backoff from webhook_retry_base_s, capped, with jitter, for up to this long.
    webhook_retry_base_s: float = Field(5.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    webhook_retry_window_s: float = Field(24 * 3600.0, gt=0)
    # Total deadline of one delivery attempt: connect, send and the response's status line and headers.
    webhook_timeout_s: float = Field(10.0, gt=0)
    # Attempts in flight at once per webhook process, and per endpoint (scheme, host and port): a slow
    # receiver holds at most its own share, never the others' events.
    webhook_concurrency: int = Field(32, ge=1, le=1024)
    webhook_endpoint_concurrency: int = Field(4, ge=1, le=1024)

    # -- workers: recovery and shutdown --------------------------------------------------------------------
    # Attempts of a job whose worker died (SIGKILL, node loss) before it fails with worker_lost.
    max_attempts: int = Field(3, ge=1)
    # On SIGTERM a worker finishes its current job for up to this long, then stops it at a step and requeues it.
    shutdown_grace_s: float = Field(600.0, ge=0)
    # Finished generations a worker encodes and uploads in the background while its next job denoises (the GPU
    # never waits for the CPU); a job finishing while this many are still there waits for one (backpressure).
    # 0 encodes and uploads in line, the GPU idle meanwhile.
    postprocess_jobs: int = Field(1, ge=0, le=2)
    # Kubernetes only: this worker's pod (downward API). When set, the worker keeps the pod's
    # controller.kubernetes.io/pod-deletion-cost annotation high while it holds a job and low while idle, so that
    # a scale-down removes idle pods first. Unset (outside a cluster): nothing is annotated.
    pod_name: str | None = None
    pod_namespace: str | None = None
    # The Kubernetes API server, as pods see it.
    kube_api_url: str = "https://kubernetes.default.svc"
    # A running job saves its denoising state to storage every this many steps (0: only at SIGTERM), and a
    # requeued job resumes from it. 10: a 768x512 save (17-29 MB) every 10 steps costs well under 1% of a
    # 50-step model's time and a few % of the 16-step distilled one's (BENCHMARKS.md, resumable jobs).
    checkpoint_every_steps: int = Field(10, ge=0)
    # Save the denoising state when SIGTERM stops a job (false: a stopped job starts over from step 0).
    checkpoint_on_shutdown: bool = True
    # A checkpoint older than this is refused (the job starts over): a job requeued that late is rare, and the
    # state is the job's data, not to be kept forever.
    checkpoint_ttl_s: int = Field(86400, ge=60)
    # Port of the worker's and webhook process's own HTTP server: /metrics, /healthz, /readyz (0 disables).
    metrics_port: int = Field(9400, ge=0, le=65535)

    # -- worker speed (GPU) --------------------------------------------------------------------------------
    # Attention: "auto" = the fastest kernel that passes on every attention shape of the model (CUDA; "native" on
    # CPU), NABLA's visual self-attention always on flex; or a diffusers backend name to pin (set per worker pool).
    attention_backend: str = "auto"
    # torch.compile of the transformer: "auto" = "full" on CUDA, "off" on CPU; "regional" compiles one block per class.
    compile_transformer: Literal["auto", "full", "regional", "off"] = "auto"
    # Inductor mode; upstream recommends max-autotune-no-cudagraphs for Kandinsky 5.
    compile_mode: str = "max-autotune-no-cudagraphs"
    # Dynamic shapes (upstream's recommendation): all buckets and prompt lengths share compiled graphs.
    compile_dynamic: bool = True
    # torch.compile backend: "inductor" (the GPU's choice); another registered name only to diagnose a compile issue.
    compile_backend: str = "inductor"
    # Persistent Inductor/Triton cache directory (a volume) so a restarted worker skips most compiling.
    compile_cache_dir: str | None = None
    # Text encoders: "auto" = "device" if all weights fit in 60% of GPU memory (Lite), else "offload" (Pro), or "cpu".
    text_encoder_placement: Literal["auto", "device", "offload", "cpu"] = "auto"
    # Recent prompt embeddings kept in device memory (LRU by prompt + max_sequence_length); 0 disables.
    text_cache_size: int = Field(64, ge=0)
    # Qwen token budget of a prompt (diffusers' default; upstream's own pipeline uses 256).
    max_sequence_length: int = Field(512, ge=16, le=1024)
    # Prompt expansion when a request does not choose: "auto" = on (upstream's default) except for the tiny models.
    enhance_prompt: Literal["auto", "on", "off"] = "auto"
    # Upper bound of the tokens prompt expansion may add (upstream: 256).
    enhance_max_new_tokens: int = Field(256, ge=1, le=2048)
    # Expansion's KV cache: "static" (transformers compiles the decoding step on CUDA), "dynamic" (eager generate(),
    # as upstream runs it), "auto" = static on CUDA, dynamic on CPU (uncompiled, static is slower). Same output.
    enhance_cache: Literal["auto", "static", "dynamic"] = "auto"
    # VAE tiled decode: "auto" = when the estimated untiled decode does not fit in the free device memory.
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    # -- sampling: how the transformer is fed (worker/sampling.py). Defaults are upstream's, as the checkpoints were
    # trained; "diffusers" / "model" are diffusers 0.42.1's pipeline behaviour.
    # Sigma grid: "upstream" = shift*s/(1+(shift-1)*s), s = linspace(1, 0, N+1)[:-1]; "diffusers" = the scheduler's.
    sampling_grid: Literal["upstream", "diffusers"] = "upstream"
    # The timestep at the time embedding: "float32" (upstream) or "model" (cast to the weights' dtype, e.g. bf16).
    timestep_precision: Literal["float32", "model"] = "float32"
    # Qwen prompt template: "upstream" (the training text, "promt engineer", crop 129) or "diffusers" (128).
    prompt_template: Literal["upstream", "diffusers"] = "upstream"
    # Step caching, lossy and off by default: "taylorseer" or "magcache" (ratios from the model or the setting below).
    step_cache: Literal["off", "taylorseer", "magcache"] = "off"
    # MagCache's accumulated-error threshold; unset = the model's (the catalogue ships upstream's 0.12).
    step_cache_threshold: float | None = Field(None, gt=0)
    # TaylorSeer: full computation every this many steps.
    step_cache_interval: int = Field(5, ge=1)
    # MagCache ratios, comma-separated cond/uncond pairs as in upstream's configs (magcache.mag_ratios); unset = the
    # model's own (the catalogue ships upstream's for the 50-step checkpoints).
    step_cache_mag_ratios: Annotated[list[float], NoDecode, BeforeValidator(_split)] = []
    # One video on several GPUs of the node (service/contract/parallel.py): "cfg=2", "sp=4", "cfg=2,sp=4"; "none" = one.
    parallel: str = "none"

    log_level: str = "INFO"
    # "json" for one JSON object per line (production), "text" for people.
    log_format: Literal["json", "text"] = "text"

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError("s3 storage URL needs a bucket: s3://bucket/prefix")
        elif parsed.scheme == "file":
            if not parsed.path.startswith("/"):
                raise ValueError("file storage URL needs an absolute path: file:///abs/dir")
        else:
            raise ValueError("storage URL must be s3://bucket/prefix or file:///abs/dir")
        return v

    @field_validator("parallel")
    @classmethod
    def _check_parallel(cls, v: str) -> str:
        return parallel_layout.parse(v).describe()  # the canonical form; a bad one fails at start-up

    @property
    def layout(self) -> parallel_layout.Layout:
        return parallel_layout.parse(self.parallel)

    @field_validator("model_aliases")
    @classmethod
    def _check_aliases(cls, v: str) -> str:
        for pair in filter(None, (p.strip() for p in v.split(","))):
            alias, sep, target = pair.partition("=")
            if not sep or not alias.strip() or not target.strip():
                raise ValueError(f"model alias {pair!r} must be alias=model-id")
        return v

    @field_validator("usage_labels")
    @classmethod
    def _check_usage_labels(cls, v: str) -> str:
        for pair in filter(None, (p.strip() for p in v.split(","))):
            owner, sep, label = (part.strip() for part in pair.partition("="))
            if not sep or not owner or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", label):
                raise ValueError(f"usage label {pair!r} must be owner=label (label: 1-64 of A-Z a-z 0-9 _ . -)")
        return v

    @property
    def tenant_labels(self) -> dict[str, str]:
        pairs = (p.partition("=") for p in self.usage_labels.split(",") if p.strip())
        return {owner.strip(): label.strip() for owner, _, label in pairs}

    @property
    def aliases(self) -> dict[str, str]:
        pairs = (p.partition("=") for p in self.model_aliases.split(",") if p.strip())
        return {alias.strip(): target.strip() for alias, _, target in pairs}

    @property
    def served_model_ids(self) -> list[str]:
        return self.served_models

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")
