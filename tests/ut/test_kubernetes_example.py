"""examples/netloader/kubernetes: the manifests agree with each other, and the extra
config they give vLLM goes through Netloader's own config parser, read from the files
the pod would mount (ConfigMap and Secret written where the pod would see them)."""

import json
import re
from pathlib import Path

import pytest
import yaml

from vllm_ascend.model_loader.netloader.config import parse_config
from vllm_ascend.model_loader.netloader.fleet.dns import DnsSource
from vllm_ascend.model_loader.netloader.fleet.registry import parse_registry_url

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "netloader" / "kubernetes"
MOUNT_ROOT = "/etc/netloader"


def manifests() -> dict[tuple[str, str], dict]:
    """Every object in the example, by (kind, name)."""
    objects = {}
    for path in sorted(EXAMPLE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


@pytest.fixture(scope="module")
def objects():
    return manifests()


@pytest.fixture(scope="module")
def container(objects):
    (vllm,) = objects[("Deployment", "vllm-qwen")]["spec"]["template"]["spec"]["containers"]
    return vllm


def extra_config(container) -> dict:
    (arg,) = [a for a in container["args"] if a.startswith("--model-loader-extra-config=")]
    return json.loads(arg.split("=", 1)[1])


def mounted(objects, container, tmp_path: Path) -> Path:
    """Write the ConfigMap's files and a secret where the pod mounts them, under
    ``tmp_path`` in place of /; return the root."""
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_dir = tmp_path / mounts["netloader-config"].lstrip("/")
    config_dir.mkdir(parents=True)
    for name, text in objects[("ConfigMap", "netloader-config")]["data"].items():
        # Paths inside the files are the pod's: point them under tmp_path as well.
        (config_dir / name).write_text(text.replace(MOUNT_ROOT, f"{tmp_path}{MOUNT_ROOT}"))
    secret_dir = tmp_path / mounts["netloader-secret"].lstrip("/")
    secret_dir.mkdir(parents=True)
    (secret_dir / "secret").write_text("0123456789abcdef" * 4 + "\n")  # openssl rand -hex 32
    return tmp_path


def test_the_deployment_runs_vllm_with_netloader_on_the_pod_address(container):
    assert "--load-format=netloader" in container["args"]
    assert container["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("variant", ["dns.json", "registry.json"])
def test_each_variant_parses_as_the_pod_would_read_it(objects, container, tmp_path, variant):
    root = mounted(objects, container, tmp_path)
    given = extra_config(container)
    path = Path(given["CONFIG_FILE"]).with_name(variant)
    config = parse_config({"CONFIG_FILE": f"{root}{path}"}, environ={})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.listen_port == ports["netloader"]
    assert config.secret == b"0123456789abcdef" * 4
    headless = objects[("Service", "vllm-seeds")]
    if variant == "dns.json":
        (dns,) = config.sources
        assert isinstance(dns, DnsSource)
        assert dns.host.split(".")[0] == headless["metadata"]["name"]
        assert dns.host.endswith(".svc.cluster.local")
        assert dns.base_port == config.listen_port
        assert config.registry is None
    else:
        assert config.sources == ()
        host, port, _ = parse_registry_url(config.registry)
        service = objects[("Service", host.split(".")[0])]
        assert service["spec"]["ports"][0]["port"] == port


def test_the_deployment_names_a_config_file_the_configmap_holds(objects, container):
    given = extra_config(container)
    assert set(given) == {"CONFIG_FILE"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    path = Path(given["CONFIG_FILE"])
    assert str(path.parent) == mounts["netloader-config"]
    assert path.name in objects[("ConfigMap", "netloader-config")]["data"]


def test_the_headless_service_selects_the_pods_on_the_seed_port(objects):
    deployment = objects[("Deployment", "vllm-qwen")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    headless = objects[("Service", "vllm-seeds")]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= labels.items()
    assert headless["ports"][0]["targetPort"] == "netloader"
    secret_volume = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == "netloader-secret"]
    assert secret_volume[0]["secret"]["secretName"] == "netloader-secret"


def test_every_extra_config_in_the_user_guide_parses():
    guide = (EXAMPLE.parents[2] / "docs" / "source" / "user_guide" / "feature_guide"
             / "netloader.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", guide, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        parse_config(json.loads(block), environ={})
