"""`python serve.py ckpt_path=...` (or model_path=model.onnx): the classifier over HTTP."""

from __future__ import annotations

import json
import logging
import os
import socket
from functools import partial
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from omegaconf import DictConfig, OmegaConf

from thaw import checks
from thaw.errors import UserError
from thaw.inference.predictor import TTA_MODES, best_device, check_rejection, checkpoint_paths
from thaw.serving import oip
from thaw.serving.app import ServeSettings, create_app
from thaw.serving.keys import api_key
from thaw.serving.memory import give_back_large_blocks
from thaw.serving.protocol import HeadDeadlineProtocol
from thaw.serving.served import load_served
from thaw.serving.worker import PARENT_ENV, die_with_parent

log = logging.getLogger(__name__)

# The config a worker process of `workers > 1` reads to build its own app.
CONFIG_ENV = "THAW_SERVE_CONFIG"
WORKER_STARTUP_S = 120
GRACE_S = 10


def settings_from(cfg: DictConfig) -> ServeSettings:
    """The server's bounds from the config, each checked and named if wrong."""
    for key in ("max_batch_size", "max_pending", "top_k", "workers", "max_image_pixels"):
        checks.integer(key, cfg[key], minimum=1)
    checks.integer("max_pixels_in_flight", cfg.max_pixels_in_flight, minimum=1)
    if cfg.max_pixels_in_flight < cfg.max_image_pixels:
        raise UserError(
            f"max_pixels_in_flight={cfg.max_pixels_in_flight} is below max_image_pixels="
            f"{cfg.max_image_pixels}: an image at the limit could never be decoded. Raise "
            "max_pixels_in_flight or lower max_image_pixels"
        )
    checks.number("batch_timeout_ms", cfg.batch_timeout_ms, minimum=0)
    checks.number("decode_wait_s", cfg.decode_wait_s, minimum=0)
    for key in ("header_timeout_s", "body_timeout_s"):
        checks.number(key, cfg[key], minimum=0.001)
    checks.integer("limit_concurrency", cfg.limit_concurrency, minimum=1)
    checks.number("max_upload_mb", cfg.max_upload_mb, minimum=0)
    if cfg.max_upload_mb == 0:
        raise UserError("max_upload_mb must be above 0: it is the largest request body accepted")
    checks.choice("tta", cfg.tta, TTA_MODES)
    checks.flag("reject", cfg.reject)
    if cfg.model_name is not None and not oip.is_model_name(cfg.model_name):
        raise UserError(
            f"model_name={cfg.model_name!r}: the Open Inference Protocol's paths take letters, "
            "digits, '.', '_' and '-' (e.g. model_name=shop-classifier)"
        )
    return ServeSettings(
        max_batch_size=cfg.max_batch_size,
        batch_timeout_ms=float(cfg.batch_timeout_ms),
        max_upload_mb=float(cfg.max_upload_mb),
        max_image_pixels=cfg.max_image_pixels,
        max_pixels_in_flight=cfg.max_pixels_in_flight,
        decode_wait_s=float(cfg.decode_wait_s),
        body_timeout_s=float(cfg.body_timeout_s),
        max_pending=cfg.max_pending,
        top_k=cfg.top_k,
        reject=cfg.reject,
        api_key=api_key(cfg),
        model_name=cfg.model_name,
    )


def check_listening(host: Any, port: Any) -> None:
    """The port is a TCP port and `host:port` can be listened on, found before the model loads
    rather than as uvicorn's traceback after it."""
    try:
        checks.integer("port", port, minimum=1, maximum=65535)
    except UserError as err:
        raise UserError(f"{err}: give the TCP port to listen on, e.g. port=8000") from None
    if not isinstance(host, str):
        raise UserError(f"host must be an address such as 127.0.0.1, got {host!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as err:
        raise UserError(
            f"cannot listen on {host}:{port}: {err.strerror or err}. Give a free port=<1-65535> "
            "(below 1024 needs root) and a host of this machine (127.0.0.1, 0.0.0.0)"
        ) from None


def build_app(cfg: DictConfig) -> FastAPI:
    """The app for `cfg`: the model loaded, the settings checked (reject=true on a model with
    no rejection rule is refused as predict refuses it)."""
    settings = settings_from(cfg)
    ckpt_paths = checkpoint_paths(cfg.ckpt_path)
    predictor, info = load_served(ckpt_paths, cfg.model_path, best_device(cfg.device), cfg.tta)
    check_rejection(predictor, settings.reject, cfg.model_path or ckpt_paths[0])
    return create_app(predictor, info, settings)


def app_from_environment() -> FastAPI:
    """The app of one worker process (`workers > 1`): each loads its own model, with its share
    of the cores for intra-op threads, and ends when the process that started it does."""
    die_with_parent(int(os.environ[PARENT_ENV]))
    cfg = OmegaConf.create(json.loads(os.environ[CONFIG_ENV]))
    give_back_large_blocks()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // cfg.workers))
    return build_app(cfg)


def serve(cfg: DictConfig) -> None:
    """Load the model (a mistake stops here, before the port opens), then serve until stopped."""
    check_listening(cfg.host, cfg.port)
    give_back_large_blocks()
    app = build_app(cfg)
    log.info("Serving on http://%s:%d (the page at /, the API at /predict)", cfg.host, cfg.port)
    listening = uvicorn_options(cfg)
    if cfg.workers == 1:
        uvicorn.run(app, log_level="info", **listening)
        return
    del app  # each worker process builds its own from the environment
    os.environ[CONFIG_ENV] = json.dumps(OmegaConf.to_container(cfg, resolve=True))
    os.environ[PARENT_ENV] = str(os.getpid())
    uvicorn.run(
        "thaw.serve:app_from_environment",
        factory=True,
        workers=cfg.workers,
        log_level="info",
        # uvicorn (>= 0.37) restarts a worker that misses its health check; loading torch and a
        # model takes longer than the 5 s default on a busy machine.
        timeout_worker_healthcheck=WORKER_STARTUP_S,
        **listening,
    )


def uvicorn_options(cfg: DictConfig) -> dict[str, Any]:
    """How uvicorn listens: the address, the bounds on slow and many clients, and the grace
    on SIGTERM (or its parent's death, for a worker): it stops listening at once and gives what
    it is answering GRACE_S to finish."""
    return {
        "host": cfg.host,
        "port": cfg.port,
        "http": partial(HeadDeadlineProtocol, header_timeout_s=float(cfg.header_timeout_s)),
        "limit_concurrency": cfg.limit_concurrency,
        "timeout_graceful_shutdown": GRACE_S,
    }


def task(cfg: DictConfig) -> None:
    """The command line's job (thaw.cli.serve)."""
    serve(cfg)
