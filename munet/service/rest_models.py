"""The HTTP API's request and response bodies (pydantic), so /docs.json is a real schema and a request
is checked field by field. Responses carry the core's views as they are (plain strings for policies,
states and outcomes; RFC 3339 times), the same values the gRPC messages carry as enums and Timestamps.
Parameters' defaults and descriptions come from the table of operations (`semantics.py`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from munet.service.semantics import default, rule


def _param(rpc: str, name: str, **kw: Any) -> Any:
    """A field whose default and description are the table's."""
    return Field(default(rpc, name), description=rule(rpc, name), **kw)


def _required(rpc: str, name: str, **kw: Any) -> Any:
    return Field(description=rule(rpc, name), **kw)


# the proto's uint32 fields: a larger number is refused here, as protobuf refuses it
UINT32 = {"ge": 0, "le": 2**32 - 1}


class Strict(BaseModel):
    # a misspelt field ("image" for "images") is refused, not silently ignored
    model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
    """Every error: a gRPC status name and a message, with the matching HTTP status."""

    code: str = Field(description="NOT_FOUND (404), INVALID_ARGUMENT (400, or 413 for a body over the limit), "
                                  "ALREADY_EXISTS (409), FAILED_PRECONDITION (412), UNAUTHENTICATED (401), "
                                  "PERMISSION_DENIED (403), RESOURCE_EXHAUSTED (429), UNIMPLEMENTED (405: a "
                                  "route's wrong method), INTERNAL (500), UNAVAILABLE (503)")
    message: str


# ---- Predict ------------------------------------------------------------------------------------

# numpy's names; read little-endian whatever the server's byte order
Dtype = Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32",
                "float64"]


class Tensor(Strict):
    """Raw pixels with an explicit type: rank 2 is one grey image (H, W), rank 3 one image (H, W, C) with
    C = 1, 3 or 4, rank 4 a batch (N, H, W, C). Values are pixels, integers in 0..255, whatever the
    dtype: a float tensor holding anything else is refused, never rounded or cut."""

    dtype: Dtype
    shape: list[int] = Field(description="the dimensions, outermost first (row-major)")
    data: str = Field(description="base64 of the raw bytes, little-endian, row-major (C order)")


class PredictRequest(Strict):
    task: str = _required("Predict", "task")
    images: list[str] = Field([], description="image files (PNG, JPEG, anything Pillow reads), base64")
    arrays: list[Any] = Field([], description="one image per item, as nested lists of 0..255 pixels: (H, W) "
                                              "grey or (H, W, C) with C = 1, 3 or 4")
    tensor: Tensor | None = Field(None, description="raw pixels with their dtype and shape (rank 2, 3 or 4)")
    top_k: int = _param("Predict", "top_k", **UINT32)
    version: int = _param("Predict", "version", **UINT32)


class PredictUpload(Strict):
    """multipart/form-data: the image files (field `files`, repeated, or `file`) and the parameters."""

    task: str = _required("Predict", "task")
    files: list[bytes] = Field(description="image files (PNG, JPEG, anything Pillow reads), one part each")
    top_k: int = _param("Predict", "top_k", **UINT32)
    version: int = _param("Predict", "version", **UINT32)


class LabelScore(BaseModel):
    label: str
    index: int = Field(description="index into the task's labels")
    probability: float


class PredictResponse(BaseModel):
    task: str
    path_version: int = Field(description="the path version that answered")
    predictions: list[list[LabelScore]] = Field(description="per image, its top_k labels, best first")


# ---- tasks --------------------------------------------------------------------------------------


class EvolutionSettings(Strict):
    """A task's own evolution settings; 0 in a field = the server's configured value."""

    candidates_per_generation: int = Field(0, **UINT32)
    candidate_budget_seconds: float = Field(0.0, ge=0)
    scale_base: float = Field(0.0, ge=0, description="score = accuracy * scale_base ** (accounted params / root "
                                                     "params), in (0, 1]; 1 ignores size")

    def store_settings(self) -> dict:
        """The store's names for them (Config fields), as the gRPC servicer hands them to the core."""
        return {"candidates_per_generation": self.candidates_per_generation,
                "candidate_budget_s": self.candidate_budget_seconds, "scale_base": self.scale_base}


class RegisterRequest(Strict):
    name: str = _required("RegisterTask", "name")
    labels: list[str] = _param("RegisterTask", "labels")
    builtin: str | None = _param("RegisterTask", "builtin")
    npz_file: str | None = _param("RegisterTask", "npz_file")
    max_examples: int = _param("RegisterTask", "max_examples", **UINT32)
    validation_fraction: float = _param("RegisterTask", "validation_fraction")
    test_fraction: float = _param("RegisterTask", "test_fraction")
    seed: int = _param("RegisterTask", "seed", **UINT32)
    root: str = _param("RegisterTask", "root")
    policy: str = _param("RegisterTask", "policy")
    evolution: EvolutionSettings | None = _param("RegisterTask", "evolution")


class RegisterUpload(RegisterRequest):
    """multipart/form-data: the fields of a JSON registration (`labels` repeated, `evolution` a JSON object)
    and `file`, an .npz with x (N, H, W[, C]) uint8 images, y (N,) labels, optional label_names and split."""

    file: bytes = Field(description="the .npz file")


class ExamplesUpload(Strict):
    """multipart/form-data: `file`, an .npz with x (N, H, W[, C]) uint8 images, y (N,) labels and an optional
    split (0 train, 1 validation, 2 test; otherwise the server assigns train or validation)."""

    file: bytes = Field(description="the .npz file")


class ExamplesAdded(BaseModel):
    task: str
    added: int
    train: int
    validation: int
    test: int
    total_examples: int = Field(description="the task's examples in all, after this call")


class ModuleInfo(BaseModel):
    id: str = Field(description="content hash of kind, config and weights")
    kind: str
    params: int
    shared_by: int = Field(description="tasks whose current path uses it")
    frozen: bool


class PathVersion(BaseModel):
    version: int
    modules: list[ModuleInfo]
    validation_accuracy: float
    test_accuracy: float
    score: float
    params: int
    accounted_params: int = Field(description="parameters, each module's divided by the tasks that share it")
    added_params: int
    parents: list[int]
    parent_task: str
    mutations: list[str]
    hyperparameters: dict[str, Any]
    training_seconds: float
    created_at: str = Field(description="RFC 3339")
    status: str = Field(description="current, retired, candidate, pending, failed or rejected")
    training_steps: int
    training_examples: int
    decision: str
    note: str


class ShadowStats(BaseModel):
    """A pending version answering a sample of live requests beside the served one."""

    version: int
    requests: int
    images: int
    agreement: float
    dropped: int
    labelled_examples: int
    accuracy: float
    incumbent_accuracy: float


class Task(BaseModel):
    name: str
    labels: list[str]
    status: str = Field(description="creating or serving")
    current_version: int = Field(description="the version that serves (0 while the task is being created)")
    path: PathVersion | None
    train_examples: int
    validation_examples: int
    test_examples: int
    source: str
    created_at: str = Field(description="RFC 3339")
    lineage: list[PathVersion] = Field(description="oldest first: how the current path came to be")
    root: str
    image_size: int
    policy: str = Field(description="auto, approve or frozen")
    evolution: EvolutionSettings
    pending_versions: list[int]
    shadow: ShadowStats | None


class Deleted(BaseModel):
    name: str


class Versions(BaseModel):
    task: str
    current_version: int
    versions: list[PathVersion] = Field(description="every kept version, oldest first")


class RollbackRequest(Strict):
    version: int = _param("Rollback", "version", **UINT32)
    policy: str = _param("Rollback", "policy")


class PolicyRequest(Strict):
    policy: str = _param("SetTaskPolicy", "policy")
    evolution: EvolutionSettings | None = _param("SetTaskPolicy", "evolution")


class PromoteRequest(Strict):
    version: int = _required("Promote", "version", **UINT32)


class RejectRequest(Strict):
    version: int = _required("Reject", "version", **UINT32)
    reason: str = _param("Reject", "reason")


class TaskEvent(BaseModel):
    id: int = Field(description="increasing; pass the last one seen as after_id to poll for more")
    task: str
    kind: str = Field(description="registered, generation_started, generation_finished, pending, promoted, "
                                  "rolled_back, rejected, failed, policy_changed or deleted")
    version: int = Field(description="the path version it concerns (0: none)")
    detail: dict[str, Any]
    at: str = Field(description="RFC 3339")


# ---- evolution ----------------------------------------------------------------------------------


class EvolveRequest(Strict):
    task: str = _param("TriggerEvolution", "task")
    candidates: int = _param("TriggerEvolution", "candidates", **UINT32)
    budget_seconds: float = _param("TriggerEvolution", "budget_seconds")
    wait: bool = _param("TriggerEvolution", "wait")


class GenerationReport(BaseModel):
    task: str
    generation: int
    candidates: int
    examples_processed: int
    best_score: float
    incumbent_score: float
    promoted: bool
    promoted_version: int
    pending_version: int
    outcome: str = Field(description="promoted, pending, failed, superseded, or empty: nothing beat the "
                                     "incumbent by the margin")
    error: str
    started_at: str = Field(description="RFC 3339")
    seconds: float


class EvolutionStatus(BaseModel):
    running: bool
    current_task: str = Field(description="the task being evolved (empty when none)")
    candidates_done: int
    candidates_total: int
    paused_for_load: bool
    generations: int
    recent: list[GenerationReport] = Field(description="the latest generations' reports, oldest first")
    scheduler_enabled: bool
    interval_seconds: float
    leading: bool = Field(False, description="whether this server holds the evolution lease (evolves)")
    triggered: GenerationReport | None = Field(None, description="the generation this call ran, when it waited")
