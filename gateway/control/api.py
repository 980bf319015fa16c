"""The operator HTTP API (aiohttp).

Roles: `operator` changes policy, `dpo` answers data-subject requests,
`viewer` reads. Every endpoint but /healthz needs a bearer token; tokens are
configured as SHA-256 hashes and compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.config import ControlConfig, TokenConfig
from gateway.control.audit import AuditRecord
from gateway.control.signing import BundleError, PolicyBundle, load_public_key, verify_bundle
from gateway.control.signing import key_id as public_key_id
from gateway.core.state import VIN_SCHEMA_PATTERN, is_valid_vin
from gateway.policy import (
    CompiledPolicy,
    PolicyError,
    StreamSpec,
    VersionConflict,
    action_name,
    declared_recipients,
    parse_policy,
    stream_routes,
    version_key,
)
from gateway.service import GatewayService
from gateway.store import EgressCount, IncidentHold, StoredPolicy

log = logging.getLogger("gateway.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVICE_KEY = web.AppKey("service", GatewayService)
CONFIG_KEY = web.AppKey("control_config", ControlConfig)
TRUSTED_KEY = web.AppKey("trusted_keys", dict[str, Ed25519PublicKey])
CALLER_KEY = web.RequestKey("caller", TokenConfig)  # who authenticated this request
SECONDS_PER_DAY = 86400

# path template -> method -> roles allowed. One table: routing, access control
# and the OpenAPI document all read it, so they cannot drift apart.
READ = ("viewer", "operator", "dpo")
# An incident hold is time-bounded: longer needs a new, separately audited one.
MAX_INCIDENT_HOLD_DAYS = 90


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    roles: tuple[str, ...]  # empty: no token needed
    summary: str
    handler_name: str
    body: dict[str, dict[str, Any]] | None = None  # JSON body: property -> schema (all required)
    errors: tuple[tuple[int, str], ...] = ()  # documented refusals besides 400/401/403 basics


_BUNDLE_BODY = {
    "format": {"type": "string"},
    "key_id": {"type": "string"},
    "signature": {"type": "string", "contentEncoding": "base64"},
    "policy": {"type": "string"},
}


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", (), "Process is up", "healthz"),
    Route("GET", "/readyz", READ, "Brokers connected, store writable, policy loaded", "readyz"),
    Route("GET", "/metrics", READ, "Prometheus metrics", "metrics"),
    Route("GET", "/v1/openapi.json", READ, "This API description", "openapi"),
    Route(
        "GET",
        "/v1/policy",
        READ,
        "Active policy: version, digest, signer, time applied; stored versions; the"
        " configured policy file when newer than the active one (offered: sign and push it)",
        "get_policy",
    ),
    Route(
        "PUT",
        "/v1/policy",
        ("operator",),
        "Push a signed policy bundle",
        "put_policy",
        body=_BUNDLE_BODY,
        errors=(
            (400, "malformed bundle"),
            (403, "unknown signing key or bad signature"),
            (409, "version not newer than every stored one (or names another text)"),
            (422, "policy does not validate"),
        ),
    ),
    Route(
        "POST",
        "/v1/policy/rollback",
        ("operator",),
        "Re-activate a stored policy version",
        "rollback",
        body={"version": {"type": "string"}},
        errors=(
            (404, "version not stored"),
            (409, "already active"),
            (422, "stored policy no longer validates"),
        ),
    ),
    Route("GET", "/v1/audit/verify", READ, "Verify the audit ledger's hash chain", "audit_verify"),
    Route(
        "GET",
        "/v1/vehicles/{vin}/privacy",
        ("dpo",),
        "Current settings and open windows",
        "privacy",
    ),
    Route(
        "GET",
        "/v1/vehicles/{vin}/export",
        ("dpo",),
        "Access/portability export (Art. 15, 20)",
        "export",
    ),
    Route(
        "POST",
        "/v1/vehicles/{vin}/restriction",
        ("dpo",),
        "Restrict processing (Art. 18)",
        "restrict",
    ),
    Route(
        "DELETE", "/v1/vehicles/{vin}/restriction", ("dpo",), "Lift the restriction", "unrestrict"
    ),
    Route("DELETE", "/v1/vehicles/{vin}", ("dpo",), "Erase the vehicle's data (Art. 17)", "erase"),
    Route(
        "POST",
        "/v1/vehicles/{vin}/objections/{feature}",
        ("dpo",),
        "Art. 21 objection: a legitimate-interest feature stops for this car, whatever its"
        " toggle says (durable, audited)",
        "object",
        errors=(
            (404, "no such feature"),
            (409, "the feature's legal basis is not legitimate interest"),
        ),
    ),
    Route(
        "DELETE",
        "/v1/vehicles/{vin}/objections/{feature}",
        ("dpo",),
        "Withdraw an objection",
        "withdraw_objection",
        errors=(
            (404, "no such feature"),
            (409, "the feature's legal basis is not legitimate interest"),
        ),
    ),
    Route(
        "POST",
        "/v1/vehicles/{vin}/ownership-change",
        ("dpo",),
        "The car has a new owner: the previous owner's data leaves the gateway, consent is"
        " unknown again, new pseudonyms and grid offset, the backend and the car are told",
        "ownership_change",
    ),
    Route(
        "GET",
        "/v1/dead-letters",
        ("operator",),
        "Undeliverable messages (metadata only; content stays sealed). ?after=ID&limit=N",
        "list_dead_letters",
    ),
    Route(
        "DELETE",
        "/v1/dead-letters",
        ("operator",),
        "Purge dead letters: ?id=N (repeatable), or ?all=true",
        "delete_dead_letters",
    ),
    Route(
        "POST",
        "/v1/dead-letters/redrive",
        ("operator",),
        "Send dead letters again (?id=N repeatable, else the oldest 1000); vehicle messages"
        " are decided again under current consent",
        "redrive_dead_letters",
    ),
    Route(
        "POST",
        "/v1/incidents",
        ("operator",),
        "Open a security-incident hold: protocol data (the access log) is not purged for"
        f" hold_days (1..{MAX_INCIDENT_HOLD_DAYS}; notice: 7 days unless an incident)",
        "open_incident",
        body={"reason": {"type": "string"}, "hold_days": {"type": "number"}},
    ),
    Route("GET", "/v1/incidents", ("operator", "dpo"), "Incident holds", "list_incidents"),
    Route(
        "DELETE",
        "/v1/incidents/{id}",
        ("operator",),
        "Close an incident hold (the purge resumes)",
        "close_incident",
        errors=((404, "no open hold with this id"),),
    ),
)


def load_trusted_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Key id -> operator public key (OSError, ValueError when one cannot be loaded)."""
    trusted = {}
    for path in paths:
        key = load_public_key(path)
        trusted[public_key_id(key)] = key
    return trusted


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(header: str | None, tokens: list[TokenConfig]) -> TokenConfig | None:
    """Bearer token -> its configured entry. Compares against every entry so
    the time taken does not reveal which (or whether one) matched."""
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    # RFC 7235: the auth-scheme is case-insensitive.
    if scheme.lower() != "bearer" or not credentials:
        return None
    presented = hash_token(credentials)
    found = None
    for token in tokens:
        if hmac.compare_digest(presented, token.sha256):
            found = token
    return found


def _error(status: int, reason: str, **extra: Any) -> web.Response:
    return web.json_response({"error": reason, **extra}, status=status)


class ControlPlane:
    def __init__(self, service: GatewayService, config: ControlConfig) -> None:
        self.service = service
        self.config = config
        self.tokens = config.all_tokens()  # ConfigError: tokens_file unreadable or invalid
        self.trusted = load_trusted_keys(config.trusted_keys)
        self._runner: web.AppRunner | None = None
        self._probe_runner: web.AppRunner | None = None
        self._purge_task: asyncio.Task[None] | None = None

    def reload(self, tokens: list[TokenConfig], trusted: dict[str, Ed25519PublicKey]) -> None:
        """New tokens and trusted keys for every request from now on (SIGHUP)."""
        self.tokens = list(tokens)
        self.trusted.clear()  # the same dict the app holds
        self.trusted.update(trusted)

    # ---------------------------------------------------------------- app

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._access_middleware])
        app[SERVICE_KEY] = self.service
        app[CONFIG_KEY] = self.config
        app[TRUSTED_KEY] = self.trusted
        for route in ROUTES:
            app.router.add_route(route.method, route.path, getattr(self, route.handler_name))
        return app

    async def start(self) -> None:
        if self.config.probe_listen:
            await self._start_probes(self.config.probe_listen)
        if not self.config.listen:
            return
        host, _, port = self.config.listen.rpartition(":")
        ssl_context = None
        if self.config.tls_cert and self.config.tls_key:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self._runner = web.AppRunner(self.build_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), ssl_context=ssl_context)
        await site.start()
        self._purge_task = asyncio.create_task(self._purge_periodically())
        log.info(
            "control plane listening on %s:%d%s", host, self.port, " (TLS)" if ssl_context else ""
        )

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return _bound_port(self._runner)

    async def _start_probes(self, listen: str) -> None:
        """Liveness and readiness only, for probes that cannot carry a token
        or TLS; nothing else is reachable there."""
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        self._probe_runner = web.AppRunner(app, access_log=None)
        await self._probe_runner.setup()
        host, _, port = listen.rpartition(":")
        await web.TCPSite(self._probe_runner, host.strip("[]"), int(port)).start()
        log.info("probe listener on %s:%d", host, self.probe_port)

    @property
    def probe_port(self) -> int:
        return _bound_port(self._probe_runner)

    async def stop(self) -> None:
        if self._probe_runner is not None:
            await self._probe_runner.cleanup()
        if self._purge_task is not None:
            self._purge_task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def purge_protocol_data(self) -> int:
        """Protocol data (client IPs) is kept at most the configured days,
        unless an incident hold is open (notice: "unless a security-relevant
        incident"): then nothing is purged until it ends."""
        now = time.time()
        holds = [h for h in await self._store(self.service.store.incidents) if h.active(now)]
        if holds:
            log.info("access-log purge held by incident %s", ", ".join(str(h.id) for h in holds))
            return 0
        cutoff = now - self.config.access_log_retention_days * SECONDS_PER_DAY
        removed = int(await self._store(self.service.store.purge_access_log, cutoff))
        if removed:
            log.info("purged %d access-log entries older than retention", removed)
        return removed

    async def _purge_periodically(self) -> None:
        while True:
            await self.purge_protocol_data()
            await asyncio.sleep(3600)

    async def _store(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ---------------------------------------------------------- middleware

    @web.middleware
    async def _access_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        route = _route_of(request)
        caller = None
        if route is None:
            response: web.StreamResponse = _error(404, "no such endpoint")
            caller = authenticate(request.headers.get("Authorization"), self.tokens)
            if caller is None:
                # Anyone can send these (scanners): logging them would let an
                # unauthenticated client grow the database at will.
                return response
        elif not route.roles:
            response = await handler(request)
        else:
            caller = authenticate(request.headers.get("Authorization"), self.tokens)
            if caller is None:
                response = _error(401, "missing or unknown bearer token")
                response.headers["WWW-Authenticate"] = "Bearer"
            elif caller.role not in route.roles:
                response = _error(403, f"role {caller.role!r} may not {route.method} {route.path}")
            else:
                request[CALLER_KEY] = caller
                response = await handler(request)
        if route is None or route.roles:  # unauthenticated 404s returned above
            try:
                await self._store(
                    self.service.store.log_access,
                    time.time(),
                    request.remote or "",
                    caller.name if caller else "",
                    request.method,
                    # The VIN as the ledger names the car: its keyed hash.
                    self.service.redact_vins(request.path),
                    response.status,
                )
            except Exception as exc:  # a full disk must not turn every answer into a 500
                log.error("access log not written: %s", exc)
        return response

    # -------------------------------------------------------------- health

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        service = self.service
        checks = service.readiness()
        try:
            await self._store(service.store.check_writable)
            checks["store_writable"] = service.store_writable
        except Exception as exc:
            log.error("readiness: consent store not writable: %s", exc)
            checks["store_writable"] = False
        service.metrics.store_writable.set(1 if checks["store_writable"] else 0)
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    # -------------------------------------------------------------- policy

    def _policy_view(self, record: StoredPolicy | None = None) -> dict[str, Any]:
        """The active policy, or the one `record` made active."""
        if record is not None:
            return {
                "version": record.version,
                "digest": record.digest,
                "signer": record.signer,
                "applied_at": record.applied_at,
            }
        policy = self.service.ctx.policy
        active = self.service.policy_record
        return {
            "version": policy.version,
            "digest": policy.digest,
            "signer": active.signer if active else "config",
            "applied_at": active.applied_at if active else None,
        }

    async def get_policy(self, request: web.Request) -> web.Response:
        stored = await self._store(self.service.store.policies)
        view = self._policy_view()
        view["offered"] = self.service.offered_policy()
        view["stored_versions"] = [
            {
                "version": p.version,
                "digest": p.digest,
                "signer": p.signer,
                "active": p.active,
                "pushed_at": p.pushed_at,
                "applied_at": p.applied_at,
            }
            for p in stored
        ]
        return web.json_response(view)

    async def put_policy(self, request: web.Request) -> web.Response:
        caller: TokenConfig = request[CALLER_KEY]
        raw = await request.read()
        try:
            bundle = PolicyBundle.from_json(raw)
        except BundleError as exc:
            return _error(400, str(exc))
        try:
            verify_bundle(bundle, self.trusted)
        except BundleError as exc:
            return _error(403, str(exc))
        try:
            policy = parse_policy(bundle.policy_yaml, source=f"bundle signed by {bundle.key_id}")
            self.service.check_egress(policy)
        except PolicyError as exc:
            return _error(
                422,
                "policy is invalid",
                problems=[{"path": path, "problem": problem} for path, problem in exc.problems],
            )
        try:
            record = await self.service.push_policy(policy, bundle.key_id, caller.name)
        except VersionConflict as exc:  # checked against the store, in the decision loop
            return _error(409, str(exc))
        return web.json_response(self._policy_view(record), status=200)

    async def rollback(self, request: web.Request) -> web.Response:
        caller: TokenConfig = request[CALLER_KEY]
        try:
            body = await request.json()
            version = str(body["version"])
        except (ValueError, KeyError, TypeError):
            return _error(400, 'body must be JSON {"version": "..."}')
        stored = {p.version: p for p in await self._store(self.service.store.policies)}
        target = stored.get(version)
        if target is None:
            return _error(404, f"no stored policy version {version!r}", stored=sorted(stored))
        try:
            policy = parse_policy(target.yaml, source=f"stored policy {version}")
            self.service.check_egress(policy)
        except PolicyError as exc:  # stored policies validated once; the schema may have moved on
            return _error(
                422,
                f"stored policy {version} no longer validates with this gateway release;"
                " it cannot be rolled back to",
                problems=[{"path": path, "problem": problem} for path, problem in exc.problems],
            )
        try:
            record = await self.service.rollback_policy(policy, target, caller.name)
        except VersionConflict as exc:
            return _error(409, str(exc))
        except KeyError:
            return _error(404, f"no stored policy version {version!r}", stored=sorted(stored))
        return web.json_response(self._policy_view(record))

    async def audit_verify(self, request: web.Request) -> web.Response:
        result = await self._store(self.service.store.verify_audit)
        return web.json_response(
            {
                "ok": result.ok,
                "entries": result.entries,
                "head": result.head,
                "problems": result.problems,
            },
            status=200 if result.ok else 409,
        )

    # ---------------------------------------------------- data-subject rights

    def _vin(self, request: web.Request) -> str | None:
        vin = request.match_info["vin"]
        return vin if is_valid_vin(vin) else None

    async def privacy(self, request: web.Request) -> web.Response:
        vin = self._vin(request)
        if vin is None:
            return _error(400, "not a valid VIN")
        subject = self.service.audit_subject(vin)  # the store never holds the VIN
        history = await self._store(self.service.store.history, subject)
        restriction = await self._store(self.service.store.restriction, subject)
        state = self.service.state_of(vin)
        now = time.time()
        current = history[-1] if history else None
        return web.json_response(
            {
                "vin": vin,
                "known": state is not None,
                "settings": None
                if current is None
                else {
                    "revision": current.revision,
                    "privacy_mode": current.privacy_mode,
                    "location": current.location.name,
                    "features": current.features,
                    "applied_at": current.applied_at,
                    "policy_version": current.policy_version,
                },
                "enforced_features": sorted(state.enabled) if state else [],
                "restricted": restriction is not None or self.service.is_restricted(vin),
                "restricted_since": restriction[0] if restriction else None,
                "open_windows": (
                    [{"window": "find_my_car", "open_until": state.window_until}]
                    if state is not None and state.window_open(now)
                    else []
                ),
            }
        )

    async def export(self, request: web.Request) -> web.Response:
        vin = self._vin(request)
        if vin is None:
            return _error(400, "not a valid VIN")
        await self.service.accounting.flush()
        store = self.service.store
        subject = self.service.audit_subject(vin)  # the store never holds the VIN
        history = await self._store(store.history, subject)
        counts = await self._store(store.egress_counts, subject)
        restriction = await self._store(store.restriction, subject)
        policy = self.service.ctx.policy
        by_day: dict[str, dict[str, int]] = {}
        for c in counts:
            by_day.setdefault(c.day, {})
            key = f"{c.feature}|{c.stream}"
            by_day[c.day][key] = by_day[c.day].get(key, 0) + c.count
        streams = policy.streams
        return self._export_response(
            request,
            {
                "format": "privacy-gateway-export/1",
                "vin": vin,
                "generated_at": time.time(),
                "settings_history": [
                    {
                        "revision": h.revision,
                        "applied_at": h.applied_at,
                        "source": h.source,
                        "privacy_mode": h.privacy_mode,
                        "location": h.location.name,
                        "features": h.features,
                        "policy_version": h.policy_version,
                    }
                    for h in history
                ],
                "sent_to_backend": [
                    {
                        "day": c.day,
                        "feature": c.feature,
                        "category": c.stream,
                        "legal_basis": _legal_basis(policy, c.feature),
                        "policy_version": c.policy_version,
                        "messages": c.count,
                    }
                    for c in counts
                ],
                "policy_versions_applied": sorted(
                    {c.policy_version for c in counts} | {h.policy_version for h in history},
                    key=version_key,
                ),
                "retention": [
                    {
                        "category": s.key,
                        "feature": s.feature,
                        "legal_basis": s.legal_basis,
                        "retention_days": s.retention_days,
                    }
                    for s in streams
                ],
                "streams": _stream_answers(policy, counts),
                "restricted": restriction is not None or self.service.is_restricted(vin),
            },
        )

    @staticmethod
    def _export_response(request: web.Request, export: dict[str, Any]) -> web.Response:
        """JSON (Art. 20: machine-readable), or `?format=html` for the person."""
        if request.query.get("format") == "html":
            return web.Response(text=render_export_html(export), content_type="text/html")
        return web.json_response(export)

    async def restrict(self, request: web.Request) -> web.Response:
        return await self._set_restriction(request, True)

    async def unrestrict(self, request: web.Request) -> web.Response:
        return await self._set_restriction(request, False)

    async def _set_restriction(self, request: web.Request, on: bool) -> web.Response:
        vin = self._vin(request)
        if vin is None:
            return _error(400, "not a valid VIN")
        caller: TokenConfig = request[CALLER_KEY]
        changed = await self.service.set_restriction(vin, on, caller.name)
        return web.json_response({"vin": vin, "restricted": on, "changed": changed})

    async def object(self, request: web.Request) -> web.Response:
        return await self._objection(request, True)

    async def withdraw_objection(self, request: web.Request) -> web.Response:
        return await self._objection(request, False)

    async def _objection(self, request: web.Request, objected: bool) -> web.Response:
        vin = self._vin(request)
        if vin is None:
            return _error(400, "not a valid VIN")
        name = request.match_info["feature"]
        feature = self.service.ctx.policy.document.features.get(name)
        if feature is None:
            return _error(404, f"no feature {name!r} in the policy")
        if feature.legal_basis != "legitimate_interest":
            return _error(
                409,
                f"{name!r} rests on {feature.legal_basis}, not legitimate interest: an"
                " objection (Art. 21) does not apply (consent is withdrawn with the car's toggle)",
            )
        caller: TokenConfig = request[CALLER_KEY]
        changed = await self.service.set_objection(vin, name, objected, caller.name)
        return web.json_response(
            {"vin": vin, "feature": name, "objected": objected, "changed": changed}
        )

    async def ownership_change(self, request: web.Request) -> web.Response:
        vin = self._vin(request)
        if vin is None:
            return _error(400, "not a valid VIN")
        caller: TokenConfig = request[CALLER_KEY]
        result = await self.service.change_ownership(vin, caller.name)
        return web.json_response({"vin": vin, **result})

    async def erase(self, request: web.Request) -> web.Response:
        vin = self._vin(request)
        if vin is None:
            return _error(400, "not a valid VIN")
        caller: TokenConfig = request[CALLER_KEY]
        result = await self.service.erase_vehicle(vin, caller.name)
        return web.json_response({"vin": vin, "erased": True, **result})

    # -------------------------------------------------------------- dead letters

    @staticmethod
    def _incident_view(hold: IncidentHold, now: float) -> dict[str, Any]:
        return {
            "id": hold.id,
            "opened_at": hold.opened_at,
            "until": hold.until,
            "reason": hold.reason,
            "actor": hold.actor,
            "closed_at": hold.closed_at,
            "active": hold.active(now),
        }

    async def open_incident(self, request: web.Request) -> web.Response:
        caller: TokenConfig = request[CALLER_KEY]
        try:
            body = await request.json()
            reason = str(body["reason"]).strip()
            days = float(body["hold_days"])
        except (ValueError, KeyError, TypeError):
            return _error(400, 'body must be JSON {"reason": "...", "hold_days": N}')
        if not reason or len(reason) > 500:
            return _error(400, "reason: 1 to 500 characters")
        if not 0 < days <= MAX_INCIDENT_HOLD_DAYS:
            return _error(400, f"hold_days: more than 0, at most {MAX_INCIDENT_HOLD_DAYS}")
        now = time.time()
        until = now + days * SECONDS_PER_DAY
        record = AuditRecord(
            caller.name, "incident_hold_opened", "", {"reason": reason, "until": until}, now
        )
        hold_id = await self._store(self.service.store.open_incident, now, until, reason, record)
        hold = IncidentHold(hold_id, now, until, reason, caller.name, None)
        return web.json_response(self._incident_view(hold, now), status=201)

    async def list_incidents(self, request: web.Request) -> web.Response:
        now = time.time()
        holds = await self._store(self.service.store.incidents)
        return web.json_response({"incidents": [self._incident_view(h, now) for h in holds]})

    async def close_incident(self, request: web.Request) -> web.Response:
        caller: TokenConfig = request[CALLER_KEY]
        try:
            hold_id = int(request.match_info["id"])
        except ValueError:
            return _error(400, "id must be a number")
        now = time.time()
        record = AuditRecord(caller.name, "incident_hold_closed", "", {"id": hold_id}, now)
        if not await self._store(self.service.store.close_incident, hold_id, now, record):
            return _error(404, f"no open incident hold {hold_id}")
        hold = next(h for h in await self._store(self.service.store.incidents) if h.id == hold_id)
        return web.json_response(self._incident_view(hold, now))

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
            limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        except ValueError:
            return _error(400, "after and limit must be integers")
        store = self.service.store
        letters = await self._store(store.dead_letters, None, after, limit)
        total = await self._store(store.dead_letter_count)
        return web.json_response(
            {
                "total": total,
                "dead_letters": [
                    {
                        "id": d.id,
                        "created_at": d.created_at,
                        "expires_at": d.expires_at,
                        "subject": d.subject[:16],
                        "kind": d.kind.value,
                        "edge": d.edge,
                        "stream": d.stream,
                        "feature": d.feature,
                        "reason": d.reason,
                        "code": d.code,
                        "attempts": d.attempts,
                        "size": d.size,
                        "recipient": d.recipient,
                    }
                    for d in letters
                ],
                "next_after": letters[-1].id if len(letters) == limit else None,
            }
        )

    async def delete_dead_letters(self, request: web.Request) -> web.Response:
        ids = _ids(request)
        if ids is False:
            return _error(400, "id must be an integer (at most 1000 of them)")
        if not ids and request.query.get("all") != "true":
            # A misspelt parameter must not purge everything.
            return _error(400, "give ?id=N (repeatable), or ?all=true to purge every dead letter")
        removed = await self.service.delete_dead_letters(ids or None)
        return web.json_response({"deleted": removed})

    async def redrive_dead_letters(self, request: web.Request) -> web.Response:
        ids = _ids(request)
        if ids is False:
            return _error(400, "id must be an integer (at most 1000 of them)")
        return web.json_response(await self.service.redrive_dead_letters(ids or None))


def _ids(request: web.Request) -> list[int] | Literal[False]:
    try:
        ids = [int(v) for v in request.query.getall("id", [])]
    except ValueError:
        return False
    return ids if len(ids) <= 1000 else False


def _legal_basis(policy: Any, feature: str) -> str:
    spec = policy.features.get(feature.partition(".")[0])
    return str(spec.legal_basis) if spec else ""


def _bound_port(runner: web.AppRunner | None) -> int:
    assert runner is not None
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("not listening")


def _route_of(request: web.Request) -> Route | None:
    info = request.match_info
    resource = info.route.resource
    if resource is None:
        return None
    template = resource.canonical
    for route in ROUTES:
        if route.path == template and route.method == request.method:
            return route
    return None


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description generated from ROUTES (a test keeps it true)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler_name,
            "responses": {"200": {"description": "OK"}},
        }
        if route.roles:
            op["security"] = [{"bearer": []}]
            op["x-roles"] = list(route.roles)
            op["responses"].update(
                {
                    "401": {"description": "no or unknown token"},
                    "403": {"description": "role not allowed"},
                }
            )
        if "{vin}" in route.path:
            op["parameters"] = [
                {
                    "name": "vin",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": VIN_SCHEMA_PATTERN},
                }
            ]
            op["responses"]["400"] = {"description": "not a valid VIN"}
        if route.body is not None:
            schema = {"type": "object", "required": list(route.body), "properties": route.body}
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        for status, description in route.errors:
            op["responses"][str(status)] = {"description": description}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Privacy gateway control plane", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


# What a field of a stream carries, in words (the export's "categories").
_FIELD_WORDS = {
    "position": "location: as sent (precise), a grid point near it (approximate), nothing (off)",
    "place": "location of a place the car was: as position",
    "destination": "a destination: as position, coarsened on its own",
    "remove": "never sent",
    "keep": "sent as the car sent it",
    "pseudonymize": "replaced by a keyed pseudonym",
    "truncate_ip": "network address, truncated (IPv4 /24, IPv6 /48)",
    "odometer": "mileage: frozen with the coarse location (approximate), nothing (off)",
    "generalize": "rounded to a step (approximate), nothing (off)",
    "enum": "only as one of a fixed list of values",
    "place_text": "text that may name a place: sent only under precise location",
    "place_id": "a place identifier: sent only under precise location",
}


def _stream_answers(policy: CompiledPolicy, counts: list[EgressCount]) -> list[dict[str, Any]]:
    """Art. 15 per stream: purpose, categories of data, legal basis, recipients,
    retention, and how many messages of the car were sent."""
    sent: dict[str, int] = {}
    for c in counts:
        sent[c.stream] = sent.get(c.stream, 0) + c.count
    answers = []
    for key, spec in policy.document.streams.items():
        feature = policy.document.features.get(spec.feature.partition(".")[0])
        answers.append(
            {
                "stream": key,
                "feature": spec.feature,
                "purpose": feature.description if feature is not None else "",
                "legal_basis": feature.legal_basis if feature is not None else "",
                "retention_days": spec.retention_days,
                "recipients": _recipients(policy, spec),
                "data": {
                    name: _FIELD_WORDS.get(action_name(action), action_name(action))
                    for name, action in spec.fields.items()
                },
                "messages_sent": sum(n for s, n in sent.items() if _stream_matches(key, s)),
            }
        )
    return answers


_TRANSFER_WORDS = {
    "none": "no transfer outside the EEA",
    "adequacy": "third country with an adequacy decision (Art. 45)",
    "scc": "third country, standard contractual clauses (Art. 46(2)(c))",
    "bcr": "third country, binding corporate rules (Art. 47)",
    "explicit_consent": "third country without adequate protection, on your explicit"
    " consent (Art. 49(1)(a))",
}


def _recipients(policy: CompiledPolicy, spec: StreamSpec) -> list[dict[str, Any]]:
    """Who gets a stream (Art. 15(1)(c)) and under which transfer safeguard (Art. 15(2))."""
    declared = declared_recipients(policy.document)
    out = []
    for rid, route in stream_routes(policy.document, spec).items():
        r = declared.get(rid)
        if r is None:
            continue
        out.append(
            {
                "id": rid,
                "name": r.name,
                "role": r.role,
                "region": r.region,
                "transfer_basis": r.transfer_basis,
                "transfer": _TRANSFER_WORDS[r.transfer_basis],
                "identified_by": "pseudonym"
                if spec.pseudonymize_vin or route.pseudonymize_vin
                else "VIN",
                "not_sent": list(route.remove),
            }
        )
    return out


def _recipient_words(r: dict[str, Any]) -> str:
    words = f"{r['name']} ({r['role']}, {r['region'] or 'region not declared'}; {r['transfer']}"
    words += "; under a pseudonym, never the VIN" if r["identified_by"] == "pseudonym" else ""
    if r["not_sent"]:
        words += "; without " + ", ".join(r["not_sent"])
    return words + ")"


def _stream_matches(key: str, stream: str) -> bool:
    if "{" not in key:
        return key == stream
    head = key.split("{", 1)[0]
    return stream.startswith(head)


def render_export_html(export: dict[str, Any]) -> str:
    """The export as a page a data subject can read (everything escaped)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(s['stream'])}</td><td>{e(s['purpose'])}</td><td>{e(s['legal_basis'])}</td>"
        f"<td>{e('; '.join(_recipient_words(r) for r in s['recipients']))}</td>"
        f"<td>{s['retention_days']} days</td>"
        f"<td>{s['messages_sent']}</td><td><ul>"
        + "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in s["data"].items())
        + "</ul></td></tr>"
        for s in export["streams"]
    )
    history = "".join(
        f"<tr><td>{h['revision']}</td><td>{e(_utc(h['applied_at']))}</td>"
        f"<td>{'on' if h['privacy_mode'] else 'off'}</td><td>{e(h['location'])}</td>"
        f"<td>{e(', '.join(f'{k}={v}' for k, v in sorted(h['features'].items())))}</td></tr>"
        for h in export["settings_history"]
    )
    days = "".join(
        f"<tr><td>{e(c['day'])}</td><td>{e(c['category'])}</td><td>{e(c['legal_basis'])}</td>"
        f"<td>{c['messages']}</td></tr>"
        for c in export["sent_to_backend"]
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Your car's data: {e(export['vin'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}</style></head><body>"
        f"<h1>What the privacy gateway sends about car {e(export['vin'])}</h1>"
        f"<p>Generated {e(_utc(export['generated_at']))}. Processing restricted:"
        f" {'yes' if export['restricted'] else 'no'}.</p>"
        "<h2>Per function: purpose, legal basis, recipients, retention, data</h2>"
        "<table><tr><th>stream</th><th>purpose</th><th>legal basis</th><th>recipients</th>"
        "<th>kept</th><th>messages sent</th><th>data</th></tr>"
        f"{rows}</table>"
        "<h2>Your privacy settings over time</h2><table><tr><th>revision</th><th>applied</th>"
        f"<th>privacy mode</th><th>location</th><th>functions</th></tr>{history}</table>"
        "<h2>Messages sent per day</h2><table><tr><th>day</th><th>stream</th>"
        f"<th>legal basis</th><th>messages</th></tr>{days}</table></body></html>"
    )


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
