"""Publishing a trained task: into a local store directory, or to a running service over HTTP.

Both write the same two files `write_bundle` would (`adapter_config.json`,
`adapter_model.safetensors`), so a task trained here is served exactly as stored.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import httpx
import torch

from service.engine.bundle import CONFIG, WEIGHTS, bundle_bytes, content_version, write_bundle
from service.methods.base import TaskWeights
from training.full import FullArtifacts, save_full
from training.trainer import TrainResult

TOKEN_ENV = "ADAPTSERVE_ADMIN_TOKEN"
SERVER_TOKENS_ENV = "ADAPTSERVE_ADMIN_TOKENS"  # the server's list (service.settings), comma-separated
# Uploads are a few hundred KB; the server validates the bundle against the backbone before
# answering, which takes well under a second. 60 s leaves room for a slow link or a busy server.
DEFAULT_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The task could not be published; the message says why and what to do."""


class NoAnswer(PublishError):
    """The request was sent in full and no answer came in time: the server may have done it."""


def require_finite(name: str, weights: Mapping[str, TaskWeights]) -> None:
    """Refuse to publish weights holding NaN or Inf: the service could never load them (every
    bundle tensor is checked) and a task of them would have no sane answer anyway."""
    bad = sorted(k for w in weights.values() for k, t in w.tensors().items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise PublishError(
            f"task {name!r} was not published: its weights hold NaN or Inf ({', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); training diverged (lower --lr) "
            "or an option was out of range"
        )


def save_to_store(result: TrainResult, store: str | os.PathLike[str]) -> str:
    """Write the task's bundle into `<store>/<task>/<version>/` and make it active; the version."""
    if result.config.method == "full":
        raise PublishError(
            "full fine-tuning changes the shared backbone, so it is not a task the service can load "
            "next to others; it is trained as a baseline. Pass --publish-full DIR to write the tuned "
            "backbone and its head anyway"
        )
    require_finite(result.name, result.weights)
    require_loadable(result.name, result.bundle_config(), result.weights, result.engine.backbone)
    return write_bundle(Path(store), result.name, result.bundle_config(), result.weights)


def stored_line(store: Path, task: str, version: str) -> str:
    """What a `--store` publish reports. A service on that store serves the version at once, unless
    its registry is Redis (`ADAPTSERVE_REDIS_URL`): there Redis, not `ACTIVE`, says what serves, and
    a write into the store does not reach it, so the line names the call that does."""
    return (f"published {task}@{version} to {store / task / version} (active in the store; a service on a Redis "
            f"registry serves it once activated: POST /v1/tasks/{task}/versions/{version}/activate)")


def require_loadable(name: str, config: Mapping, weights: Mapping[str, TaskWeights], backbone) -> None:
    """PublishError unless the bundle reads back the way the service reads it (`read_bundle`
    against the backbone it was made for). An upload gets this check from the server; a write
    into a store directory has no server in between, and an unloadable version made active there
    takes a serving task down."""
    import tempfile

    from service.engine.bundle import read_bundle
    from service.errors import BundleError

    cfg_b, w_b = bundle_bytes(config, weights)
    with tempfile.TemporaryDirectory(prefix="adaptserve-check-") as tmp:
        (Path(tmp) / CONFIG).write_bytes(cfg_b)
        (Path(tmp) / WEIGHTS).write_bytes(w_b)
        try:
            read_bundle(Path(tmp), backbone.info, name, backbone.tokenizer)
        except BundleError as err:
            raise PublishError(f"the task would not load in the service ({err.message}); nothing was published") from None


def save_full_result(result: TrainResult, out_dir: str | os.PathLike[str]) -> FullArtifacts:
    """`--publish-full`: the fine-tuned backbone folder + a head-only store fingerprinted to it."""
    if result.config.method != "full":
        raise PublishError(f"--publish-full is for --method full; this task was trained with {result.config.method}")
    require_finite(result.name, result.weights)
    return save_full(Path(out_dir), result.name, result.engine.backbone, result.bundle_config(), result.weights)


@dataclass(frozen=True)
class Published:
    url: str  # where the version was created
    version: str  # the server's version id (or the local content hash if it sends none)
    response: dict


def publish_http(result: TrainResult, base_url: str, token: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S) -> Published:
    """POST the bundle to `{base_url}/v1/tasks/{task}/versions` as multipart form data.

    The bearer token comes from `token` or, if None, the environment (`_bearer`)."""
    if result.config.method == "full":
        raise PublishError("full fine-tuning is a baseline and is never uploaded to a service (its backbone "
                           "differs from the one the service runs); use --publish-full DIR to write it locally")
    require_finite(result.name, result.weights)
    cfg_b, w_b = bundle_bytes(result.bundle_config(), result.weights)
    return upload(base_url, result.name, cfg_b, w_b, token, timeout=timeout)


def upload(base_url: str, task: str, config_bytes: bytes, weights_bytes: bytes, token: str | None = None, *,
           timeout: float = DEFAULT_TIMEOUT_S) -> Published:
    """Send one bundle's bytes; raises `PublishError` with a one-line reason on any failure. The
    upload comes after the training, so a failed one keeps the bundle in a temporary folder and
    says how to send it again: a service that went down mid-run costs a re-send, not the run."""
    try:
        return _send(base_url, task, config_bytes, weights_bytes, token, timeout)
    except PublishError as err:
        kept = _keep(task, config_bytes, weights_bytes)
        if kept is None:
            raise
        url = shlex.quote(f"{base_url.rstrip('/')}/v1/tasks/{task}/versions")  # a command to paste into a shell
        files = " ".join(f"-F {shlex.quote(f'{name}=@{kept / name}')}" for name in (CONFIG, WEIGHTS))
        # --fail-with-body: a refused re-send exits non-zero (plain curl exits 0 on a 4xx), showing the reason
        send = f"curl --fail-with-body -H 'Authorization: Bearer <admin token>' {files} {url}"
        if isinstance(err, NoAnswer):
            # The version id is the content hash (`content_version`), and the service answers a version
            # it already holds intact with 200, changing nothing (docs/hotswap.md): a re-send is safe.
            version = content_version(config_bytes, weights_bytes)
            raise PublishError(
                f"{err}, so the server may have stored (and activated) {task}@{version} anyway; check with curl "
                f"-H 'Authorization: Bearer <token>' {url} (is {version} among its versions, and active?). The bundle "
                f"is kept in {kept}; sending it again is safe, since the version id is the content hash and a version "
                f"already stored answers 200 and changes nothing: {send}") from None
        raise PublishError(f"{err}; the bundle is kept in {kept}: once that is fixed, send it with {send}") from None


def _keep(task: str, config_bytes: bytes, weights_bytes: bytes) -> Path | None:
    """The bundle's two files in a new temporary folder (None if even that fails: a full disk)."""
    import tempfile

    try:
        kept = Path(tempfile.mkdtemp(prefix=f"adaptserve-unpublished-{task}-"))
        (kept / CONFIG).write_bytes(config_bytes)
        (kept / WEIGHTS).write_bytes(weights_bytes)
    except OSError:
        return None
    return kept


def _send(base_url: str, task: str, config_bytes: bytes, weights_bytes: bytes, token: str | None,
          timeout: float) -> Published:
    token, headers, where = _bearer(token)
    base = check_url(base_url)
    url = f"{base}/v1/tasks/{task}/versions"
    files = {
        CONFIG: (CONFIG, config_bytes, "application/json"),
        WEIGHTS: (WEIGHTS, weights_bytes, "application/octet-stream"),
    }
    with _reaching(base, url, timeout), httpx.Client(timeout=timeout) as client:
        resp = client.post(url, files=files, headers=headers)
    body = _json(resp)
    if resp.is_success:
        version = str(body.get("version") or content_version(config_bytes, weights_bytes))
        return Published(url=url, version=version, response=body)
    reason = body.get("error") or _text_reason(resp)
    if resp.status_code in (401, 403):
        raise PublishError(f"{url}: not authorised ({resp.status_code}: {reason}); {_token_hint(token, where)}")
    if resp.status_code == 404 and body.get("error_type") not in (None, "not_found"):
        raise PublishError(f"{url}: {resp.status_code} {reason}")
    if resp.status_code in (404, 405):
        raise PublishError(
            f"{url}: the server has no task upload endpoint ({resp.status_code}); is this an adaptserve "
            "service with uploads enabled? (or publish into its store directory with --store)"
        )
    raise PublishError(f"{url}: the server refused the bundle ({resp.status_code}: {reason})")


def check_url(base_url: str) -> str:
    """The service's base URL without trailing slashes; PublishError unless it is http(s) with a host."""
    base = base_url.rstrip("/")
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PublishError(f"--publish needs an http:// or https:// URL with a host, got {base_url!r}")
    return base


def probe(base_url: str, token: str | None = None, timeout: float = 5.0) -> None:
    """PublishError unless something answers HTTP at `base_url` (its /healthz; any status will do),
    takes the token (`token`, else the environment's: `_bearer`) on a read route, and says the
    token may publish (`GET /v1/token`, free of effects): run before training, so an unreachable
    service, or a missing, wrong or read-only token, is found before the work, not after it."""
    token, headers, where = _bearer(token)
    base = check_url(base_url)
    with _reaching(base, base, timeout), httpx.Client(timeout=timeout) as client:
        health = client.get(f"{base}/healthz")
        if not isinstance(_json(health).get("status"), str):  # any adaptserve answers {"status": ...}, even failing
            raise PublishError(f"{base}: no adaptserve service answers there (GET /healthz: {health.status_code}, "
                               f"{_kind(health)}); check the --publish URL")
        resp = client.get(f"{base}/v1/tasks", headers=headers)
        scope = client.get(f"{base}/v1/token", headers=headers) if resp.is_success else None
    if resp.status_code == 401:
        reason = _json(resp).get("error") or resp.reason_phrase
        raise PublishError(f"{base}: the service refused the token (401: {reason}); {_token_hint(token, where)}")
    if not resp.is_success:  # a proxy that answers /healthz but not /v1, a service failing: found now, not after
        reason = _json(resp).get("error") or _text_reason(resp)
        raise PublishError(f"{base}: GET /v1/tasks answered {resp.status_code} ({reason}); the upload goes to /v1 too, "
                           "so check the --publish URL and the service")
    if scope is not None and scope.status_code == 404:  # a release before /v1/token (adaptserve's 404 or a bare one)
        log.warning("%s has no GET /v1/token (an earlier adaptserve release): whether the token may publish "
                    "is known only at the upload, after training", base)
    granted = _json(scope).get("scope") if scope is not None and scope.is_success else None
    if granted is not None and granted != "admin":  # a server without /v1/token (404) is asked at the upload
        raise PublishError(f"{base}: the token from {where} may classify and read tasks but not publish them (its "
                           f"scope is {granted!r}, GET /v1/token); pass an admin token (one of the server's "
                           f"ADAPTSERVE_ADMIN_TOKENS) with --token or {TOKEN_ENV}")


def _bearer(token: str | None) -> tuple[str | None, dict[str, str], str]:
    """`token`, else $ADAPTSERVE_ADMIN_TOKEN, else the first of the server's own
    $ADAPTSERVE_ADMIN_TOKENS (a job run beside the server, with its environment), the headers
    that send it, and where it came from (what messages about it name)."""
    where = "--token"
    if token is None:
        where = TOKEN_ENV if os.environ.get(TOKEN_ENV, "").strip() else SERVER_TOKENS_ENV
        token = os.environ.get(TOKEN_ENV) or next(
            (t.strip() for t in os.environ.get(SERVER_TOKENS_ENV, "").split(",") if t.strip()), None)
    token = token.strip() if token else None  # a secret file's trailing newline is no part of the token
    if token and not all("!" <= c <= "~" for c in token):  # what an HTTP header carries after "Bearer "
        raise PublishError(f"{where}: the admin token holds a space, a control or a non-ASCII character, which no "
                           "bearer token can carry; check the value (tokens are printable ASCII)")
    return token, {"Authorization": f"Bearer {token}"} if token else {}, where


def _token_hint(token: str | None, where: str) -> str:
    return f"pass --token or set {TOKEN_ENV}" if not token else f"check the admin token (it came from {where})"


@contextlib.contextmanager
def _reaching(base: str, where: str, timeout: float) -> Iterator[None]:
    """httpx's transport errors inside, as one-line PublishErrors."""
    try:
        yield
    except httpx.ReadTimeout:  # sent in full, unanswered: unlike a connect or write timeout, it may have been done
        raise NoAnswer(f"{where}: no answer within {timeout:g} s") from None
    except httpx.TimeoutException:
        raise PublishError(f"{where}: no answer within {timeout:g} s") from None
    except httpx.HTTPError as err:
        raise PublishError(f"cannot reach {base}: {err}") from None


def _kind(resp: httpx.Response) -> str:
    """What a non-adaptserve answer was, for a one-line message."""
    kind = resp.headers.get("content-type", "").split(";")[0].strip()
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind} body" if kind else "no content type"


def _text_reason(resp: httpx.Response) -> str:
    """A body that is not adaptserve's JSON error, as one short line: an HTML error page (a proxy,
    another server) is named, not dumped."""
    if "html" in resp.headers.get("content-type", "").lower():
        return f"{resp.reason_phrase}, an HTML page: not an adaptserve answer"
    text = " ".join(resp.text.split())
    return (text[:200] + (" ..." if len(text) > 200 else "")) or resp.reason_phrase


def _json(resp: httpx.Response) -> dict:
    try:
        body = resp.json()
    except (json.JSONDecodeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}
