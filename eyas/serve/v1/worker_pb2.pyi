from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., logprobs: _Optional[int] = ...) -> None: ...

class Tree(_message.Message):
    __slots__ = ("parents", "depths")
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DEPTHS_FIELD_NUMBER: _ClassVar[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    depths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, parents: _Optional[_Iterable[int]] = ..., depths: _Optional[_Iterable[int]] = ...) -> None: ...

class StepItem(_message.Message):
    __slots__ = ("request_id", "token_ids", "start", "block_table", "num_new", "sample", "sampling", "tree", "q_rows")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_NEW_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    Q_ROWS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    num_new: int
    sample: bool
    sampling: Sampling
    tree: Tree
    q_rows: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., num_new: _Optional[int] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., tree: _Optional[_Union[Tree, _Mapping]] = ..., q_rows: _Optional[int] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("version", "step", "items", "move_src", "move_dst", "finished", "send_features")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MOVE_SRC_FIELD_NUMBER: _ClassVar[int]
    MOVE_DST_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SEND_FEATURES_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    items: _containers.RepeatedCompositeFieldContainer[StepItem]
    move_src: _containers.RepeatedScalarFieldContainer[int]
    move_dst: _containers.RepeatedScalarFieldContainer[int]
    finished: _containers.RepeatedScalarFieldContainer[str]
    send_features: bool
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., items: _Optional[_Iterable[_Union[StepItem, _Mapping]]] = ..., move_src: _Optional[_Iterable[int]] = ..., move_dst: _Optional[_Iterable[int]] = ..., finished: _Optional[_Iterable[str]] = ..., send_features: _Optional[bool] = ...) -> None: ...

class StepItemResult(_message.Message):
    __slots__ = ("token_ids", "num_valid", "accepted", "logprobs_json")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_VALID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_JSON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_valid: int
    accepted: int
    logprobs_json: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., num_valid: _Optional[int] = ..., accepted: _Optional[int] = ..., logprobs_json: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("version", "step", "items", "move_src", "move_dst", "worker_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MOVE_SRC_FIELD_NUMBER: _ClassVar[int]
    MOVE_DST_FIELD_NUMBER: _ClassVar[int]
    WORKER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    items: _containers.RepeatedCompositeFieldContainer[StepItemResult]
    move_src: _containers.RepeatedScalarFieldContainer[int]
    move_dst: _containers.RepeatedScalarFieldContainer[int]
    worker_seconds: float
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., items: _Optional[_Iterable[_Union[StepItemResult, _Mapping]]] = ..., move_src: _Optional[_Iterable[int]] = ..., move_dst: _Optional[_Iterable[int]] = ..., worker_seconds: _Optional[float] = ...) -> None: ...

class Observed(_message.Message):
    __slots__ = ("request_id", "start", "num_rows")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start: int
    num_rows: int
    def __init__(self, request_id: _Optional[str] = ..., start: _Optional[int] = ..., num_rows: _Optional[int] = ...) -> None: ...

class DraftItem(_message.Message):
    __slots__ = ("request_id", "new_token_ids", "token_offset", "num_computed", "block_table", "num_tokens", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_offset: int
    num_computed: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    sampling: Sampling
    def __init__(self, request_id: _Optional[str] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., token_offset: _Optional[int] = ..., num_computed: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class DraftPlan(_message.Message):
    __slots__ = ("version", "step", "observed", "items", "dropped", "chain")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    observed: _containers.RepeatedCompositeFieldContainer[Observed]
    items: _containers.RepeatedCompositeFieldContainer[DraftItem]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    chain: bool
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., observed: _Optional[_Iterable[_Union[Observed, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[DraftItem, _Mapping]]] = ..., dropped: _Optional[_Iterable[str]] = ..., chain: _Optional[bool] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("token_ids", "tree", "q_rows")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    Q_ROWS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tree: Tree
    q_rows: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tree: _Optional[_Union[Tree, _Mapping]] = ..., q_rows: _Optional[int] = ...) -> None: ...

class DraftResult(_message.Message):
    __slots__ = ("version", "step", "proposals")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ...) -> None: ...
