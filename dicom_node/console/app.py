"""The web console and JSON API: one FastAPI application over the job store, the spool and the configuration.

Every page and API route but ``/healthz``, ``/readyz`` and the login page needs a logged-in user: a signed session
cookie (HttpOnly, SameSite=Strict, Secure under TLS) for the browser, or an API token (``Authorization: Bearer``)
for scripts. Viewers read; admins also act (retry, cancel, echo, test a webhook). Every form carries the session's
CSRF token, and an API call made with the session cookie must send it in ``X-CSRF-Token``. Every view of a job
detail and every action is in the audit log with the console user.
"""


import datetime as dt
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import pydicom
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from sqlalchemy import func, select
from starlette.middleware.sessions import SessionMiddleware

from dicom_node.config import Settings
from dicom_node.console.health import readiness
from dicom_node.console.preview import PreviewError, render_preview
from dicom_node.console.users import LoginResult, User, UserStore
from dicom_node.console.webhooks import Notifier
from dicom_node.jobs.actions import CANCELLABLE, RETRYABLE, ActionRefused, cancel_job, retry_job
from dicom_node.jobs.rules import explain_rules
from dicom_node.jobs.schema import JobRecord, JobState, events, instances, studies
from dicom_node.jobs.store import JobStore, describe_error
from dicom_node.logs import audit, uid_hash
from dicom_node.permissions import private_file
from sr_writer.findings import InferenceResult

__all__ = ["ConsoleContext", "create_app", "secret_key"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_PAGE = 50


@dataclass
class ConsoleContext:
    """What the console reads and acts on; the node passes its own (a test may build one over a store)."""

    settings: Settings
    store: JobStore
    #: Hands a retried job to the queue at once (the node's dispatcher); None: the reconciler does, within its period.
    submit: Callable[[JobRecord], bool] | None = None
    #: Sends the webhooks' notifications (and the console's tests of them); None when no webhook is configured.
    notifier: Notifier | None = None

    @property
    def spool_root(self) -> Path:
        return self.settings.node.data_dir / "spool"


def secret_key(settings: Settings) -> str:
    """The key that signs session cookies: ``console.secret_key``, else a random one kept in data_dir/console.key."""
    if settings.console.secret_key is not None:
        return settings.console.secret_key.get_secret_value()
    path = settings.node.data_dir / "console.key"
    if not path.exists():
        settings.node.data_dir.mkdir(parents=True, exist_ok=True)
        private_file(path).write_text(secrets.token_hex(32), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


class _LoginRequired(Exception):
    def __init__(self, api: bool) -> None:
        self.api = api


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def create_app(ctx: ConsoleContext) -> FastAPI:
    settings = ctx.settings
    store = ctx.store
    accounts = UserStore(store, settings.console.max_failed_logins, settings.console.lockout_minutes)
    tls = settings.node.http_tls
    # FastAPI's docs pages with Swagger UI and ReDoc served by the node itself: a hospital network has no CDN.
    app = FastAPIOffline(
        title="DICOM AI node",
        summary="Jobs, studies, destinations, rules and health of one node; actions for admins.",
        version="1",
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key(settings),
        session_cookie="dicom_node_session",
        max_age=int(settings.console.session_hours * 3600),
        same_site="strict",
        https_only=tls,
    )
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    templates = Jinja2Templates(directory=_HERE / "templates")
    templates.env.filters["when"] = _when
    templates.env.filters["size"] = _size
    templates.env.globals["node_title"] = settings.node.ae_title

    # --- who is asking -----------------------------------------------------------------------------------------

    def _csrf(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(32)
        return str(token)

    def current_user(request: Request) -> User:
        api = request.url.path.startswith("/api/")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            user = accounts.by_token(auth[7:].strip())
            if user is None:
                raise HTTPException(401, "invalid API token", headers={"WWW-Authenticate": "Bearer"})
            return user
        name = request.session.get("user")
        user = accounts.get(name) if isinstance(name, str) else None
        expired = request.session.get("login_at", 0) + settings.console.session_hours * 3600 < time.time()
        if user is None or user.locked or expired:
            request.session.pop("user", None)
            raise _LoginRequired(api)
        return user

    def admin_user(request: Request, user: Annotated[User, Depends(current_user)]) -> User:
        if not user.is_admin:
            audit("console", user=user.name, action="refused", path=request.url.path, reason="viewer")
            raise HTTPException(403, f"user {user.name!r} is a viewer: only admins may do this")
        return user

    async def check_csrf(request: Request) -> None:
        """Forms send the session's token as ``csrf``; API calls made with the session cookie send it as
        ``X-CSRF-Token``; API calls with a token need none (no cookie, no cross-site request)."""
        if request.headers.get("authorization", "").lower().startswith("bearer "):
            return  # the route's user dependency checks the token
        sent = request.headers.get("x-csrf-token")
        if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            sent = (await request.form()).get("csrf")  # type: ignore[assignment]
        expected = request.session.get("csrf")
        if not expected or not isinstance(sent, str) or not hmac.compare_digest(sent, str(expected)):
            audit("console", user=request.session.get("user"), action="refused", path=request.url.path, reason="csrf")
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")

    Viewer = Annotated[User, Depends(current_user)]
    Admin = Annotated[User, Depends(admin_user)]
    Csrf = Depends(check_csrf)

    @app.exception_handler(_LoginRequired)
    async def _login_required(request: Request, exc: _LoginRequired) -> Response:
        if exc.api:
            return JSONResponse({"detail": "log in first, or send an API token"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return templates.TemplateResponse(
            request, "error.html", {"status": exc.status_code, "detail": exc.detail, "user": None, "csrf": ""},
            status_code=exc.status_code,
        )

    def page(request: Request, name: str, user: User, **values: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"user": user, "csrf": _csrf(request), **values})

    # --- health ------------------------------------------------------------------------------------------------

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Ready to take and run work: job store, spool, broker, an inference worker. 503 with the reasons if not."""
        r = readiness(settings, store, ctx.spool_root)
        return JSONResponse(r.as_dict(), status_code=200 if r.ready else 503)

    # --- log-in ------------------------------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return templates.TemplateResponse(
            request, "login.html", {"user": None, "csrf": _csrf(request), "next": next, "error": None}
        )

    @app.post("/login", include_in_schema=False, dependencies=[Csrf])
    def login(
        request: Request,
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        result, user = accounts.authenticate(username.strip(), password)
        if result is not LoginResult.OK or user is None:
            audit("console", user=username.strip()[:64], action="login", outcome=result.name.lower())
            return templates.TemplateResponse(
                request, "login.html",
                {"user": None, "csrf": _csrf(request), "next": next, "error": result.value}, status_code=401,
            )
        request.session.clear()  # a new session on log-in: nothing of the anonymous one is kept
        request.session.update(user=user.name, login_at=time.time(), csrf=secrets.token_urlsafe(32))
        audit("console", user=user.name, action="login", outcome="ok")
        # Only a path of this console: "//host" and "/\\host" would take the browser to another site.
        target = next if next.startswith("/") and not next.startswith(("//", "/\\")) else "/"
        return RedirectResponse(target, status_code=303)

    @app.post("/logout", include_in_schema=False, dependencies=[Csrf])
    def logout(request: Request) -> Response:
        audit("console", user=request.session.get("user"), action="logout")
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- data --------------------------------------------------------------------------------------------------

    def overview_data() -> dict[str, Any]:
        r = readiness(settings, store, ctx.spool_root)
        out: dict[str, Any] = {
            "ready": r.ready,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in r.checks],
            "workers": [w.__dict__ for w in r.workers],
            "free_bytes": r.free_bytes,
            "watermark_bytes": settings.node.min_free_disk_mb * 1024 * 1024,
        }
        try:
            now = time.time()
            out["last_24h"] = store.jobs_since(now - 86400)
            counts = store.counts()
            out["queue"] = {
                "inference": counts.get("jobs_queued", 0) + counts.get("jobs_running", 0),
                "export": counts.get("jobs_succeeded", 0),
            }
            out["studies_receiving"] = counts.get("studies_receiving", 0)
            with store.engine.connect() as conn:
                out["instances_last_hour"] = conn.execute(
                    select(func.count()).select_from(instances).where(instances.c.received_at >= now - 3600)
                ).scalar_one()
            out["recent"] = [job_row(j) for j in store.job_page(limit=10)]
        except Exception as exc:  # the job store is down: the overview says so and still answers
            out["store_error"] = describe_error(exc)
        return out

    def job_row(job: JobRecord) -> dict[str, Any]:
        return {
            "id": job.id, "state": job.state.value, "study_uid": job.study_uid, "run": job.run, "rule": job.rule,
            "modality": job.modality, "calling_ae": job.calling_ae, "accession_number": job.accession_number,
            "attempts": job.attempts, "error": job.error, "created_at": job.created_at, "updated_at": job.updated_at,
        }

    def jobs_data(
        state: list[str], date_from: str, date_to: str, modality: str, calling_ae: str, accession: str,
        before: int | None,
    ) -> dict[str, Any]:
        def day(text: str, end: bool) -> float | None:
            if not text:
                return None
            try:
                d = dt.datetime.strptime(text, "%Y-%m-%d")
            except ValueError:
                raise HTTPException(400, f"date {text!r}: expected YYYY-MM-DD") from None
            return (d + dt.timedelta(days=1 if end else 0)).timestamp()

        valid = {s.value for s in JobState}
        states = [s for s in state if s]
        wrong = [s for s in states if s not in valid]
        if wrong:
            raise HTTPException(400, f"state {wrong}: expected one of {sorted(valid)}")
        found = store.job_page(
            states=states, since=day(date_from, False), until=day(date_to, True), modality=modality or None,
            calling_ae=calling_ae.strip() or None, accession_number=accession.strip() or None, before_id=before,
            limit=_PAGE + 1,
        )
        more = len(found) > _PAGE
        found = found[:_PAGE]
        return {"jobs": [job_row(j) for j in found], "next_before": found[-1].id if more and found else None}

    def patient_of(study_uid: str) -> dict[str, str] | None:
        """Patient name and ID from the study's first spooled instance (never stored in the job store)."""
        path = store.study_instances(study_uid)[:1]
        if not path:
            return None
        try:
            ds = pydicom.dcmread(ctx.spool_root / path[0].path, stop_before_pixels=True)
        except Exception:  # unreadable file: the page says nothing of the patient
            return None
        return {"name": str(ds.get("PatientName", "") or ""), "id": str(ds.get("PatientID", "") or "")}

    def job_detail(job: JobRecord) -> dict[str, Any]:
        found = store.study_instances(job.study_uid)
        calling = found[-1].calling_ae if found else (job.calling_ae or "")
        rules = [
            {"name": rule.name, "matches": why is None, "why": why or "matches"}
            for rule, why in explain_rules(settings.rules, found, calling)
        ] if found else []
        result: InferenceResult | None = None
        result_error = None
        if job.result_path:
            try:
                result = InferenceResult.from_json(Path(job.result_path).read_text(encoding="utf-8"))
            except (OSError, ValueError, KeyError) as exc:
                result_error = f"result unreadable: {exc}"
        findings = []
        images: dict[str, list[int]] = {}
        if result is not None:
            for number, f in enumerate(result.findings, start=1):
                source = f.source.sop_instance_uid if f.source else None
                findings.append({
                    "number": number, "label": f.label, "text": f.text, "score": f.score,
                    "box": None if f.box is None else [round(v, 1) for v in (f.box.x0, f.box.y0, f.box.x1, f.box.y1)],
                    "image": source,
                })
                if source:
                    images.setdefault(source, []).append(number)
        read = [i.sop_instance_uid for i in found][:24]
        for uid in read:
            images.setdefault(uid, [])
        objects = store.job_results(job.id)
        sr_text = None
        for o in objects:
            if o["kind"] == "sr" and Path(o["path"]).exists():
                from sr_writer.render import render_sr

                try:
                    sr_text = render_sr(Path(o["path"]))
                except (OSError, ValueError, AttributeError) as exc:
                    sr_text = f"(the SR cannot be rendered: {exc})"
                break
        delivery = []
        for name in job.destinations:
            done = sum(1 for o in objects if name in o["delivered_to"])
            delivery.append({"destination": name, "delivered": done, "objects": len(objects)})
        return {
            "job": job_row(job) | {
                "profile": job.profile, "language": job.language, "destinations": job.destinations,
                "outputs": job.outputs, "redeliveries": job.redeliveries, "owner": job.owner,
            },
            "study_state": getattr(store.study_state(job.study_uid), "value", "unknown"),
            "patient": patient_of(job.study_uid),
            "instances": len(found),
            "events": [{"at": e["at"], "kind": e["kind"], "detail": e["detail"]} for e in store.job_events(job.id)],
            "rules": rules,
            "model": None if result is None else {
                "name": result.algorithm.name, "version": result.algorithm.version,
                "family": result.algorithm.family, "manufacturer": result.algorithm.manufacturer,
                "parameters": dict(result.algorithm.parameters),
            },
            "report": None if result is None else {"findings": result.report.findings,
                                                   "impression": result.report.impression},
            "result_error": result_error,
            "findings": findings,
            "images": [{"sop_instance_uid": uid, "findings": nums} for uid, nums in images.items()],
            "results": [
                {"kind": o["kind"], "sop_instance_uid": o["sop_instance_uid"], "delivered_to": o["delivered_to"]}
                for o in objects
            ],
            "delivery": delivery,
            "sr_text": sr_text,
            "can_retry": job.state in RETRYABLE,
            "can_cancel": job.state in CANCELLABLE,
        }

    def load_job(job_id: int) -> JobRecord:
        job = store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def act(user: User, job_id: int, action: str) -> str:
        by = f"console user {user.name}"
        try:
            if action == "retry":
                retry_job(store, job_id, by=by)
            else:
                cancel_job(store, job_id, by=by)
        except ActionRefused as exc:
            audit("console", user=user.name, action=action, job=job_id, outcome="refused")
            raise HTTPException(409, str(exc)) from None
        audit("console", user=user.name, action=action, job=job_id, outcome="ok")
        if action == "retry" and ctx.submit is not None:
            job = store.job(job_id)
            if job is not None and job.state is JobState.QUEUED:
                ctx.submit(job)  # at once; if the broker does not take it, the reconciler does later
        return f"job {job_id} {'queued again' if action == 'retry' else 'cancelled'}"

    def destinations_data() -> list[dict[str, Any]]:
        out = []
        with store.engine.connect() as conn:
            for d in settings.destinations:
                row = conn.execute(
                    select(events.c.at, events.c.job_id, events.c.detail)
                    .where(events.c.kind == "send", events.c.detail.like(f"{d.name} (%"))
                    .order_by(events.c.id.desc())
                    .limit(1)
                ).first()
                out.append({
                    "name": d.name, "kind": d.kind, "peer": _peer(d),
                    "last": None if row is None else {"at": row[0], "job": row[1], "detail": row[2]},
                })
        return out

    def echo_destination(user: User, name: str) -> dict[str, Any]:
        from dicom_node.export.destinations import echo

        by_name = {d.name: d for d in settings.destinations}
        if name not in by_name:
            raise HTTPException(404, f"no destination {name!r}")
        results = echo(by_name[name], settings)
        ok = bool(results) and all(r.ok for r in results)
        audit("console", user=user.name, action="echo", destination=name, ok=ok)
        detail = "; ".join(str(r) for r in results) or "no known AE to echo (known_aes is empty)"
        return {"destination": name, "ok": ok, "detail": detail}

    def rule_test(study_uid: str) -> dict[str, Any]:
        found = store.study_instances(study_uid)
        if not found:
            raise HTTPException(404, "no stored instances of that study (never received, or removed by retention)")
        calling = found[-1].calling_ae
        explained = explain_rules(settings.rules, found, calling)
        chosen = next((rule.name for rule, why in explained if why is None), None)
        return {
            "study_uid": study_uid, "instances": len(found), "calling_ae": calling,
            "modalities": sorted({i.modality for i in found if i.modality}),
            "chosen": chosen,
            "rules": [{"name": r.name, "matches": why is None, "why": why or "matches"} for r, why in explained],
        }

    def recent_studies() -> list[dict[str, Any]]:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(studies.c.study_uid, studies.c.state, studies.c.last_received_at, studies.c.calling_ae)
                .where(studies.c.state != "purged")
                .order_by(studies.c.last_received_at.desc())
                .limit(100)
            ).all()
        return [{"study_uid": r[0], "state": r[1], "last_received_at": r[2], "calling_ae": r[3]} for r in rows]

    def config_data() -> dict[str, Any]:
        data: dict[str, Any] = json.loads(settings.model_dump_json())  # SecretStr values dump as "**********"
        return data

    def audit_data(limit: int = 200) -> list[dict[str, Any]]:
        path = settings.node.data_dir / "audit.log"
        if not path.exists():
            return []
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
        out = []
        for line in reversed(lines[-limit:]):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def webhooks_data() -> list[dict[str, Any]]:
        last = ctx.notifier.last if ctx.notifier is not None else {}
        try:
            waiting: dict[str, int] | None = Notifier.waiting(store)
        except Exception as exc:  # the job store is away: the page still shows the webhooks
            log.warning("console: cannot count the waiting notifications: %s", describe_error(exc))
            waiting = None
        return [
            {"name": w.name, "events": [e.value for e in w.events], "custom_template": w.template is not None,
             "last": last.get(w.name), "waiting": None if waiting is None else waiting.get(w.name, 0)}
            for w in settings.notifications.webhooks
        ]

    def test_webhook(user: User, name: str) -> dict[str, Any]:
        hooks = {w.name: w for w in settings.notifications.webhooks}
        if name not in hooks:
            raise HTTPException(404, f"no webhook {name!r}")
        if ctx.notifier is not None:
            outcome = ctx.notifier.send_test(hooks[name])
        else:  # a console without the node's notifier (webhooks added to a file the node has not reloaded)
            once = Notifier(settings, store)
            try:
                outcome = once.send_test(hooks[name])
            finally:
                once.stop()
        audit("console", user=user.name, action="test_webhook", webhook=name, outcome=outcome)
        return {"webhook": name, "outcome": outcome}

    # --- pages -------------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "overview.html", user, data=overview_data(), states=[s.value for s in JobState])

    @app.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page(
        request: Request,
        user: Viewer,
        state: Annotated[list[str], Query()] = [],  # noqa: B006  (FastAPI's way of declaring a repeated parameter)
        date_from: str = "",
        date_to: str = "",
        modality: str = "",
        calling_ae: str = "",
        accession: str = "",
        before: int | None = None,
    ) -> HTMLResponse:
        data = jobs_data(state, date_from, date_to, modality, calling_ae, accession, before)
        filters = {"state": [s for s in state if s], "date_from": date_from, "date_to": date_to,
                   "modality": modality, "calling_ae": calling_ae, "accession": accession}
        next_url = None
        if data["next_before"] is not None:
            next_url = "/jobs?" + urlencode({**filters, "before": data["next_before"]}, doseq=True)
        return page(request, "jobs.html", user, data=data, filters=filters, next_url=next_url,
                    states=[s.value for s in JobState])

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, job_id: int, user: Viewer) -> HTMLResponse:
        job = load_job(job_id)
        audit("console", user=user.name, action="view_job", job=job_id, study=uid_hash(job.study_uid))
        return page(request, "job.html", user, d=job_detail(job), message=request.query_params.get("message"))

    @app.get("/jobs/{job_id}/preview/{sop_instance_uid}.png", include_in_schema=False)
    def preview(job_id: int, sop_instance_uid: str, user: Viewer) -> Response:
        job = load_job(job_id)
        relative = store.instance_file(sop_instance_uid)
        if relative is None or not any(i.sop_instance_uid == sop_instance_uid
                                       for i in store.study_instances(job.study_uid)):
            raise HTTPException(404, "no such image in this job's study")
        numbered = []
        if job.result_path:
            try:
                result = InferenceResult.from_json(Path(job.result_path).read_text(encoding="utf-8"))
                numbered = [(n, f) for n, f in enumerate(result.findings, start=1)
                            if f.source is not None and f.source.sop_instance_uid == sop_instance_uid]
            except (OSError, ValueError, KeyError):
                numbered = []
        try:
            png = render_preview(ctx.spool_root / relative, numbered)
        except PreviewError as exc:
            raise HTTPException(422, f"no preview: {exc}") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.post("/jobs/{job_id}/{action}", include_in_schema=False, dependencies=[Csrf])
    def job_action(job_id: int, action: str, user: Admin) -> Response:
        if action not in ("retry", "cancel"):
            raise HTTPException(404, f"no action {action!r}")
        message = act(user, job_id, action)
        return RedirectResponse(f"/jobs/{job_id}?message={quote(message)}", status_code=303)

    @app.get("/destinations", response_class=HTMLResponse, include_in_schema=False)
    def destinations_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "destinations.html", user, destinations=destinations_data(), echo=None)

    @app.post("/destinations/{name}/echo", response_class=HTMLResponse, include_in_schema=False,
              dependencies=[Csrf])
    def destination_echo(request: Request, name: str, user: Admin) -> HTMLResponse:
        result = echo_destination(user, name)
        return page(request, "destinations.html", user, destinations=destinations_data(), echo=result)

    @app.get("/rules", response_class=HTMLResponse, include_in_schema=False)
    def rules_page(request: Request, user: Viewer, study: str = "") -> HTMLResponse:
        tested = rule_test(study) if study else None
        rules = [r.model_dump(mode="json") for r in settings.rules]
        return page(request, "rules.html", user, rules=rules, studies=recent_studies(), tested=tested, study=study)

    @app.get("/config", response_class=HTMLResponse, include_in_schema=False)
    def config_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "config.html", user, config=json.dumps(config_data(), indent=2))

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "audit.html", user, entries=audit_data())

    @app.get("/notifications", response_class=HTMLResponse, include_in_schema=False)
    def notifications_page(request: Request, user: Viewer) -> HTMLResponse:
        return page(request, "notifications.html", user, webhooks=webhooks_data(), tested=None)

    @app.post("/notifications/{name}/test", response_class=HTMLResponse, include_in_schema=False,
              dependencies=[Csrf])
    def notifications_test(request: Request, name: str, user: Admin) -> HTMLResponse:
        tested = test_webhook(user, name)
        return page(request, "notifications.html", user, webhooks=webhooks_data(), tested=tested)

    # --- JSON API ----------------------------------------------------------------------------------------------

    @app.get("/api/me", tags=["api"])
    def api_me(user: Viewer) -> dict[str, Any]:
        return {"name": user.name, "role": user.role.value}

    @app.get("/api/overview", tags=["api"])
    def api_overview(user: Viewer) -> dict[str, Any]:
        return overview_data()

    @app.get("/api/jobs", tags=["api"])
    def api_jobs(
        user: Viewer,
        state: Annotated[list[str], Query()] = [],  # noqa: B006
        date_from: str = "",
        date_to: str = "",
        modality: str = "",
        calling_ae: str = "",
        accession: str = "",
        before: int | None = None,
    ) -> dict[str, Any]:
        """Jobs, newest first, 50 a page; ``next_before`` is the ``before`` of the next page (None: the last)."""
        return jobs_data(state, date_from, date_to, modality, calling_ae, accession, before)

    @app.get("/api/jobs/{job_id}", tags=["api"])
    def api_job(job_id: int, user: Viewer) -> dict[str, Any]:
        job = load_job(job_id)
        audit("console", user=user.name, action="view_job", job=job_id, study=uid_hash(job.study_uid), api=True)
        return job_detail(job)

    @app.post("/api/jobs/{job_id}/retry", tags=["api"], dependencies=[Csrf])
    def api_retry(job_id: int, user: Admin) -> dict[str, str]:
        return {"detail": act(user, job_id, "retry")}

    @app.post("/api/jobs/{job_id}/cancel", tags=["api"], dependencies=[Csrf])
    def api_cancel(job_id: int, user: Admin) -> dict[str, str]:
        return {"detail": act(user, job_id, "cancel")}

    @app.get("/api/destinations", tags=["api"])
    def api_destinations(user: Viewer) -> list[dict[str, Any]]:
        return destinations_data()

    @app.post("/api/destinations/{name}/echo", tags=["api"], dependencies=[Csrf])
    def api_echo(name: str, user: Admin) -> dict[str, Any]:
        return echo_destination(user, name)

    @app.get("/api/rules", tags=["api"])
    def api_rules(user: Viewer) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in settings.rules]

    @app.get("/api/rules/test", tags=["api"])
    def api_rule_test(study: str, user: Viewer) -> dict[str, Any]:
        return rule_test(study)

    @app.get("/api/config", tags=["api"])
    def api_config(user: Viewer) -> dict[str, Any]:
        return config_data()

    @app.get("/api/audit", tags=["api"])
    def api_audit(user: Viewer, limit: int = 200) -> list[dict[str, Any]]:
        return audit_data(max(1, min(limit, 2000)))

    @app.get("/api/webhooks", tags=["api"])
    def api_webhooks(user: Viewer) -> list[dict[str, Any]]:
        return webhooks_data()

    @app.post("/api/webhooks/{name}/test", tags=["api"], dependencies=[Csrf])
    def api_webhook_test(name: str, user: Admin) -> dict[str, Any]:
        return test_webhook(user, name)

    return app


def _peer(destination: Any) -> str:
    """Where a destination sends: AE@host:port (DIMSE), the service URL (DICOMweb), or back to the sender."""
    kind = getattr(destination, "kind", "dimse")
    if kind == "dicomweb":
        return str(destination.url)
    if kind == "sender":
        return "the AE that sent the study (known_aes)"
    tls = " (TLS)" if destination.tls else ""
    return f"{destination.ae_title}@{destination.host}:{destination.port}{tls}"
