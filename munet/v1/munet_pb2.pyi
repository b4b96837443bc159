import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Split(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_UNSPECIFIED: _ClassVar[Split]
    SPLIT_TRAIN: _ClassVar[Split]
    SPLIT_VALIDATION: _ClassVar[Split]
    SPLIT_TEST: _ClassVar[Split]

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_AUTO: _ClassVar[Policy]
    POLICY_APPROVE: _ClassVar[Policy]
    POLICY_FROZEN: _ClassVar[Policy]

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_CREATING: _ClassVar[TaskStatus]
    TASK_STATUS_SERVING: _ClassVar[TaskStatus]

class PathStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PATH_STATUS_UNSPECIFIED: _ClassVar[PathStatus]
    PATH_STATUS_CURRENT: _ClassVar[PathStatus]
    PATH_STATUS_RETIRED: _ClassVar[PathStatus]
    PATH_STATUS_CANDIDATE: _ClassVar[PathStatus]
    PATH_STATUS_PENDING: _ClassVar[PathStatus]
    PATH_STATUS_REJECTED: _ClassVar[PathStatus]
    PATH_STATUS_FAILED: _ClassVar[PathStatus]

class GenerationOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATION_OUTCOME_UNSPECIFIED: _ClassVar[GenerationOutcome]
    GENERATION_OUTCOME_PROMOTED: _ClassVar[GenerationOutcome]
    GENERATION_OUTCOME_PENDING: _ClassVar[GenerationOutcome]
    GENERATION_OUTCOME_FAILED: _ClassVar[GenerationOutcome]
    GENERATION_OUTCOME_SUPERSEDED: _ClassVar[GenerationOutcome]

class TaskEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_EVENT_KIND_UNSPECIFIED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_REGISTERED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_DELETED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_GENERATION_STARTED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_GENERATION_FINISHED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_PENDING: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_PROMOTED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_ROLLED_BACK: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_REJECTED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_FAILED: _ClassVar[TaskEventKind]
    TASK_EVENT_KIND_POLICY_CHANGED: _ClassVar[TaskEventKind]
SPLIT_UNSPECIFIED: Split
SPLIT_TRAIN: Split
SPLIT_VALIDATION: Split
SPLIT_TEST: Split
POLICY_UNSPECIFIED: Policy
POLICY_AUTO: Policy
POLICY_APPROVE: Policy
POLICY_FROZEN: Policy
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_CREATING: TaskStatus
TASK_STATUS_SERVING: TaskStatus
PATH_STATUS_UNSPECIFIED: PathStatus
PATH_STATUS_CURRENT: PathStatus
PATH_STATUS_RETIRED: PathStatus
PATH_STATUS_CANDIDATE: PathStatus
PATH_STATUS_PENDING: PathStatus
PATH_STATUS_REJECTED: PathStatus
PATH_STATUS_FAILED: PathStatus
GENERATION_OUTCOME_UNSPECIFIED: GenerationOutcome
GENERATION_OUTCOME_PROMOTED: GenerationOutcome
GENERATION_OUTCOME_PENDING: GenerationOutcome
GENERATION_OUTCOME_FAILED: GenerationOutcome
GENERATION_OUTCOME_SUPERSEDED: GenerationOutcome
TASK_EVENT_KIND_UNSPECIFIED: TaskEventKind
TASK_EVENT_KIND_REGISTERED: TaskEventKind
TASK_EVENT_KIND_DELETED: TaskEventKind
TASK_EVENT_KIND_GENERATION_STARTED: TaskEventKind
TASK_EVENT_KIND_GENERATION_FINISHED: TaskEventKind
TASK_EVENT_KIND_PENDING: TaskEventKind
TASK_EVENT_KIND_PROMOTED: TaskEventKind
TASK_EVENT_KIND_ROLLED_BACK: TaskEventKind
TASK_EVENT_KIND_REJECTED: TaskEventKind
TASK_EVENT_KIND_FAILED: TaskEventKind
TASK_EVENT_KIND_POLICY_CHANGED: TaskEventKind

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("data", "height", "width", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("task", "images", "top_k", "version")
    TASK_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    version: int
    def __init__(self, task: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("task", "path_version", "predictions")
    TASK_FIELD_NUMBER: _ClassVar[int]
    PATH_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    task: str
    path_version: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, task: _Optional[str] = ..., path_version: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class LabelledImage(_message.Message):
    __slots__ = ("image", "label", "split")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    image: Image
    label: int
    split: Split
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., label: _Optional[int] = ..., split: _Optional[_Union[Split, str]] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("name", "labels", "builtin", "npz_file", "max_examples", "validation_fraction", "test_fraction", "seed", "root", "policy", "evolution")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    NPZ_FILE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EVOLUTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    builtin: str
    npz_file: str
    max_examples: int
    validation_fraction: float
    test_fraction: float
    seed: int
    root: str
    policy: Policy
    evolution: EvolutionSettings
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., builtin: _Optional[str] = ..., npz_file: _Optional[str] = ..., max_examples: _Optional[int] = ..., validation_fraction: _Optional[float] = ..., test_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., root: _Optional[str] = ..., policy: _Optional[_Union[Policy, str]] = ..., evolution: _Optional[_Union[EvolutionSettings, _Mapping]] = ...) -> None: ...

class EvolutionSettings(_message.Message):
    __slots__ = ("candidates_per_generation", "candidate_budget_seconds", "scale_base")
    CANDIDATES_PER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCALE_BASE_FIELD_NUMBER: _ClassVar[int]
    candidates_per_generation: int
    candidate_budget_seconds: float
    scale_base: float
    def __init__(self, candidates_per_generation: _Optional[int] = ..., candidate_budget_seconds: _Optional[float] = ..., scale_base: _Optional[float] = ...) -> None: ...

class ExampleBatch(_message.Message):
    __slots__ = ("examples",)
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[LabelledImage]
    def __init__(self, examples: _Optional[_Iterable[_Union[LabelledImage, _Mapping]]] = ...) -> None: ...

class UploadEnd(_message.Message):
    __slots__ = ("examples",)
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    examples: int
    def __init__(self, examples: _Optional[int] = ...) -> None: ...

class RegisterTaskRequest(_message.Message):
    __slots__ = ("spec", "examples", "end")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    spec: TaskSpec
    examples: ExampleBatch
    end: UploadEnd
    def __init__(self, spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., examples: _Optional[_Union[ExampleBatch, _Mapping]] = ..., end: _Optional[_Union[UploadEnd, _Mapping]] = ...) -> None: ...

class AddExamplesRequest(_message.Message):
    __slots__ = ("task", "examples", "end")
    TASK_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    task: str
    examples: ExampleBatch
    end: UploadEnd
    def __init__(self, task: _Optional[str] = ..., examples: _Optional[_Union[ExampleBatch, _Mapping]] = ..., end: _Optional[_Union[UploadEnd, _Mapping]] = ...) -> None: ...

class AddExamplesResponse(_message.Message):
    __slots__ = ("task", "added", "train", "validation", "test", "total_examples")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    task: str
    added: int
    train: int
    validation: int
    test: int
    total_examples: int
    def __init__(self, task: _Optional[str] = ..., added: _Optional[int] = ..., train: _Optional[int] = ..., validation: _Optional[int] = ..., test: _Optional[int] = ..., total_examples: _Optional[int] = ...) -> None: ...

class ModuleInfo(_message.Message):
    __slots__ = ("id", "kind", "params", "shared_by", "frozen")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHARED_BY_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    params: int
    shared_by: int
    frozen: bool
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., params: _Optional[int] = ..., shared_by: _Optional[int] = ..., frozen: _Optional[bool] = ...) -> None: ...

class PathVersion(_message.Message):
    __slots__ = ("version", "modules", "validation_accuracy", "test_accuracy", "score", "params", "accounted_params", "added_params", "parents", "parent_task", "mutations", "hyperparameters_json", "training_seconds", "created_at", "status", "training_steps", "training_examples", "decision", "note", "state", "created_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    ADDED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_FIELD_NUMBER: _ClassVar[int]
    MUTATIONS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    version: int
    modules: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    validation_accuracy: float
    test_accuracy: float
    score: float
    params: int
    accounted_params: int
    added_params: int
    parents: _containers.RepeatedScalarFieldContainer[int]
    parent_task: str
    mutations: _containers.RepeatedScalarFieldContainer[str]
    hyperparameters_json: str
    training_seconds: float
    created_at: str
    status: str
    training_steps: int
    training_examples: int
    decision: str
    note: str
    state: PathStatus
    created_time: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., modules: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., validation_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., score: _Optional[float] = ..., params: _Optional[int] = ..., accounted_params: _Optional[int] = ..., added_params: _Optional[int] = ..., parents: _Optional[_Iterable[int]] = ..., parent_task: _Optional[str] = ..., mutations: _Optional[_Iterable[str]] = ..., hyperparameters_json: _Optional[str] = ..., training_seconds: _Optional[float] = ..., created_at: _Optional[str] = ..., status: _Optional[str] = ..., training_steps: _Optional[int] = ..., training_examples: _Optional[int] = ..., decision: _Optional[str] = ..., note: _Optional[str] = ..., state: _Optional[_Union[PathStatus, str]] = ..., created_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "labels", "status", "current_version", "path", "train_examples", "validation_examples", "test_examples", "source", "created_at", "lineage", "root", "image_size", "policy", "evolution", "pending_versions", "shadow", "state", "created_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EVOLUTION_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    status: str
    current_version: int
    path: PathVersion
    train_examples: int
    validation_examples: int
    test_examples: int
    source: str
    created_at: str
    lineage: _containers.RepeatedCompositeFieldContainer[PathVersion]
    root: str
    image_size: int
    policy: Policy
    evolution: EvolutionSettings
    pending_versions: _containers.RepeatedScalarFieldContainer[int]
    shadow: ShadowStats
    state: TaskStatus
    created_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., current_version: _Optional[int] = ..., path: _Optional[_Union[PathVersion, _Mapping]] = ..., train_examples: _Optional[int] = ..., validation_examples: _Optional[int] = ..., test_examples: _Optional[int] = ..., source: _Optional[str] = ..., created_at: _Optional[str] = ..., lineage: _Optional[_Iterable[_Union[PathVersion, _Mapping]]] = ..., root: _Optional[str] = ..., image_size: _Optional[int] = ..., policy: _Optional[_Union[Policy, str]] = ..., evolution: _Optional[_Union[EvolutionSettings, _Mapping]] = ..., pending_versions: _Optional[_Iterable[int]] = ..., shadow: _Optional[_Union[ShadowStats, _Mapping]] = ..., state: _Optional[_Union[TaskStatus, str]] = ..., created_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ShadowStats(_message.Message):
    __slots__ = ("version", "requests", "images", "agreement", "dropped", "labelled_examples", "accuracy", "incumbent_accuracy")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    LABELLED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    version: int
    requests: int
    images: int
    agreement: float
    dropped: int
    labelled_examples: int
    accuracy: float
    incumbent_accuracy: float
    def __init__(self, version: _Optional[int] = ..., requests: _Optional[int] = ..., images: _Optional[int] = ..., agreement: _Optional[float] = ..., dropped: _Optional[int] = ..., labelled_examples: _Optional[int] = ..., accuracy: _Optional[float] = ..., incumbent_accuracy: _Optional[float] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTaskResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TriggerEvolutionRequest(_message.Message):
    __slots__ = ("task", "candidates", "budget_seconds", "wait")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    task: str
    candidates: int
    budget_seconds: float
    wait: bool
    def __init__(self, task: _Optional[str] = ..., candidates: _Optional[int] = ..., budget_seconds: _Optional[float] = ..., wait: _Optional[bool] = ...) -> None: ...

class GetEvolutionStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerationReport(_message.Message):
    __slots__ = ("task", "generation", "candidates", "best_score", "incumbent_score", "promoted", "promoted_version", "error", "started_at", "seconds", "examples_processed", "pending_version", "outcome", "started_time")
    TASK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_SCORE_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STARTED_TIME_FIELD_NUMBER: _ClassVar[int]
    task: str
    generation: int
    candidates: int
    best_score: float
    incumbent_score: float
    promoted: bool
    promoted_version: int
    error: str
    started_at: str
    seconds: float
    examples_processed: int
    pending_version: int
    outcome: GenerationOutcome
    started_time: _timestamp_pb2.Timestamp
    def __init__(self, task: _Optional[str] = ..., generation: _Optional[int] = ..., candidates: _Optional[int] = ..., best_score: _Optional[float] = ..., incumbent_score: _Optional[float] = ..., promoted: _Optional[bool] = ..., promoted_version: _Optional[int] = ..., error: _Optional[str] = ..., started_at: _Optional[str] = ..., seconds: _Optional[float] = ..., examples_processed: _Optional[int] = ..., pending_version: _Optional[int] = ..., outcome: _Optional[_Union[GenerationOutcome, str]] = ..., started_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EvolutionStatus(_message.Message):
    __slots__ = ("running", "current_task", "candidates_done", "candidates_total", "paused_for_load", "generations", "recent", "scheduler_enabled", "interval_seconds", "triggered", "leading", "leader")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TASK_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_DONE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FOR_LOAD_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ENABLED_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRIGGERED_FIELD_NUMBER: _ClassVar[int]
    LEADING_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    running: bool
    current_task: str
    candidates_done: int
    candidates_total: int
    paused_for_load: bool
    generations: int
    recent: _containers.RepeatedCompositeFieldContainer[GenerationReport]
    scheduler_enabled: bool
    interval_seconds: float
    triggered: GenerationReport
    leading: bool
    leader: str
    def __init__(self, running: _Optional[bool] = ..., current_task: _Optional[str] = ..., candidates_done: _Optional[int] = ..., candidates_total: _Optional[int] = ..., paused_for_load: _Optional[bool] = ..., generations: _Optional[int] = ..., recent: _Optional[_Iterable[_Union[GenerationReport, _Mapping]]] = ..., scheduler_enabled: _Optional[bool] = ..., interval_seconds: _Optional[float] = ..., triggered: _Optional[_Union[GenerationReport, _Mapping]] = ..., leading: _Optional[bool] = ..., leader: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("task", "current_version", "versions")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    task: str
    current_version: int
    versions: _containers.RepeatedCompositeFieldContainer[PathVersion]
    def __init__(self, task: _Optional[str] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[PathVersion, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("task", "version", "policy")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: int
    policy: Policy
    def __init__(self, task: _Optional[str] = ..., version: _Optional[int] = ..., policy: _Optional[_Union[Policy, str]] = ...) -> None: ...

class SetTaskPolicyRequest(_message.Message):
    __slots__ = ("task", "policy", "evolution")
    TASK_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EVOLUTION_FIELD_NUMBER: _ClassVar[int]
    task: str
    policy: Policy
    evolution: EvolutionSettings
    def __init__(self, task: _Optional[str] = ..., policy: _Optional[_Union[Policy, str]] = ..., evolution: _Optional[_Union[EvolutionSettings, _Mapping]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("task", "version")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: int
    def __init__(self, task: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RejectRequest(_message.Message):
    __slots__ = ("task", "version", "reason")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: int
    reason: str
    def __init__(self, task: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchTaskRequest(_message.Message):
    __slots__ = ("task", "since_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SINCE_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    since_id: int
    def __init__(self, task: _Optional[str] = ..., since_id: _Optional[int] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("id", "task", "kind", "version", "detail_json", "at")
    ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    task: str
    kind: TaskEventKind
    version: int
    detail_json: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., task: _Optional[str] = ..., kind: _Optional[_Union[TaskEventKind, str]] = ..., version: _Optional[int] = ..., detail_json: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
