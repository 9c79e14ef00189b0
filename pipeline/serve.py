"""``wysiwyc serve``: a registered Explainer as an HTTP endpoint on Ray Serve.

- ``POST /explain`` — the body is one image's bytes (``Content-Type: image/png`` or ``image/jpeg``); the
  answer is JSON: ``model_version`` (the version that answered), ``model_name``, ``model_uri``,
  ``classes``, ``probabilities``, ``masks`` (base64 PNGs at ``mask_size``), ``batch`` (how many requests
  shared its forward pass) — the records of
  :func:`pipeline.models.explain.explain`, the same as the registered pyfunc's. Query parameters
  ``classes`` (threshold | topk | fixed), ``threshold``, ``top_k``, ``fixed_classes`` (comma-separated)
  choose the classes as in ``wysiwyc attribute``.
- ``GET /health`` — ``status``, ``model_uri``, ``model_name``, ``model_version``, ``classes``,
  ``image_size``, ``checked_at`` and ``refresh_error`` (the last failed re-check, else null).

Concurrent requests share a forward pass (``serve.batch``: up to ``serve.max_batch_size`` images, waiting
at most ``serve.batch_wait_s``). An alias (``models:/NAME@champion``) is resolved at start and re-checked
every ``serve.refresh_s`` seconds by each replica: a promotion or rollback reaches the endpoint without a
restart (the new version is loaded beside the old one, then swapped; a failed re-check keeps the version
that serves and is reported in ``/health``). Bad input is a 4xx with a JSON ``error`` and never reaches the
model: 415 (another content type), 413 (more than ``serve.max_image_bytes`` bytes or
``serve.max_image_pixels`` pixels), 400 (not an image, bad parameters), 404 / 405 (another path or method).

One client cannot stall the others: ``fixed_classes`` is deduplicated (never more masks than the model's
classes), images are decoded in a pool as large as the replica's CPUs (``serve.cpus_per_replica``) behind a
semaphore, a JPEG is decoded at the smallest scale that still covers the model's input, at most
``serve.max_queued_requests`` requests wait per caller (more get Ray Serve's 503), and a request that takes
more than ``serve.request_timeout_s`` is answered 503 (the proxy-wide timeout of Ray Serve is left alone).

The application is built by :func:`app` — what ``wysiwyc serve`` runs on a local Ray (or ``RAY_ADDRESS``)
and what a KubeRay ``RayService`` names as ``import_path: pipeline.serve:app`` (``k8s/base/rayservice.yaml``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import torch
from pydantic import ValidationError
from ray import serve

from pipeline import storage, tracking
from pipeline.config import ServeConfig
from pipeline.data.images import decode_image
from pipeline.errors import ImageTooLarge, InputError, WysiwycError
from pipeline.method.class_rule import ClassRule
from pipeline.models.explain import explain
from pipeline.models.predictor import load_model
from pipeline.raysession import ensure_ray

log = logging.getLogger(__name__)

CONTENT_TYPES = ("image/png", "image/jpeg")
APP_NAME = "wysiwyc"


def _json(status: int, body: dict, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


async def answer_within(seconds: float, answer) -> Any:
    """``await answer`` (a coroutine giving the response), or a 503 with ``Retry-After`` once ``seconds`` have
    passed (the work is cancelled; ``serve.request_timeout_s``)."""
    try:
        return await asyncio.wait_for(answer, timeout=seconds)
    except TimeoutError:
        return _json(
            503,
            {"error": f"the request took more than serve.request_timeout_s={seconds:g} s: the endpoint is busy, retry"},
            {"Retry-After": "1"},
        )


class Endpoint:
    """The Serve deployment: one loaded Explainer (swapped on a refresh) behind ``/explain`` and ``/health``."""

    async def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.model_uri = settings["model"]
        self.current = await asyncio.to_thread(self._load, self.model_uri)
        self.checked_at, self.refresh_error = time.time(), None
        # decoding takes the replica's CPUs at most, whatever the node has (asyncio's default pool: the node's)
        decoders = max(1, math.ceil(float(settings["cpus_per_replica"])))
        self._decoders = ThreadPoolExecutor(decoders, thread_name_prefix="decode")
        self._decoding = asyncio.Semaphore(decoders)
        self._batched.set_max_batch_size(int(settings["max_batch_size"]))
        self._batched.set_batch_wait_timeout_s(float(settings["batch_wait_s"]))
        refresh = float(settings["refresh_s"])
        self._refresher = asyncio.get_running_loop().create_task(self._refresh(refresh)) if refresh > 0 else None

    @staticmethod
    def _load(uri: str) -> dict:
        """``{"predictor", "name", "version", "uri"}`` of a model URI (an alias resolved now)."""
        predictor = load_model(uri, device="cuda" if torch.cuda.is_available() else "cpu")
        name = predictor.model_name or predictor.explainer_uri
        version = str(predictor.model_version or predictor.explainer_sha256[:12])
        return {"predictor": predictor, "name": name, "version": version, "uri": predictor.explainer_uri}

    async def _refresh(self, every: float) -> None:
        """Re-resolve the alias every ``every`` seconds; load and swap in a new version."""
        if not self.model_uri.startswith(tracking.REGISTRY_PREFIX):
            return  # a checkpoint URI names fixed bytes
        while True:
            await asyncio.sleep(every)
            try:
                name, version = await asyncio.to_thread(tracking.resolve_model, self.model_uri)
                if version != self.current["version"]:
                    loaded = await asyncio.to_thread(self._load, f"models:/{name}/{version}")
                    log.warning(
                        "serve: %s now resolves to version %s (was %s)",
                        self.model_uri,
                        version,
                        self.current["version"],
                    )
                    self.current = loaded
                self.checked_at, self.refresh_error = time.time(), None
            except Exception as exc:  # keep serving the version that works; /health says why
                error = storage.redact(str(exc))  # e.g. a tracking URI's user:password
                if error != self.refresh_error:
                    log.warning(
                        "serve: re-checking %s failed (still serving version %s): %s",
                        self.model_uri,
                        self.current["version"],
                        error,
                    )
                self.refresh_error = error

    def _health(self) -> dict:
        current = self.current
        return {
            "status": "ok",
            "model_uri": self.model_uri,
            "model_name": current["name"],
            "model_version": current["version"],
            "classes": list(current["predictor"].classes),
            "image_size": current["predictor"].image_size,
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.checked_at)),
            "refresh_error": self.refresh_error,
        }

    async def __call__(self, request):
        path = request.url.path.rstrip("/") or "/"
        if path in ("/health", "/"):
            if request.method != "GET":
                return _json(405, {"error": f"{path} answers GET"})
            return _json(200, self._health())
        if path != "/explain":
            return _json(404, {"error": f"no {path}: POST /explain (image bytes) or GET /health"})
        if request.method != "POST":
            return _json(405, {"error": "/explain answers POST with the image bytes as the body"})
        return await answer_within(float(self.settings["request_timeout_s"]), self._answer(request))

    async def _answer(self, request):
        try:
            item = await self._parse(request)
        except _HTTPError as exc:
            return _json(exc.status, {"error": str(exc)})
        return _json(200, await self._batched(item))

    async def _parse(self, request) -> tuple:
        """``(pixels, body, rule)`` of a request, or an :class:`_HTTPError` with the 4xx to answer."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            raise _HTTPError(415, f"Content-Type {ctype or '(none)'}: send the image bytes as image/png or image/jpeg")
        limit = int(self.settings["max_image_bytes"])
        body, size = bytearray(), 0
        async for chunk in request.stream():  # read (and drop) a body that is too large: a client that is
            size += len(chunk)  # still sending when the answer comes sees a reset connection, not the 413
            if size <= limit:
                body += chunk
            elif size > 8 * limit:
                break
        if size > limit:
            raise _HTTPError(
                413, f"{size}{'+' if size > 8 * limit else ''} bytes: more than serve.max_image_bytes={limit}"
            )
        body = bytes(body)
        try:
            rule = ClassRule.from_params(dict(request.query_params))
            rule.fixed_indices(self.current["predictor"].classes)  # unknown class names: 400 now
        except WysiwycError as exc:
            raise _HTTPError(400, str(exc)) from None
        try:
            async with self._decoding:  # requests beyond the decoders wait here, not in a thread of the node's pool
                loop = asyncio.get_running_loop()
                size = self.current["predictor"].image_size
                pixels = await loop.run_in_executor(self._decoders, self._decode, body, size)
        except InputError as exc:
            raise _HTTPError(413 if isinstance(exc, ImageTooLarge) else 400, str(exc)) from None
        return pixels, body, rule

    def _decode(self, body: bytes, size: int) -> np.ndarray:
        limit = int(self.settings["max_image_pixels"])
        return decode_image(body, "request body", size, limit, "serve.max_image_pixels")[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # set from the settings in __init__
    async def _batched(self, items: list[tuple]) -> list[dict]:
        """Up to ``max_batch_size`` concurrent requests in one forward pass (the version of this moment)."""
        current = self.current
        return await asyncio.to_thread(self._explain, current, items)

    def _explain(self, current: dict, items: list[tuple]) -> list[dict]:
        predictor = current["predictor"]
        size = predictor.image_size  # a request decoded just before a swap to a version of another size
        pixels = [p if p.shape[-1] == size else self._decode(body, size) for p, body, _ in items]
        records = explain(predictor, torch.from_numpy(np.stack(pixels)), [rule for _, _, rule in items], len(items))
        head = {"model_name": current["name"], "model_version": current["version"], "model_uri": current["uri"]}
        return [{**head, **record, "mask_size": [size, size], "batch": len(items)} for record in records]


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def app(args: dict[str, Any]):
    """The Serve application (an app builder: ``import_path: pipeline.serve:app`` with ``args`` = ``serve.*``
    keys, validated like the config; what is absent takes its default; ``host`` / ``port`` are the HTTP
    proxy's, not the application's)."""
    try:
        values = ServeConfig(**args).model_dump(exclude={"host", "port"})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {'unknown argument' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors()
        )
        raise WysiwycError(f"serve: {problems} (the arguments are serve.* keys: docs/configuration.md)") from None
    if not values["model"]:
        raise WysiwycError("serve: give the model: --model models:/NAME@champion (serve.model)")
    deployment = serve.deployment(
        Endpoint,
        name="Explainer",
        num_replicas=values["replicas"],
        max_ongoing_requests=max(32, 4 * values["max_batch_size"]),
        max_queued_requests=values["max_queued_requests"],  # more wait at no caller: Ray Serve answers 503
        ray_actor_options={"num_cpus": values["cpus_per_replica"], "num_gpus": values["gpus_per_replica"]},
    )
    return deployment.bind(values)


def serve_forever(config, on_ready=None) -> dict:
    """Run :func:`app` on a local Ray (or ``RAY_ADDRESS``) at ``http://serve.host:serve.port`` until SIGTERM /
    SIGINT; ``on_ready(url, health)`` is called once it answers. Returns the summary when stopped."""
    s = config.serve
    host, port = s.host, s.port
    if not s.model:
        raise WysiwycError("serve: give the model: --model models:/NAME@champion (serve.model)")
    # the replicas inherit the registry (no argument to log)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.registry_uri(config))
    stop = threading.Event()
    started = time.time()
    ensure_ray(
        config.storage.options(),
        num_cpus=max(os.cpu_count() or 1, int(s.replicas * s.cpus_per_replica + 0.999)),
        use_gpu=s.gpus_per_replica > 0,
    )
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app(s.model_dump(exclude={"host", "port"})), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # a replica's constructor failed: its error, not Serve's wrapper
            raise WysiwycError(f"serve: the model did not load: {str(exc).splitlines()[-1][:500]}") from None
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs a SIGTERM handler of its own
            signal.signal(sig, lambda *_: stop.set())
        url = f"http://{host}:{port}"
        with urllib.request.urlopen(f"{url}/health", timeout=30) as reply:
            health = json.loads(reply.read())
        if on_ready is not None:
            on_ready(url, health)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "url": url,
        "model_uri": s.model,
        "model_version": health["model_version"],
        "uptime_s": round(time.time() - started, 1),
    }
