"""Asynchronous AOI exports: an rq queue on Redis, `tiler worker` processes, files in a shared directory.

An export over the direct cap (`tiler.settings.ExportSettings`) is submitted as a job
(``POST .../export-jobs``); the API checks the caller's rights and the job's size, then
enqueues `run_export` on the rq queue ``TILER_JOBS_QUEUE``. Any number of ``tiler worker``
processes, on any host that reaches the same Redis, the pgstac database, the COG storage and
the results directory, take jobs from it (rq forks a work horse per job, so a crashed read
takes down one job, not the worker). The worker checks the rights again (the policy may
have changed, the URL token may have been revoked) before reading, writes the file under
``TILER_JOBS_RESULTS_DIR`` (``<job id>.tif``, renamed into place when complete) and the API
serves it to the job's owner (and to ``TILER_JOBS_ADMIN_GROUPS``).

* One user has at most ``TILER_JOBS_MAX_PER_USER`` queued or running jobs (429 beyond),
  counted in Redis under a per-user lock, so every API replica sees the same count.
* A finished or failed job is kept ``TILER_JOBS_RESULT_TTL`` seconds: rq expires its record,
  and `JobQueue.sweep` (run by the API on the job routes and by the worker before each job)
  deletes files older than that. A job or file past it is a 404.
* Messages stored for a failed job are our exceptions' (they name items and assets, never
  URLs or credentials); anything else is "internal error" (the worker's log has the type).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue, Worker, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from titiler.core.errors import TilerError

from tiler.auth import Policy, Principal, UrlToken, load_document
from tiler.errors import JobNotFound, TooManyJobs
from tiler.export import ExportRequest, Grid, check_size
from tiler.settings import JobSettings, Settings

logger = logging.getLogger(__name__)

ANONYMOUS_OWNER = "anonymous"
ACTIVE = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED)
STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.CREATED: "queued",
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "done",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "failed",
    JobStatus.CANCELED: "canceled",
}


class JobRefused(TilerError):
    """At run time the job's owner no longer has the ``data`` right on the collection."""


def owner_of(principal: Principal | None) -> str:
    """The owner name of a caller's jobs (``anonymous`` when access control is off)."""
    return principal.user if principal is not None and principal.user else ANONYMOUS_OWNER


def principal_payload(principal: Principal | None) -> dict[str, Any] | None:
    """What the worker needs to check the caller's rights again (no secret: a token's claims, not the token)."""
    if principal is None:
        return None
    tok = principal.token
    return {
        "user": principal.user,
        "groups": sorted(principal.groups),
        "method": principal.method,
        "token": dataclasses.asdict(tok) if tok is not None else None,
    }


def principal_from(payload: dict[str, Any]) -> Principal:
    """Inverse of `principal_payload`."""
    tok = payload.get("token")
    token = None
    if tok is not None:
        token = UrlToken(**{k: tuple(v) if isinstance(v, list) else v for k, v in tok.items()})
    return Principal(
        user=payload.get("user"),
        groups=frozenset(payload.get("groups") or ()),
        method=payload["method"],
        token=token,
    )


class JobQueue:
    """The job queue of the API (``app.state.jobs``): submit, look up, list, cancel, sweep."""

    def __init__(self, settings: JobSettings):
        """Connect lazily to the Redis of ``settings`` (no I/O here); create the results directory."""
        assert settings.redis_url is not None and settings.results_dir is not None
        self.settings = settings
        self.redis = Redis.from_url(
            settings.redis_url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5
        )
        self.queue = Queue(settings.queue, connection=self.redis, default_timeout=settings.job_timeout)
        self.results = Path(settings.results_dir)
        self.results.mkdir(parents=True, exist_ok=True)
        self._swept = 0.0

    def _user_key(self, owner: str) -> str:
        return f"{self.settings.queue}:user:{owner}"

    def result_path(self, job_id: str) -> Path:
        """Where the worker writes the file of ``job_id``."""
        return self.results / f"{job_id}.tif"

    def _jobs_of(self, owner: str) -> list[Job]:
        ids = [i.decode() for i in self.redis.smembers(self._user_key(owner))]
        jobs = [j for j in Job.fetch_many(ids, connection=self.redis) if j is not None] if ids else []
        gone = set(ids) - {j.id for j in jobs}
        if gone:
            self.redis.srem(self._user_key(owner), *gone)
        return jobs

    def submit(self, principal: Principal | None, req: ExportRequest, grid: Grid) -> Job:
        """Enqueue the export ``req`` for ``principal``; `TooManyJobs` past the per-user bound."""
        owner = owner_of(principal)
        with self.redis.lock(f"{self.settings.queue}:lock:{owner}", timeout=10, blocking_timeout=10):
            active = [j for j in self._jobs_of(owner) if j.get_status(refresh=False) in ACTIVE]
            if len(active) >= self.settings.max_per_user:
                raise TooManyJobs(
                    f"You have {len(active)} export jobs queued or running, the most a user may have "
                    f"({self.settings.max_per_user}); wait for one to finish or cancel one (DELETE /jobs/{{id}})."
                )
            job_id = uuid.uuid4().hex
            job = self.queue.enqueue(
                "tiler.jobs.run_export",
                kwargs={
                    "payload": {
                        "request": req.as_dict(),
                        "principal": principal_payload(principal),
                        "result": str(self.result_path(job_id)),
                    }
                },
                job_id=job_id,
                job_timeout=self.settings.job_timeout,
                result_ttl=self.settings.result_ttl,
                failure_ttl=self.settings.result_ttl,
                # a job no worker took within this long is dropped (as the user's job set expires)
                ttl=self.settings.result_ttl + self.settings.job_timeout,
                meta={"owner": owner, "width": grid.width, "height": grid.height, "progress": 0.0},
                description=f"export {req.collection_id}/{req.item_id} {req.asset or ''}".strip(),
            )
            key = self._user_key(owner)
            self.redis.sadd(key, job.id)
            self.redis.expire(key, self.settings.result_ttl + self.settings.job_timeout)
        return job

    def may_see(self, principal: Principal | None, job: Job) -> bool:
        """The owner, or a member of ``TILER_JOBS_ADMIN_GROUPS``."""
        if job.meta.get("owner") == owner_of(principal):
            return True
        return principal is not None and bool(set(principal.groups) & set(self.settings.admin_groups))

    def get(self, principal: Principal | None, job_id: str) -> Job:
        """The job, if it exists, has not expired and ``principal`` may see it; else `JobNotFound`."""
        self.sweep()
        try:
            job = Job.fetch(job_id, connection=self.redis) if len(job_id) <= 64 else None
        except NoSuchJobError:
            job = None
        if job is None or not self.may_see(principal, job) or self._expired(job):
            raise JobNotFound(f"No export job {job_id[:64]!r} (unknown, expired, or not yours)")
        return job

    def list(self, principal: Principal | None) -> list[Job]:
        """The caller's jobs, newest first."""
        self.sweep()
        jobs = [j for j in self._jobs_of(owner_of(principal)) if not self._expired(j)]
        return sorted(jobs, key=lambda j: j.created_at or dt.datetime.min, reverse=True)

    def cancel(self, principal: Principal | None, job_id: str) -> None:
        """Cancel a queued job, stop a running one, forget a finished one; its file is deleted."""
        job = self.get(principal, job_id)
        status = job.get_status()
        with contextlib.suppress(Exception):
            if status == JobStatus.STARTED:
                from rq.command import send_stop_job_command

                send_stop_job_command(self.redis, job.id)
            elif status in ACTIVE:
                job.cancel()
        job.delete()
        self.redis.srem(self._user_key(str(job.meta.get("owner"))), job.id)
        for p in (self.result_path(job.id), self.result_path(job.id).with_suffix(".part")):
            p.unlink(missing_ok=True)

    def _expired(self, job: Job) -> bool:
        ended = job.ended_at
        if ended is None:
            return False
        if ended.tzinfo is None:
            ended = ended.replace(tzinfo=dt.UTC)
        return (dt.datetime.now(dt.UTC) - ended).total_seconds() > self.settings.result_ttl

    def sweep(self, every: float = 1.0) -> int:
        """Delete result files older than the TTL (at most once per ``every`` seconds); how many."""
        now = time.time()
        if now - self._swept < every:
            return 0
        self._swept = now
        return sweep_results(self.results, self.settings)

    def status(self, job: Job, base: str) -> dict[str, Any]:
        """The JSON of a job for its owner."""
        status = STATUS.get(job.get_status(), "unknown")
        result = self.result_path(job.id)
        if status == "done" and not result.exists():
            status = "failed"  # removed under us (a sweep, a lost volume)
        out: dict[str, Any] = {
            "id": job.id,
            "status": status,
            "owner": job.meta.get("owner"),
            "request": (job.kwargs.get("payload") or {}).get("request"),
            "size": {"width": job.meta.get("width"), "height": job.meta.get("height")},
            "progress": 1.0 if status == "done" else job.meta.get("progress", 0.0),
            "created": _iso(job.created_at),
            "started": _iso(job.started_at),
            "finished": _iso(job.ended_at),
            "links": {"self": f"{base}/jobs/{job.id}"},
        }
        if job.ended_at is not None:
            ended = job.ended_at.replace(tzinfo=job.ended_at.tzinfo or dt.UTC)
            out["expires"] = _iso(ended + dt.timedelta(seconds=self.settings.result_ttl))
        if status == "failed":
            out["error"] = job.meta.get("error") or "the job failed"
        if status == "done":
            out["links"]["result"] = f"{base}/jobs/{job.id}/result"
            out["bytes"] = result.stat().st_size
        return out

    def close(self) -> None:
        """Close the Redis connections."""
        self.redis.close()


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.isoformat().replace("+00:00", "Z")


def sweep_results(directory: Path, settings: JobSettings) -> int:
    """Delete ``*.tif`` older than the result TTL and ``*.part`` older than TTL + job timeout."""
    now, removed = time.time(), 0
    for p in directory.glob("*.tif*"):
        limit = settings.result_ttl + (settings.job_timeout if p.suffix == ".part" else 0)
        with contextlib.suppress(FileNotFoundError):
            if now - p.stat().st_mtime > limit:
                p.unlink()
                removed += 1
    return removed


# --------------------------------------------------------------------------- the worker side

_settings: Settings | None = None


def _worker_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


def _check_rights(settings: Settings, principal: Principal, collection_id: str, pool: Any) -> None:
    """The ``data`` right on the collection, as the policy and revocations say now."""
    if not settings.auth.enabled:
        return
    from tiler.access import RevocationList

    tok = principal.token
    if tok is not None:
        revoked = RevocationList(lambda: pool, interval=0)
        if revoked(tok.jti) or (tok.parent is not None and revoked(tok.parent)):
            raise JobRefused("The URL token this job was submitted with has been revoked")
        if tok.exp < time.time():
            raise JobRefused("The URL token this job was submitted with has expired")
    policy = Policy.from_mapping(load_document(settings.auth.policy_file))  # type: ignore[arg-type]
    access = principal.access(policy, collection_id)
    if access is None or not access.allows("data"):
        raise JobRefused(f"Not allowed: data on collection {collection_id!r} (checked when the job ran)")


def run_export(payload: dict[str, Any]) -> dict[str, Any]:
    """The job: check the rights again, read the item, write the file (in a work horse of `tiler worker`)."""
    from tiler.catalogue import catalogue
    from tiler.db import open_pool
    from tiler.export import open_product, output_grid, write_export

    settings = _worker_settings()
    job = get_current_job()
    sweep_results(Path(settings.jobs.results_dir or "."), settings.jobs)
    req = ExportRequest.from_dict(payload["request"])
    final = Path(payload["result"])
    part = final.with_suffix(".part")
    pool = open_pool(settings.db.model_copy(update={"min_conn": 1, "max_conn": 1}))
    last = [0.0]

    def progress(fraction: float) -> None:
        if job is not None and time.monotonic() - last[0] > 1:
            last[0] = time.monotonic()
            job.meta["progress"] = round(fraction, 3)
            job.save_meta()

    try:
        if payload.get("principal") is not None:
            _check_rights(settings, principal_from(payload["principal"]), req.collection_id, pool)
        cat = catalogue(pool)
        item = cat.item(req.collection_id, req.item_id)
        ctx = cat.presets(collection_id=req.collection_id, item_id=req.item_id, item=item)
        with open_product(item, req, ctx, settings.gdal.env_options()) as product:
            grid = output_grid(product, req)
            check_size(grid, settings.jobs.max_size, settings.jobs.max_pixels, "an export job")
            write_export(str(part), item, cat.collection(req.collection_id), req, product, grid, progress)
        os.replace(part, final)
        return {"width": grid.width, "height": grid.height, "bytes": final.stat().st_size}
    except Exception as e:
        part.unlink(missing_ok=True)
        if job is not None:
            job.meta["error"] = str(e) if isinstance(e, TilerError) else "internal error"
            job.save_meta()
        if isinstance(e, TilerError):
            logger.warning("export job %s failed: %s", job.id if job else "-", e)
            raise RuntimeError(str(e)) from None
        logger.error("export job %s failed: %s", job.id if job else "-", type(e).__name__)
        raise RuntimeError("internal error") from None
    finally:
        pool.close()


def run_worker(settings: Settings, burst: bool = False, name: str | None = None) -> bool:
    """Take jobs from the queue until stopped (or, with ``burst``, until it is empty)."""
    global _settings
    _settings = settings
    jobs = settings.jobs
    assert jobs.redis_url is not None
    if jobs.results_dir is not None:
        Path(jobs.results_dir).mkdir(parents=True, exist_ok=True)
    redis = Redis.from_url(jobs.redis_url.get_secret_value())
    worker = Worker([Queue(jobs.queue, connection=redis)], connection=redis, name=name)
    return worker.work(burst=burst, with_scheduler=False)
