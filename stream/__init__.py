"""ZeroMQ plumbing: message codec, stages, ordering and fan-out.

- :mod:`~boldstream.stream.messages`: :class:`Message` and the pipeline's events;
- :mod:`~boldstream.stream.codec`: ``[topic, json header, buffers]``, no pickle;
- :mod:`~boldstream.stream.stage`: :class:`Stage` and the loop around it;
- :mod:`~boldstream.stream.runner`: threads over inproc://, processes over ipc/tcp;
- :mod:`~boldstream.stream.ordering`: per-series reorder buffer with gap markers;
- :mod:`~boldstream.stream.pubsub`: lossy fan-out with drop counting.
"""

from __future__ import annotations

from boldstream.stream.codec import SCHEMA_VERSION, MessageError, decode, encode, recv, send
from boldstream.stream.messages import (
    EndOfStream,
    Gap,
    Message,
    Payload,
    Result,
    SeriesEnd,
    SeriesStart,
    series_key,
)
from boldstream.stream.ordering import Orderer, OrderingStage
from boldstream.stream.pubsub import Publisher, Subscriber
from boldstream.stream.runner import Chain, StageControl, StageProcess, StageThread, start_chain
from boldstream.stream.stage import (
    DEFAULT_PUBLISH_KINDS,
    FunctionStage,
    PassThrough,
    Stage,
    StageConfig,
    load_stage,
    run_stage,
)

__all__ = [
    "DEFAULT_PUBLISH_KINDS",
    "SCHEMA_VERSION",
    "Chain",
    "EndOfStream",
    "FunctionStage",
    "Gap",
    "Message",
    "MessageError",
    "Orderer",
    "OrderingStage",
    "PassThrough",
    "Payload",
    "Publisher",
    "Result",
    "SeriesEnd",
    "SeriesStart",
    "Stage",
    "StageConfig",
    "StageControl",
    "StageProcess",
    "StageThread",
    "Subscriber",
    "decode",
    "encode",
    "load_stage",
    "recv",
    "run_stage",
    "send",
    "series_key",
    "start_chain",
]
