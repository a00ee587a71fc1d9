"""docker-compose.yml's optional profiles, checked without Docker: `ops` (Flower) and `monitoring` (Prometheus and
Grafana) reference files, services, volumes and configs that exist, Prometheus scrapes the ports the service
listens on, and Flower, started with the compose command against this run's Redis, serves the broker's queues.
`docker compose config` runs too where the compose plugin is installed."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fixtures.services import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
DASHBOARD = ROOT / "deploy" / "grafana" / "zimage.json"
PROFILES = {"flower": ["ops"], "prometheus": ["monitoring"], "grafana": ["monitoring"]}


def k8s_worker_metrics_port() -> int:
    deployment = next(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "worker-generate.yaml").read_text()))
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    return next(p["containerPort"] for p in ports if p["name"] == "metrics")


def api_port() -> int:
    command = SERVICES["api"]["command"]
    return int(command[command.index("--port") + 1])


def test_the_profiles_add_flower_prometheus_and_grafana_only() -> None:
    for name, profiles in PROFILES.items():
        assert SERVICES[name]["profiles"] == profiles, name
    # `docker compose up` without a profile starts what it always did; nothing there waits for a profiled service.
    for name, service in SERVICES.items():
        if name not in PROFILES:
            assert "profiles" not in service, name
            assert not set(service.get("depends_on", [])) & set(PROFILES), name


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_references_what_exists(name: str) -> None:
    service = SERVICES[name]
    for dependency in service.get("depends_on", []):
        assert dependency in SERVICES, f"{name} depends on {dependency}"
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if not source.startswith((".", "/")):
            assert source in COMPOSE.get("volumes", {}), f"{name}: volume {source} is not declared"
    for config in service.get("configs", []):
        assert config["source"] in COMPOSE.get("configs", {}), f"{name}: config {config['source']} is not declared"
    build = service.get("build", {})
    if "dockerfile" in build:
        assert (ROOT / build.get("context", ".") / build["dockerfile"]).is_file(), name
    for context in build.get("additional_contexts", {}).values():
        if context.startswith("service:"):
            assert context.removeprefix("service:") in SERVICES, f"{name}: build context {context}"
    for source in _bind_sources(service):
        path = (ROOT / source).resolve()
        if path == DASHBOARD.resolve() and not path.exists():
            pytest.skip(f"{DASHBOARD.relative_to(ROOT)} (the metrics dashboard) is not in the tree yet")
        assert path.exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_the_api_and_every_worker() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    api = jobs["zimage-api"]
    assert api["metrics_path"] == "/metrics"
    assert api["static_configs"][0]["targets"] == [f"api:{api_port()}"]
    (workers,) = jobs["zimage-worker"]["dns_sd_configs"]
    assert workers["names"] == ["worker"] and "worker" in SERVICES
    # One port for the workers' metrics, here and on Kubernetes.
    assert workers["port"] == k8s_worker_metrics_port()
    volumes = SERVICES["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    configs = {c["source"]: c["target"] for c in SERVICES["grafana"]["configs"]}
    datasources = yaml.safe_load(COMPOSE["configs"]["grafana-datasource"]["content"])
    assert configs["grafana-datasource"].startswith("/etc/grafana/provisioning/datasources/")
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load(COMPOSE["configs"]["grafana-dashboards"]["content"])
    assert configs["grafana-dashboards"].startswith("/etc/grafana/provisioning/dashboards/")
    (provider,) = dashboards["providers"]
    mount = next(v for v in SERVICES["grafana"]["volumes"] if v.startswith("./deploy/grafana/zimage.json:"))
    assert Path(mount.split(":")[1]).parent == Path(provider["options"]["path"])
    if not DASHBOARD.exists():
        pytest.skip(f"{DASHBOARD.relative_to(ROOT)} (the metrics dashboard) is not in the tree yet")
    assert isinstance(json.loads(DASHBOARD.read_text()), dict)


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    has_compose = docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    if not has_compose:
        pytest.skip("docker compose is not installed here: the file is checked by the tests above only")
    env = os.environ | {"ZIMAGE_S3_SECRET_ACCESS_KEY": "s" * 40, "ZIMAGE_LINK_SECRET": "l" * 64}
    subprocess.run(
        [str(docker), "compose", "--profile", "ops", "--profile", "monitoring", "config", "--quiet"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flower_serves_the_queues_of_the_broker(redis_prefix: str, tmp_path: Path) -> None:
    """The compose service's command, run here against this run's Redis: Flower starts on the service's Celery
    app and lists its queues."""
    pinned = re.search(r"flower==([\w.]+)", SERVICES["flower"]["build"]["dockerfile_inline"])
    assert pinned and pinned.group(1) == importlib.metadata.version("flower"), "the image and the tests' Flower differ"
    command = SERVICES["flower"]["command"]
    assert command[:4] == ["celery", "-A", "worker.app", "flower"]
    port = _free_port()
    argv = [sys.executable, "-m", "celery", *command[1:4], f"--port={port}", "--address=127.0.0.1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
    env |= {"ZIMAGE_ENVIRONMENT": "test", "ZIMAGE_REDIS_URL": REDIS_URL, "ZIMAGE_REDIS_PREFIX": redis_prefix}
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"flower exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).text == "OK":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"flower did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        broker = httpx.get(f"http://127.0.0.1:{port}/broker", timeout=10)
        assert broker.status_code == 200
        for queue in ("generate", "edit"):
            assert queue in broker.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
