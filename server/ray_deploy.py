"""`tokenrm serve --ray` and `tokenrm ray-update`: start (or join) Ray and Serve, deploy the
application from a Serve config (what `serve deploy` and KubeRay's RayService apply), and
change the checkpoint of the running deployment: a new `user_config`, which Ray applies to
one replica at a time, each loading the new checkpoint beside the old one (ray_app's
reconfigure), so that no request fails.

Settings travel in the application's `args`, API keys in its runtime_env (so that they reach
replicas on any cluster; whoever can read the cluster's Serve config can read them)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve._private.client import ServeControllerClient
from ray.serve.context import _get_global_client  # what `serve run config.yaml` deploys with
from ray.serve.schema import ServeDeploySchema

from tokenrm.server.ray_app import DEPLOYMENT, checkpoint
from tokenrm.server.settings import Settings

log = logging.getLogger(__name__)

APP = "tokenrm"
SERVICER_FUNCTIONS = ["tokenrm.proto.reward_pb2_grpc.add_RewardServiceServicer_to_server",
                      "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]

CONFIG_HEADER = """\
# tokenrm on Ray Serve: `serve deploy` or `serve run` this file (or use it as KubeRay's
# serveConfigV2). The checkpoint is the deployment's user_config: change it and deploy again
# to update the replicas one at a time, in place (`tokenrm ray-update` does that).
# API keys: set TOKENRM_API_KEYS in the replicas' environment (runtime_env: env_vars).
"""


def application(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    """The Serve config of the application; `options` are the deployment's (num_replicas or
    autoscaling_config, ray_actor_options, max_ongoing_requests, ...)."""
    keys = {"env_vars": {"TOKENRM_API_KEYS": ",".join(settings.api_keys)}} \
        if settings.api_keys else {}
    return {"name": APP, "route_prefix": "/", "import_path": "tokenrm.server.ray_app:app",
            "args": settings.model_dump(mode="json", exclude_defaults=True,
                                        exclude={"api_keys"}),
            "runtime_env": keys,
            "deployments": [{"name": DEPLOYMENT, **options, "user_config": checkpoint(settings)}]}


def proxies(settings: Settings) -> dict[str, Any]:
    """Where Ray Serve's proxies listen: HTTP on host:http_port, gRPC on grpc_port (0: none)."""
    grpc = {} if settings.grpc_port == 0 else {"grpc_options": {
        "port": settings.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS}}
    return {"http_options": {"host": settings.host, "port": settings.http_port}, **grpc}


def config_file(settings: Settings, options: dict[str, Any]) -> str:
    """A Serve config file for Ray's own tools (`serve deploy`, `serve run`, KubeRay's
    serveConfigV2) that deploys what `tokenrm serve --ray` would, API keys left out."""
    config = {**proxies(settings), "applications": [
        application(settings.model_copy(update={"api_keys": ()}), options)]}
    ServeDeploySchema.model_validate(config)
    return (CONFIG_HEADER + yaml.safe_dump(config, sort_keys=False))


def run(settings: Settings, options: dict[str, Any], address: str | None = None,
        metrics_port: int | None = None) -> None:
    """Start (or join, with `address`) Ray, serve the application on settings.host:http_port
    and gRPC on grpc_port (0: none) through Ray Serve's proxies, until SIGTERM or SIGINT.
    `metrics_port`: where a local Ray exports every replica's metrics (Prometheus text)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    extra: dict[str, Any] = {} if address or metrics_port is None else {
        "_metrics_export_port": metrics_port}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, **extra)
    serve.start(**proxies(settings))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _deploy(application(settings, options))
        gcs = ray.get_runtime_context().gcs_address
        log.info("on Ray at %s; change the checkpoint with: tokenrm ray-update --ray-address "
                 "%s --model DIR", gcs, gcs)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def update(address: str, model: Path, version: str | None) -> None:
    """Point the running deployment at checkpoint `model` (reported as `version`; unset: a hash
    of its files) and wait until every replica serves it. If replicas cannot load it, this
    raises SystemExit with the reason; replicas not yet updated keep serving the old checkpoint,
    and the deployment runs short of replicas until an update that loads."""
    ray.init(address=address, log_to_driver=False)
    try:
        deployed = _deployed()
        if APP not in deployed:
            raise SystemExit(f"tokenrm ray-update: no application {APP!r} deployed from a "
                             f"config on the Ray cluster at {address}")
        ours = deployed[APP]
        others = [d for d in ours.get("deployments", []) if d["name"] != DEPLOYMENT]
        mine = next((d for d in ours.get("deployments", []) if d["name"] == DEPLOYMENT),
                    {"name": DEPLOYMENT})
        ours["deployments"] = [*others, {**mine, "user_config": {
            "model": str(model), "model_version": version}}]
        _deploy(ours)
    finally:
        ray.shutdown()


def _deployed() -> dict[str, dict[str, Any]]:
    """The cluster's applications deployed from a config, by name."""
    apps = _client().get_serve_details().get("applications", {})
    return {name: a["deployed_app_config"] for name, a in apps.items()
            if a.get("deployed_app_config")}


def _deploy(app: dict[str, Any]) -> None:
    """Apply `app` beside the cluster's other config-deployed applications; wait until it runs
    (raises SystemExit with Ray's message if it cannot)."""
    client = _client()
    before = client.get_serve_details().get("applications", {}).get(APP, {}).get(
        "last_deployed_time_s", 0.0)
    apps = {**_deployed(), APP: app}
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))
    while True:
        details = client.get_serve_details().get("applications", {}).get(APP, {})
        deployments = details.get("deployments", {}).values()
        if details.get("last_deployed_time_s", 0.0) > before:
            if details["status"] == "DEPLOY_FAILED":  # (a deployment's may be the last one's)
                raise SystemExit(f"tokenrm: Ray could not deploy {APP}: "
                                 f"{_messages(deployments) or details.get('message')}")
            if details["status"] == "RUNNING" and all(
                    d["status"] == "HEALTHY" for d in deployments):
                return
        time.sleep(0.5)


def _client() -> ServeControllerClient:
    client = _get_global_client()
    assert client is not None  # it raises when no Serve controller runs
    return client


def _messages(deployments: Any) -> str:
    """The last line of each failed deployment's message (the exception, not its traceback)."""
    return "; ".join(d["message"].strip().splitlines()[-1] for d in deployments
                     if d.get("message"))
