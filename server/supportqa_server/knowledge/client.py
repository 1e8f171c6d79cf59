"""Talking to Milvus: calls that give up in time and say when Milvus is unreachable, and
search replies read without pymilvus's per-row objects."""

from __future__ import annotations

from supportqa_server.errors import StoreUnavailable

# Seconds a Milvus call may take, retries included (pymilvus retries an unreachable server
# for minutes otherwise); an int, as pymilvus honours no other.
CALL_TIMEOUT_S = 30
# What an unreachable or restarting Milvus says, through grpc or pymilvus.
_UNREACHABLE = ("UNAVAILABLE", "failed to connect", "Connection refused", "DEADLINE_EXCEEDED",
                "Fail connecting", "not loaded", "channel closed")
_TIMED = frozenset({"insert", "upsert", "delete", "query", "list_collections", "load_collection",
                    "describe_collection", "create_collection", "drop_collection",
                    "has_collection", "get_server_version"})


def _unavailable(e: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        "the knowledge store (Milvus) cannot be reached or is loading: retry in a few seconds")


def unreachable(e: BaseException) -> bool:
    """Whether a Milvus call failed because Milvus is down, restarting or not loaded."""
    return any(s in str(e) for s in _UNREACHABLE)


class TimedClient:
    """A MilvusClient whose calls give up after CALL_TIMEOUT_S and fail with
    StoreUnavailable when Milvus cannot be reached."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name: str):
        fn = getattr(self._client, name)
        if name not in _TIMED:
            return fn

        def call(*args, **kwargs):
            kwargs.setdefault("timeout", CALL_TIMEOUT_S)
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if unreachable(e):
                    raise _unavailable(e) from e
                raise

        return call


def read_hits(pending, nq: int) -> list[list[tuple[str, float]]]:
    """Waits for a search of nq queries sent with ``_async=True``: per query, (primary key,
    score) pairs, best first.

    pymilvus would build a dict-like Hit per row (6,400 for 32 questions at 200 rows: half of
    a 42 ms batched search on 2 cores, docs/benchmarks/text.md); the reply's three flat arrays are
    read here instead. pymilvus 2.5's SearchFuture keeps the gRPC future as ``_future``.

    Raises:
        MilvusException: the search failed.
    """
    from pymilvus.client.utils import check_status
    from pymilvus.exceptions import MilvusException

    try:
        pending.exception()  # raises what failed before the request was sent
        try:
            reply = pending._future.result()
        except Exception as e:  # grpc.RpcError and its timeouts, as pymilvus reports them
            raise MilvusException(message=str(e)) from e
        check_status(reply.status)
    except MilvusException as e:
        if unreachable(e):
            raise _unavailable(e) from e
        raise
    r = reply.results
    ids = list(r.ids.str_id.data) if r.ids.HasField("str_id") else [
        str(i) for i in r.ids.int_id.data
    ]
    scores = list(r.scores)
    out, start = [], 0
    for k in r.topks:
        out.append(list(zip(ids[start : start + k], scores[start : start + k], strict=True)))
        start += k
    return out + [[] for _ in range(nq - len(out))]  # an empty collection sends no topks
