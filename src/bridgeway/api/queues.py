"""/api/v1/queues and /api/v1/jobs: produce, pull, settle, inspect and replay jobs.

Routes of the management API (FastAPI: OpenAPI at /docs), but bodies are parsed with orjson and
checked by the queue service, not by pydantic models: a batch of 500 jobs costs one parse, and
errors name the field (`jobs[3].delay: ...`). Payloads go back out as they were stored
(orjson.Fragment), never decoded and encoded again. The three hot calls (enqueue, claim, settle)
are dispatched to these same handlers without FastAPI's per-request machinery
(`api.app.serve_queue_call`): measured in-process, that machinery was ~1.5 ms of a 2 ms
single-job enqueue, which an idle queue's latency pays twice; a batch of 500 hardly notices it.
A settle may also claim the next jobs (`"claim"`), so a busy pull worker makes one call per
batch; and a settle of leases this process's claims handed out reads nothing before it writes
(`Queues.held`).

Who may call: admins; and roles granted queues in config (`roles.X.queues`): `produce` enqueues
and reads jobs, `consume` also claims, settles and lists dead letters. Replay and purge are admin
work, and audited.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from bridgeway.api.auth import caller_of, refuse
from bridgeway.api.context import audit
from bridgeway.errors import GatewayError
from bridgeway.jobs.queues.backend import Job, Outcome
from bridgeway.jobs.queues.service import MAX_BATCH, MAX_CLAIM, MAX_WAIT, Queues, parse_seconds
from bridgeway.security.access import ADMIN_ROLE

router = APIRouter(tags=["queues"])
QueueName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


def _queues(request: Request) -> Queues:
    queues = request.app.state.gateway.queues
    if queues is None:
        raise GatewayError("INTERNAL", "the queues are not open yet")
    return queues


async def _allow(request: Request, queue: str, consume: bool):
    caller = await caller_of(request)
    if not request.app.state.gateway.access.may_use_queue(caller, queue, consume):
        verb = "consume from" if consume else "produce to"
        raise refuse(request, caller, f"role {caller.role!r} may not {verb} queue {queue!r}")
    return caller


async def _admin(request: Request) -> None:
    caller = await caller_of(request)
    if caller.role != ADMIN_ROLE:
        raise refuse(request, caller, "replaying and purging dead letters needs the admin role")


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError("BAD_REQUEST", f"body: not valid JSON ({exc})") from None


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def job_view(job: Job, *, lease: bool = False) -> dict:
    view = {
        "id": job.id,
        "queue": job.queue,
        "state": job.state,
        "payload": orjson.Fragment(job.payload),
        "headers": job.headers,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_at": job.created_at,
        "run_at": job.run_at,
        "last_error": job.last_error,
        "finished_at": job.finished_at,
        "idempotency_key": job.idempotency_key,
        "callback_url": job.callback_url,
    }
    if lease:
        view["lease"] = job.lease
        view["lease_until"] = job.lease_until
    return view


@router.get("/queues", summary="Queues the caller may use, with their depth, leases and dead letters")
async def list_queues(request: Request) -> Response:
    caller = await caller_of(request)
    queues = _queues(request)
    access = request.app.state.gateway.access
    now = queues.clock()
    out = []
    for name, queue in queues.queues.items():
        if not access.may_use_queue(caller, name, False):
            continue
        stats = await queues.backend.stats(name, now)
        deliver = queue.config.deliver
        out.append(
            {
                "name": name,
                "delivery": f"push to {deliver.service}{deliver.path}" if deliver else "pull",
                "queued": stats.queued,
                "leased": stats.leased,
                "dead": stats.dead,
                "oldest_age": round(stats.oldest_age, 3),
                "max_attempts": queue.config.max_attempts,
            }
        )
    return _json({"queues": out})


@router.post(
    "/queues/{queue}/jobs", summary='Enqueue one job, or a batch as {"jobs": [...]} (all or nothing)'
)
async def enqueue(request: Request, queue: QueueName) -> Response:
    await _allow(request, queue, False)
    body = await _json_body(request)
    queues = _queues(request)
    if isinstance(body, dict) and "jobs" in body:
        items = body["jobs"]
        if not isinstance(items, list) or not items:
            raise GatewayError("VALIDATION_ERROR", f"jobs: expected a list of 1 to {MAX_BATCH} jobs")
        if len(body) > 1:
            raise GatewayError("VALIDATION_ERROR", "body: a batch has only the field jobs")
        stored = await queues.enqueue(queue, items)
        return _json({"jobs": [{"id": job.id, "created": created} for job, created in stored]}, 201)
    if body is None:
        raise GatewayError("VALIDATION_ERROR", 'body: expected a job object, e.g. {"payload": {...}}')
    ((job, created),) = await queues.enqueue(queue, [body], where="body")
    return _json({"id": job.id, "created": created, "state": job.state}, 201 if created else 200)


@router.get("/jobs/{job_id}", summary="A job's state, attempts and payload")
async def get_job(request: Request, job_id: Annotated[str, Path(max_length=64)]) -> Response:
    caller = await caller_of(request)
    job = await _queues(request).backend.get(job_id)
    # A job of a queue the caller may not use is as absent as one that does not exist.
    if job is None or not request.app.state.gateway.access.may_use_queue(caller, job.queue, False):
        raise GatewayError("NOT_FOUND", f"no job {job_id[:64]!r}")
    return _json(job_view(job))


def _claim_args(body: Any, where: str) -> tuple[int, float, float | None]:
    """(max, wait, lease) of a claim: its body, or a settle's `claim` field."""
    if not isinstance(body, dict):
        raise GatewayError("VALIDATION_ERROR", f'{where}: expected an object like {{"max": 100, "wait": 5}}')
    prefix = "" if where == "body" else f"{where}."
    unknown = body.keys() - {"max", "wait", "lease"}
    if unknown:
        raise GatewayError("VALIDATION_ERROR", f"{prefix}{sorted(unknown)[0][:40]}: unknown field")
    limit = body.get("max", 1)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_CLAIM:
        raise GatewayError("VALIDATION_ERROR", f"{prefix}max: expected an integer from 1 to {MAX_CLAIM}")
    wait = parse_seconds(body.get("wait", 0), f"{prefix}wait")
    if wait > MAX_WAIT:
        raise GatewayError("VALIDATION_ERROR", f"{prefix}wait: at most {MAX_WAIT:g} seconds")
    lease = parse_seconds(body["lease"], f"{prefix}lease") if body.get("lease") is not None else None
    if lease is not None and not 0 < lease <= 86400:
        raise GatewayError("VALIDATION_ERROR", f"{prefix}lease: between 0 and one day")
    return limit, wait, lease


@router.post("/queues/{queue}/claim", summary="Lease up to max jobs, waiting up to wait seconds for one")
async def claim(request: Request, queue: QueueName) -> Response:
    await _allow(request, queue, True)
    limit, wait, lease = _claim_args(await _json_body(request) or {}, "body")
    jobs = await _queues(request).claim(queue, limit, wait, lease)
    return _json({"jobs": [job_view(j, lease=True) for j in jobs]})


_ACTIONS = ("ack", "nack", "bury", "extend")


def _settle_item(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise GatewayError("VALIDATION_ERROR", f"{where}: expected an object with id, lease and action")
    unknown = item.keys() - {"id", "lease", "action", "delay", "error", "result", "lease_for"}
    if unknown:
        raise GatewayError("VALIDATION_ERROR", f"{where}.{sorted(unknown)[0][:40]}: unknown field")
    for field in ("id", "lease"):
        if not isinstance(item.get(field), str) or not item[field]:
            raise GatewayError("VALIDATION_ERROR", f"{where}.{field}: expected the string the claim answered")
    if item.get("action") not in _ACTIONS:
        raise GatewayError("VALIDATION_ERROR", f"{where}.action: expected one of {', '.join(_ACTIONS)}")
    for field in ("delay", "lease_for"):
        if item.get(field) is not None:
            item[field] = parse_seconds(item[field], f"{where}.{field}")
    if item.get("error") is not None and not isinstance(item["error"], str):
        raise GatewayError("VALIDATION_ERROR", f"{where}.error: expected a string")
    return item


@router.post(
    "/queues/{queue}/settle",
    summary='Ack, nack (retry per policy, or after "delay"), bury or extend leased jobs, in a batch; '
    'with "claim", then lease the next jobs in the same call',
)
async def settle(request: Request, queue: QueueName) -> Response:
    await _allow(request, queue, True)
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list) or not body["jobs"]:
        raise GatewayError("VALIDATION_ERROR", f"jobs: expected a list of 1 to {MAX_BATCH} outcomes")
    if len(body["jobs"]) > MAX_BATCH:
        raise GatewayError("VALIDATION_ERROR", f"jobs: at most {MAX_BATCH} outcomes per call")
    unknown = body.keys() - {"jobs", "claim"}
    if unknown:
        raise GatewayError("VALIDATION_ERROR", f"{sorted(unknown)[0][:40]}: unknown field")
    # The next claim is checked with the rest, before anything is written.
    then_claim = _claim_args(body["claim"], "claim") if body.get("claim") is not None else None
    items = [_settle_item(item, f"jobs[{i}]") for i, item in enumerate(body["jobs"])]
    queues = _queues(request)
    compiled = queues.get_queue(queue)
    leases = await queues.held(queue, [(item["id"], item["lease"]) for item in items])
    now = queues.clock()
    outcomes: list[Outcome] = []
    callbacks: dict[str, tuple[str, Any]] = {}
    slots: list[int | None] = []  # per item: its index in outcomes, or None (lease lost)
    for item, lease in zip(items, leases, strict=True):
        if lease is None:
            slots.append(None)
            continue
        action = item["action"]
        if action == "extend":
            lease_for = item.get("lease_for") or compiled.config.lease
            outcome = Outcome(lease.job_id, lease.token, "extend", at=now + lease_for)
        elif action == "bury":
            outcome = Outcome(
                lease.job_id, lease.token, "bury", error=(item.get("error") or "buried by a worker")[:1000]
            )
        else:
            ok = action == "ack"
            outcome = queues.outcome(compiled, lease, ok, item.get("error"), item.get("delay"), now)
        if lease.callback_url:
            callbacks[lease.job_id] = (lease.callback_url, item.get("result"))
        slots.append(len(outcomes))
        outcomes.append(outcome)
    settled = await queues.settle(queue, outcomes, callbacks) if outcomes else []
    results = []
    for item, slot in zip(items, slots, strict=True):
        done = settled[slot] if slot is not None else None
        if done is None:
            results.append(
                {
                    "id": item["id"],
                    "status": 409,
                    "error": {
                        "code": "CONFLICT",
                        "message": "the lease was lost: expired, or settled already",
                    },
                }
            )
        else:
            entry = {"id": done.id, "status": 200, "state": done.state, "attempts": done.attempts}
            if done.state == "queued":
                entry["run_at"] = done.run_at
            elif done.state == "leased":
                entry["lease_until"] = done.lease_until
            results.append(entry)
    if then_claim is None:
        return _json({"results": results})
    # Settled first, then claimed: a crash in between leaves the outcomes applied and the next
    # jobs queued, so nothing is lost; the worker saves a round trip per batch.
    jobs = await queues.claim(queue, *then_claim)
    return _json({"results": results, "jobs": [job_view(j, lease=True) for j in jobs]})


@router.get("/queues/{queue}/dead", summary="Dead letters of a queue, in id order, with cursor paging")
async def list_dead(
    request: Request,
    queue: QueueName,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    await _allow(request, queue, True)
    queues = _queues(request)
    queues.get_queue(queue)
    jobs = await queues.backend.dead(queue, limit, after)
    return _json({"jobs": [job_view(j) for j in jobs], "next": jobs[-1].id if len(jobs) == limit else None})


@router.post("/queues/{queue}/dead/replay", summary='Dead letters back to the queue: all, or {"ids": [...]}')
async def replay(request: Request, queue: QueueName) -> Response:
    await _admin(request)
    body = await _json_body(request) or {}
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(body, dict) or (
        ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids))
    ):
        raise GatewayError("VALIDATION_ERROR", "ids: expected a list of job ids (or no body for all)")
    queues = _queues(request)
    queues.get_queue(queue)
    count = await queues.backend.replay(queue, ids, queues.clock())
    audit(request, "queue.replayed", queue=queue, jobs=count)
    return _json({"replayed": count})


@router.post("/queues/{queue}/dead/purge", summary="Delete the dead letters of a queue")
async def purge(request: Request, queue: QueueName) -> Response:
    await _admin(request)
    queues = _queues(request)
    queues.get_queue(queue)
    count = await queues.backend.purge(queue)
    audit(request, "queue.purged", queue=queue, jobs=count)
    return _json({"purged": count})
