"""`overnight.yaml`: the one place configuration is defined, validated and documented.

Every key has a default, so an empty file is a working config (SQLite, local MLflow, the local vLLM
server). Environment variables `OVERNIGHT_<SECTION>__<KEY>` override the file (list items by index:
`OVERNIGHT_TRACKS__0__NAME`). Unknown keys and wrong types are errors that name the file and key:
a typo in a nightly job's config must fail loudly at load time, not silently use a default.
Components never receive this model whole; callers pass them the plain values they need.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from storage.errors import UserError

ENV_PREFIX = "OVERNIGHT_"
DEFAULT_CONFIG = "overnight.yaml"
TRACK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SectionT = TypeVar("SectionT", bound=BaseModel)
TOP_LEVEL_ENV = {"OVERNIGHT_HOME"}  # top-level scalar keys overridable without a section


class ConfigError(UserError):
    """The config file is missing, unreadable or invalid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DatabaseConfig(Section):
    url: str = "sqlite:///.overnight/overnight.db"  # SQLAlchemy URL; PostgreSQL as postgresql+psycopg://
    batch_size: int = Field(default=1000, ge=1, le=100_000)  # rows per insert batch and per streamed fetch
    echo: bool = False  # log every SQL statement (debugging)


class ExternalSource(Section):
    """Harvest from another database: a query with :since/:until binds and a column mapping."""

    url: str  # SQLAlchemy URL of the source database
    query: str  # SELECT ... WHERE <ts column> > :since AND <ts column> <= :until
    columns: dict[str, str] = Field(
        default_factory=dict
    )  # record field -> source column (default: same name)

    @field_validator("query")
    @classmethod
    def _query_binds_window(cls, value: str) -> str:
        if ":since" not in value or ":until" not in value:
            raise ValueError("query must use both :since and :until binds")
        return value


class HarvestConfig(Section):
    max_rows_per_user: int = Field(default=50, ge=1)  # cap per user per night, so heavy users do not dominate
    max_chars: int = Field(default=8000, ge=1)  # drop interactions whose prompt+response text is longer
    redact_pii: bool = True  # replace emails, phones, cards, IBANs, IPs and secrets by typed placeholders
    dedup_prompts: bool = (
        True  # keep the first of prompts equal after normalisation (case, spaces, punctuation)
    )
    source: ExternalSource | None = None  # harvest from another database instead of the interaction store


class TrackFilter(Section):
    # only interactions served by these models (empty: any); `support` also matches its pinned
    # versions `support@v<N>`, the name the gateway logs as the one that answered
    models: list[str] = Field(default_factory=list)
    metadata: dict[str, str | int | bool] = Field(
        default_factory=dict
    )  # only interactions whose metadata matches


class LoraConfig(Section):
    rank: int = Field(default=8, ge=1, le=256)  # LoRA rank r
    alpha: int = Field(default=16, ge=1)  # LoRA scaling alpha
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # dropout on the LoRA input
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TeacherConfig(Section):
    """The model a `distill` track learns from: a local model scored in-process beside the student
    (`path`), or an OpenAI-compatible endpoint that returns prompt log-probabilities (`base_url` and
    `model`; vLLM's `prompt_logprobs`). Either way it must share the track's base model's tokenizer."""

    # a local model directory (relative to the config file) or a Hugging Face id
    path: str | None = Field(default=None, min_length=1)
    base_url: str | None = Field(default=None, min_length=1)  # e.g. http://big-model:8000/v1
    model: str | None = Field(default=None, min_length=1)  # the served model's name at base_url
    api_key: SecretStr | None = None  # sent as a Bearer token; never logged
    timeout_seconds: float = Field(default=60.0, gt=0)  # per request (one request per training step)
    max_retries: int = Field(default=4, ge=0)  # retries with exponential backoff, as the judge's
    # An endpoint's log-probabilities per reply token: the token sampled and the teacher's `top_logprobs`
    # likeliest (vLLM's prompt_logprobs; its server gives at most --max-logprobs, 20 by default). The
    # loss is the reverse KL on that support plus one bucket for the rest; 0: on the sampled token only.
    top_logprobs: int = Field(default=20, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_teacher(self) -> TeacherConfig:
        if (self.path is None) == (self.base_url is None):
            raise ValueError(
                "train.teacher needs either path (a local model) or base_url and model (an endpoint), "
                "not both"
            )
        if self.base_url is not None and self.model is None:
            raise ValueError("train.teacher.base_url needs train.teacher.model (the served model's name)")
        return self

    @property
    def where(self) -> str:
        """The teacher as a message names it."""
        if self.path is not None:
            return f"train.teacher.path {self.path!r}"
        return f"teacher {self.model} at {self.base_url}"


class TrainConfig(Section):
    # grpo: RL on the track's reward (judge, graders, reward model); kto: thumbs as desirable and
    # undesirable replies; dpo: preference pairs (two replies to one prompt, from the logs or from
    # the champion's samples ranked by the reward); sft: best-rated replies (rejection sampling);
    # distill: on-policy distillation, the teacher grading every token of the student's own replies.
    method: Literal["grpo", "kto", "dpo", "sft", "distill"] = "grpo"
    max_steps: int = Field(default=40, ge=1)  # optimisation steps at most
    max_wall_seconds: float = Field(default=900.0, gt=0)  # wall-clock budget for the whole update
    kl_budget: float = Field(default=0.1, gt=0)  # stop early when the rolling KL to the champion exceeds this
    learning_rate: float = Field(default=5e-5, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)  # gradient clipping
    beta: float = Field(default=0.04, ge=0)  # KL penalty coefficient in the GRPO loss
    num_generations: int = Field(default=4, ge=2)  # completions per prompt (the GRPO group)
    prompts_per_step: int = Field(default=4, ge=1)  # prompts in one optimisation step
    max_prompts: int = Field(default=256, ge=1)  # training prompts selected per night
    epochs: int = Field(default=1, ge=1, le=20)  # passes over the night's training prompts
    max_completion_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0)  # sampling temperature during training rollouts
    heldout_fraction: float = Field(default=0.2, gt=0, lt=1)  # share of selected prompts kept for the gate
    seed: int = 0
    lora: LoraConfig = LoraConfig()
    # KTO, DPO and SFT. A reply's score is the user's feedback (thumb, rating) when it has some, else
    # the track's reward; desirable at or above `desirable_score`, undesirable at or below
    # `undesirable_score`, neither in between (a thumb up with a rating of 1 is 0.5: ambiguous).
    preference_beta: float = Field(
        default=0.1, gt=0
    )  # DPO's and KTO's beta: strength of the pull to the reference
    min_examples: int = Field(default=8, ge=1)  # fewer examples (pairs for DPO) and the night is skipped
    desirable_score: float = Field(default=0.75, ge=0, le=1)
    undesirable_score: float = Field(default=0.25, ge=0, le=1)
    pair_margin: float = Field(default=0.25, gt=0, le=1)  # DPO: chosen must outscore rejected by this much
    # KTO, DPO and SFT also sample `num_generations` replies per prompt from the champion and rank them
    # by the track's reward (on-policy labels and pairs, rejection sampling); false: logged replies only.
    on_policy: bool = True
    # distill: the teacher, and the divergence: 1 the reverse KL of on-policy distillation (the student
    # pulled to what the teacher would say where the student goes), 0 the forward KL, between: JSD.
    teacher: TeacherConfig | None = None
    distill_beta: float = Field(default=1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _scores_ordered(self) -> TrainConfig:
        if self.method == "distill" and self.teacher is None:
            raise ValueError(
                "train.method distill needs train.teacher (a path, or a base_url and model: the model to learn from)"
            )
        if self.method == "kto" and self.prompts_per_step < 2:
            raise ValueError("kto needs prompts_per_step >= 2 (its KL term pairs examples within a step)")
        if self.undesirable_score >= self.desirable_score:
            raise ValueError(
                f"undesirable_score ({self.undesirable_score}) must be below desirable_score "
                f"({self.desirable_score})"
            )
        return self


class GateConfig(Section):
    tolerance: float = Field(default=0.02, ge=0)  # non-inferiority margin on every suite (score scale 0..1)
    safety_tolerance: float = Field(
        default=0.0, ge=0
    )  # margin on suites tagged `safety` (zero: no regression)
    min_gain: float = 0.0  # lower CI bound of held-out judged reward gain must exceed this
    max_kl_to_base: float = Field(default=0.5, gt=0)  # KL of the candidate to the base model on the probe set
    confidence: float = Field(default=0.95, gt=0.5, lt=1)  # two-sided confidence level of the intervals
    bootstrap_samples: int = Field(default=2000, ge=100)  # paired bootstrap resamples
    seed: int = 0
    temperature: float = Field(default=0.0, ge=0)  # decoding of suite and held-out replies; 0: greedy
    # temperature > 0: replies sampled per suite case and held-out prompt, each case scored by their
    # mean (a sampled reply is right or wrong by chance; the mean of several resolves small gains)
    samples: int = Field(default=1, ge=1, le=64)
    max_new_tokens: int = Field(default=64, ge=1)  # reply length for suite cases and held-out prompts
    false_alarm_rate: float = Field(
        default=0.05, gt=0, lt=0.5
    )  # sampled replies (temperature > 0): widen suite margins so an unchanged model fails any suite this rarely
    memory_cap: int = Field(default=200, ge=0)  # cases kept in a track's memory suite (0: no memory suite)
    memory_min_reward: float = Field(default=0.7, ge=0, le=1)  # judged reward an interaction needs to be kept
    # Guards against reward hacking (`evals.guard`). A held-out gain must be confirmed by the suites
    # named here (None: all the track's suites; []: no confirmation, for a track without any).
    confirm_with: list[str] | None = None
    confirm_confidence: float = Field(default=0.8, gt=0.5, lt=1)  # level of the confirmation interval
    max_repetition: float = Field(default=0.2, ge=0, le=1)  # share of repeated word 3-grams in a reply
    min_distinct_ratio: float = Field(default=0.7, ge=0, le=1)  # distinct 3-grams vs the champion's
    max_identical_share: float = Field(default=0.2, ge=0, le=1)  # replies shared with another prompt
    max_length_ratio: float = Field(default=1.5, gt=1)  # mean reply length vs the champion's


class RewardModelConfig(Section):
    """The reward model a track learns from its users' scores (`reward.reward_model` > 0 uses it)."""

    min_agreement: float = Field(default=0.7, ge=0, le=1)  # held-out thumbs it must call right to be used
    min_examples: int = Field(default=32, ge=2)  # rated replies to train on, at least
    min_heldout: int = Field(default=8, ge=1)  # rated replies to measure its agreement on, at least
    heldout_fraction: float = Field(default=0.25, gt=0, lt=1)  # share of rated prompts kept to measure it
    max_steps: int = Field(default=200, ge=1)
    epochs: float = Field(default=3.0, gt=0)  # passes over the rated replies (capped by max_steps)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    max_length: int = Field(default=512, ge=8)  # tokens of prompt and reply, truncated
    # Earlier nights whose rated replies it learns from too (their training prompts, never a prompt
    # tonight's gate holds out): a night's feedback is little, the track's history is not.
    history_nights: int = Field(default=6, ge=0)


class RewardConfig(Section):
    """How a night's reward is blended: the LLM judge, user feedback, a reward model and graders."""

    judge: float = Field(default=1.0, ge=0)  # weight of the LLM judge's score
    feedback: float = Field(default=0.0, ge=0)  # weight of user feedback (thumb, rating) where present
    # weight of the track's reward model, fitted each night to its users' scores (`reward_model`)
    reward_model: float = Field(default=0.0, ge=0)
    graders: list[dict[str, Any]] = Field(default_factory=list)  # grader specs, each with a `weight`

    @field_validator("graders")
    @classmethod
    def _graders_build(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from evals.graders import weighted_grader

        for index, spec in enumerate(value):
            try:
                weighted_grader(spec)
            except UserError as error:
                raise ValueError(f"graders.{index}: {error}") from None
        return value


class TrackConfig(Section):
    name: str  # the stable serving name clients call
    description: str = ""
    base_model: str | None = None  # defaults to serving.base_model
    filter: TrackFilter = TrackFilter()
    rubric: str = "helpfulness"  # judge rubric id (shipped: helpfulness, correctness, safety, concision)
    suites: list[str] = Field(default_factory=list)  # regression suites: shipped names or JSONL paths
    reward: RewardConfig = RewardConfig()
    harvest: HarvestConfig = HarvestConfig()
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the top-level `train` section
    gate: dict[str, Any] = Field(default_factory=dict)  # overrides of the top-level `gate` section

    @field_validator("name")
    @classmethod
    def _name_is_servable(cls, value: str) -> str:
        if not TRACK_NAME.match(value):
            raise ValueError(
                "must be 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
            )
        return value


class JudgeConfig(Section):
    base_url: str | None = None  # OpenAI-compatible endpoint; None: the first serving endpoint
    model: str | None = None  # judge model name; None: the served base model
    api_key: SecretStr | None = None  # sent as a Bearer token; never logged
    concurrency: int = Field(default=8, ge=1, le=256)  # requests in flight at once
    timeout_seconds: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0)  # retries with exponential backoff and jitter
    # judged items per track per night at most, over the judge, train and gate stages (cache hits are free)
    budget_items: int = Field(default=5000, ge=1)
    # rows of tonight's snapshot the judge stage scores at most (None: up to the budget), so that
    # budget is left for the training rewards and the gate; rows over it keep their other reward parts
    stage_items: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=512, ge=1)  # tokens the judge may write (rationale + score)
    swap_orders: bool = False  # group mode: score two candidate orders and average (cancels position bias)
    # compact: a ~100-token prompt (same fences, score-only answer) for small judges trained on the
    # rubric; the rubric's criteria text is not shown, only its title and scale
    prompt: Literal["full", "compact"] = "full"


class MlflowConfig(Section):
    tracking_uri: str = (
        "sqlite:///.overnight/mlflow.db"  # local store by default; an http:// server in production
    )
    registry_uri: str | None = None  # defaults to the tracking URI
    artifact_location: str = ".overnight/mlartifacts"  # where local runs store artifacts
    experiment_prefix: str = "overnight-"  # experiment per track: <prefix><track>
    model_prefix: str = "overnight-"  # registered model per track: <prefix><track>


class ServingConfig(Section):
    base_model: str = ".overnight/tiny-model"  # HF model id or local path served by vLLM
    base_name: str = "base"  # the name the base model is served under
    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"])  # every vLLM server
    host: str = "127.0.0.1"  # where `overnight serve` binds
    port: int = Field(default=8000, ge=1, le=65535)
    max_loras: int = Field(default=4, ge=1)  # adapters resident at once
    keep_versions: int = Field(
        default=2, ge=2
    )  # pinned `<track>@v<N>` names kept loaded per track (the previous champion stays for instant rollback)
    # an older pinned version is unloaded only this long after the route's last flip took it off the
    # stable name: longer than a gateway takes to see a flip and send what it resolved before it
    unload_grace_seconds: float = Field(default=60.0, ge=0)
    max_lora_rank: int = Field(default=8, ge=1)
    max_model_len: int = Field(default=4096, ge=16)  # the judge prompt (rubric + conversation) must fit
    dtype: str = "auto"  # float32 on CPU
    extra_args: list[str] = Field(default_factory=list)  # passed to vLLM as they are
    startup_timeout_seconds: float = Field(default=300.0, gt=0)
    request_timeout_seconds: float = Field(default=60.0, gt=0)
    api_key: SecretStr | None = None  # if the vLLM servers require one


class GatewayConfig(Section):
    """The OpenAI-compatible gateway in front of the vLLM endpoints (`pipeline.deploy.gateway`)."""

    host: str = "127.0.0.1"  # where the gateway binds; clients call it instead of vLLM
    port: int = Field(default=8080, ge=1, le=65535)
    # Bearer API keys required; false (the embedded, one-machine default): anyone who reaches the port
    # may call every track, and a key sent anyway still applies its tracks and defaults
    require_keys: bool = False
    # false: exchanges without consent are served but never stored (a key's `--no-store` does this
    # for its own traffic); true: stored with consent false, which harvest never takes
    store_without_consent: bool = True
    queue_size: int = Field(default=10_000, ge=1)  # exchanges waiting for the log writer; past it: the spool
    batch_size: int = Field(default=200, ge=1, le=100_000)  # exchanges per store write
    # an exchange waits at most this long to be written; also how often an unreachable store is retried
    flush_seconds: float = Field(default=0.5, gt=0)
    # fsync'd JSONL of exchanges the store could not take, replayed in order; one gateway process each
    spool_dir: str = ".overnight/gateway-spool"
    route_refresh_seconds: float = Field(default=0.5, gt=0)  # how stale a process's view of the routes may be
    key_cache_seconds: float = Field(default=5.0, ge=0)  # how long a key lookup (or revocation) is cached
    health_interval_seconds: float = Field(default=2.0, gt=0)  # `GET /health` of every endpoint this often
    upstream_timeout_seconds: float = Field(default=300.0, gt=0)  # longest wait for a byte from vLLM
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)  # larger request bodies get 413


class ScheduleConfig(Section):
    cron: str = "0 2 * * *"  # when the nightly flow runs
    timezone: str = "UTC"
    deployment_name: str = "overnight-nightly"
    work_pool: str | None = None  # Prefect work pool; None: served by `overnight schedule` itself
    lease_seconds: float = Field(
        default=60.0, gt=0
    )  # a night's runner renews its lease; a killed one's expires


class PrivacyConfig(Section):
    # key of the user-id pseudonyms in training data (16+ characters); None: generated on first use and
    # kept in <home>/secrets/pseudonym.key (owner-only). Changing it changes every pseudonym.
    pseudonym_key: SecretStr | None = None


class OvernightConfig(Section):
    home: str = ".overnight"  # where overnight keeps files: snapshots, adapters, reports
    database: DatabaseConfig = DatabaseConfig()
    tracks: list[TrackConfig] = Field(default_factory=list)
    judge: JudgeConfig = JudgeConfig()
    train: TrainConfig = TrainConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    gate: GateConfig = GateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    serving: ServingConfig = ServingConfig()
    gateway: GatewayConfig = GatewayConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _tracks_are_unique_and_overrides_valid(self) -> OvernightConfig:
        names = [track.name for track in self.tracks]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"tracks: names must be unique, repeated: {', '.join(duplicated)}")
        for index, track in enumerate(self.tracks):
            for section, defaults in (("train", self.train), ("gate", self.gate)):
                try:
                    _merged(defaults, getattr(track, section))
                except ValidationError as error:
                    raise ValueError(f"tracks.{index}.{section}.{_describe(error)}") from None
        return self

    def track(self, name: str) -> TrackConfig:
        for track in self.tracks:
            if track.name == name:
                return track
        known = ", ".join(t.name for t in self.tracks) or "none configured"
        raise ConfigError(f"unknown track {name!r} (tracks: {known})")

    def train_for(self, name: str) -> TrainConfig:
        """The top-level `train` section with the track's overrides applied."""
        return _merged(self.train, self.track(name).train)

    def gate_for(self, name: str) -> GateConfig:
        return _merged(self.gate, self.track(name).gate)

    def base_model_for(self, name: str) -> str:
        return self.track(name).base_model or self.serving.base_model

    def snapshot_dir(self) -> Path:
        return Path(self.home) / "snapshots"

    def pseudonym_key_text(self) -> str | None:
        key = self.privacy.pseudonym_key
        return key.get_secret_value() if key else None


def _merged(defaults: SectionT, overrides: Mapping[str, Any]) -> SectionT:
    return type(defaults).model_validate(_deep_merge(defaults.model_dump(), overrides))


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def starter_config_text() -> str:
    """The commented starter that `overnight init` writes."""
    return (Path(__file__).parent / "assets" / "overnight.yaml").read_text(encoding="utf-8")


def load_config(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None
) -> OvernightConfig:
    """Read, override from the environment and validate; raises `ConfigError` with one line.

    `path=None` means `./overnight.yaml` when it exists and the defaults otherwise; a path given
    explicitly must exist.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None
    file = Path(path if path is not None else DEFAULT_CONFIG)
    data = _read_yaml(file) if explicit or file.exists() else {}
    data, overridden = apply_env_overrides(data, environ)
    try:
        config = OvernightConfig.model_validate(data)
    except ValidationError as error:
        loc = ".".join(str(part) for part in error.errors()[0]["loc"])
        origin = next((f" (from {name})" for path, name in overridden.items() if path == loc), "")
        raise ConfigError(f"{file}: {_describe(error)}{origin}") from None
    if explicit or file.exists():
        return resolve_relative_paths(config, file.resolve().parent, keep=set(overridden))
    return config


def resolve_relative_paths(
    config: OvernightConfig, base: Path, *, keep: Set[str] = frozenset()
) -> OvernightConfig:
    """Relative paths of a config file made absolute against the file's directory `base`.

    Covers `home`, the gateway's spool directory, SQLite URLs (`sqlite:///relative.db`), MLflow's URIs
    and artifact location, local model directories (those that exist, or written `./dir` when not built
    yet), suite files and rubric files. HF model ids (`org/name`) and absolute paths are left as they
    are; so are the dotted keys in `keep` (set from the environment: relative to the working directory,
    where the variable was set).
    """

    def path(value: str) -> str:
        value = str(Path(value).expanduser()) if value.startswith("~") else value
        return value if Path(value).is_absolute() or "://" in value else str(base / value)

    def url(value: str) -> str:
        prefix, sep, rest = value.partition(":///")
        if (
            not sep
            or rest.startswith("/")
            or not rest
            or rest == ":memory:"
            or not prefix.startswith("sqlite")
        ):
            return value
        return f"{prefix}:///{base / rest}"

    def model(value: str | None) -> str | None:
        if value is None:
            return value
        value = str(Path(value).expanduser()) if value.startswith("~") else value
        if Path(value).is_absolute():
            return value
        local = value.startswith(".") or (base / value).exists()
        return str(base / value) if local else value

    def file_or_name(value: str) -> str:
        return path(value) if Path(value).suffix in {".jsonl", ".md", ".json"} else value

    def pick(key: str, value: Any, resolve: Any) -> Any:
        return value if key in keep else resolve(value)

    def train_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
        teacher = overrides.get("teacher")
        if isinstance(teacher, Mapping) and isinstance(teacher.get("path"), str):
            return {**overrides, "teacher": {**teacher, "path": model(teacher["path"])}}
        return overrides

    mlflow = config.mlflow
    train = config.train
    if train.teacher is not None and "train.teacher.path" not in keep:
        train = train.model_copy(
            update={"teacher": train.teacher.model_copy(update={"path": model(train.teacher.path)})}
        )
    tracks = [
        track.model_copy(
            update={
                "train": train_overrides(track.train),
                "base_model": model(track.base_model),
                "suites": [file_or_name(suite) for suite in track.suites],
                "rubric": file_or_name(track.rubric),
            }
        )
        for track in config.tracks
    ]
    return config.model_copy(
        update={
            "home": pick("home", config.home, path),
            "database": config.database.model_copy(
                update={"url": pick("database.url", config.database.url, url)}
            ),
            "mlflow": mlflow.model_copy(
                update={
                    "tracking_uri": pick("mlflow.tracking_uri", mlflow.tracking_uri, url),
                    "registry_uri": mlflow.registry_uri
                    and pick("mlflow.registry_uri", mlflow.registry_uri, url),
                    "artifact_location": pick("mlflow.artifact_location", mlflow.artifact_location, path),
                }
            ),
            "serving": config.serving.model_copy(
                update={"base_model": pick("serving.base_model", config.serving.base_model, model)}
            ),
            "gateway": config.gateway.model_copy(
                update={"spool_dir": pick("gateway.spool_dir", config.gateway.spool_dir, path)}
            ),
            "tracks": tracks,
            "train": train,
        }
    )


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found (create one with `overnight init`)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file}: cannot read: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_env_overrides(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply `OVERNIGHT_<SECTION>__<KEY>=value` (values parsed as YAML) onto the file's data.

    Returns the merged data and which dotted key each variable set.
    """
    merged = _deep_merge({}, data)
    overridden: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or ("__" not in name and name not in TOP_LEVEL_ENV):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if any(not part for part in path):
            raise ConfigError(f"{name}: malformed override name (use OVERNIGHT_<SECTION>__<KEY>)")
        _set_path(merged, path, _parse_env_value(environ[name]), name)
        overridden[".".join(path)] = name
    return merged, overridden


def _parse_env_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def _set_path(data: dict[str, Any], path: list[str], value: Any, name: str) -> None:
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{name}: no list item {part!r} at {'.'.join(path[:depth]) or 'top level'}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif "input" in first and first["type"].endswith(("_type", "_parsing")):
        message = f"{message} (got {first['input']!r})"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {message}{suffix}" if where else f"{message}{suffix}"
