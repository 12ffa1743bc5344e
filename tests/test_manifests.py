"""The Kubernetes manifests (``manifests/``), the node setup script and the Dockerfile.

Static checks need no cluster: every manifest parses, the ConfigMap's ``config.yaml`` passes
``dnsmirror config check`` and every address, path and mount of the DaemonSet agrees with it.
The node test (root, network namespaces) runs the DaemonSet's own init-container commands and
``dnsmirror serve`` with the ConfigMap's addresses inside a namespace, checks the probes, then runs
``node-setup.sh`` against a temporary directory standing in for the node's root filesystem.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from dns_support import http_status
from harness import require_netns
from harness.netns import Cluster, clean_env
from harness.pki import create_ca

from dnsmirror.patterns import HostMatcher

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
NODE_SETUP = MANIFESTS / "node-setup"
SCRIPT = NODE_SETUP / "node-setup.sh"
DNSMIRROR = [sys.executable, "-m", "dnsmirror"]


def documents(path: Path) -> list[dict]:
    """The YAML documents of a manifest file, empty ones dropped."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def find(kind: str, name: str, directory: Path = MANIFESTS) -> dict:
    """The one object of ``kind`` and ``name`` among the manifests of ``directory``."""
    found = [doc for path in sorted(directory.glob("*.yaml")) for doc in documents(path)
             if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name]
    assert len(found) == 1, f"expected one {kind}/{name} in {directory}, found {len(found)}"
    return found[0]


def config_text() -> str:
    return find("ConfigMap", "dnsmirror-config")["data"]["config.yaml"]


@pytest.fixture(scope="module")
def effective(tmp_path_factory) -> dict:
    """The ConfigMap's config.yaml as ``dnsmirror config check`` prints it (defaults filled in)."""
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(config_text())
    done = subprocess.run(
        [*DNSMIRROR, "config", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def pod_spec(name: str = "dnsmirror", directory: Path = MANIFESTS) -> dict:
    return find("DaemonSet", name, directory)["spec"]["template"]["spec"]


def main_container() -> dict:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "dnsmirror"]
    return container


def volume(name: str) -> dict:
    (found,) = [v for v in pod_spec()["volumes"] if v["name"] == name]
    return found


def mount_of(volume_name: str) -> dict:
    (found,) = [m for m in main_container()["volumeMounts"] if m["name"] == volume_name]
    return found


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def init_script() -> str:
    """The shell script of the init container that adds the node-local address."""
    (init,) = pod_spec()["initContainers"]
    assert init["command"][:2] == ["/bin/sh", "-ec"]
    return init["command"][2]


# --- every file parses; kustomizations list what exists -------------------------------------------

def test_every_manifest_parses_as_kubernetes_objects():
    paths = sorted(MANIFESTS.rglob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        docs = documents(path)
        assert docs, f"{path} has no document"
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] not in ("Kustomization", "Component"):
                assert doc["metadata"]["name"], path
                assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == "dnsmirror", path


@pytest.mark.parametrize("directory", [MANIFESTS, NODE_SETUP], ids=["manifests", "node-setup"])
def test_kustomization_lists_every_manifest(directory):
    (kustomization,) = documents(directory / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (directory / file).is_file(), file


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed"
)
@pytest.mark.parametrize("directory", [MANIFESTS, NODE_SETUP], ids=["manifests", "node-setup"])
def test_kustomize_builds(directory):
    done = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    (daemonset,) = [doc for doc in built if doc["kind"] == "DaemonSet"]
    for container in daemonset["spec"]["template"]["spec"]["initContainers"] + \
            daemonset["spec"]["template"]["spec"]["containers"]:
        assert container["image"] == "dnsmirror:0.1.0"
    if directory == NODE_SETUP:
        # the generated script ConfigMap gets a content hash, and the DaemonSet refers to that name
        (script_map,) = [doc for doc in built if doc["kind"] == "ConfigMap"]
        volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
        assert volumes["script"]["configMap"]["name"] == script_map["metadata"]["name"]
        assert script_map["data"]["node-setup.sh"] == SCRIPT.read_text()


# --- the ConfigMap's config and the DaemonSet agree -----------------------------------------------

def test_config_passes_config_check_with_production_addresses(effective):
    address = effective["mirror"]["address"]
    assert ipaddress.ip_address(address).is_link_local
    assert effective["dns"]["listen"] == [f"{address}:53"]
    assert effective["https"]["listen"] == [f"{address}:443"]
    assert effective["metrics"]["listen"] == f"{address}:9090"
    assert effective["log"]["format"] == "json"
    assert effective["cache"]["dir"] == "/var/lib/dnsmirror/cache"


def test_config_check_rejects_a_broken_copy(tmp_path):
    """The check above can fail: the same ConfigMap text with one bad address is refused."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text().replace("169.254.20.53:53", "169.254.20.53:notaport", 1))
    done = subprocess.run(
        [*DNSMIRROR, "config", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "dns.listen[0]" in done.stderr


def test_upstreams_are_explicit_and_not_dnsmirror(effective):
    upstreams = effective["dns"]["upstreams"]
    assert upstreams, "dns.upstreams must be set: resolv.conf names dnsmirror itself once the node uses it"
    assert all(host_port(u)[0] != effective["mirror"]["address"] for u in upstreams)


def test_skip_keeps_the_bootstrap_registry_out_of_capture(effective):
    skipped = effective["skip"]
    assert skipped
    for host in skipped:
        # the placeholder is a name the capture list would take: skip is what keeps it out
        assert HostMatcher(effective["capture"], []).captures(host)
        assert not HostMatcher(effective["capture"], skipped).captures(host)


def test_container_command_reads_the_configmap_mount():
    mount = mount_of("config")
    assert volume("config")["configMap"]["name"] == "dnsmirror-config"
    assert mount.get("readOnly") is True
    expected = str(PurePosixPath(mount["mountPath"]) / "config.yaml")
    assert main_container()["command"] == ["dnsmirror", "serve", "--config", expected]


def test_ports_and_probes_use_the_configured_addresses(effective):
    address = effective["mirror"]["address"]
    ports = {(p["name"], p["protocol"]): p for p in main_container()["ports"]}
    dns_host, dns_port = host_port(effective["dns"]["listen"][0])
    https_host, https_port = host_port(effective["https"]["listen"][0])
    metrics_host, metrics_port = host_port(effective["metrics"]["listen"])
    expected = {("dns", "UDP"): (dns_host, dns_port), ("dns-tcp", "TCP"): (dns_host, dns_port),
                ("https", "TCP"): (https_host, https_port), ("metrics", "TCP"): (metrics_host, metrics_port)}
    assert set(ports) == {*expected, ("peers", "TCP")}
    peers_host, peers_port = host_port(effective["peers"]["listen"])
    assert peers_host == "0.0.0.0" and "hostIP" not in ports[("peers", "TCP")]  # other nodes connect to it
    assert ports[("peers", "TCP")]["containerPort"] == peers_port == ports[("peers", "TCP")]["hostPort"]
    for key, (host, port) in expected.items():
        assert ports[key]["hostIP"] == host and ports[key]["containerPort"] == port == ports[key]["hostPort"]
    container = main_container()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (metrics_host, metrics_port, path)
    assert f"ip addr replace {address}/32 dev dnsmirror0" in init_script()


def test_ca_secret_is_owner_only_and_mounted_where_tls_points(effective):
    secret = volume("ca")["secret"]
    assert secret["secretName"] == "dnsmirror-ca"
    assert secret["defaultMode"] == 0o400
    mount = PurePosixPath(mount_of("ca")["mountPath"])
    assert mount_of("ca").get("readOnly") is True
    keys = {item["path"]: item["key"] for item in secret.get("items", [])}
    for key in ("ca_cert", "ca_key"):
        path = PurePosixPath(effective["tls"][key])
        assert path.parent == mount
        assert keys.get(path.name, path.name) in ("ca.crt", "ca.key")
    assert "fsGroup" not in pod_spec().get("securityContext", {}), "fsGroup makes the key group-readable"


def test_peers_find_each_other_through_the_headless_service_and_share_the_secret(effective):
    peers = effective["peers"]
    service = find("Service", "dnsmirror-peers")
    name, namespace = peers["dns_name"].split(".")[:2]
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == (name, namespace)
    assert peers["dns_name"].endswith(".svc.cluster.local")
    assert service["spec"]["clusterIP"] == "None"
    labels = find("DaemonSet", "dnsmirror")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["port"] for p in service["spec"]["ports"]] == [host_port(peers["listen"])[1]]
    assert peers["resolvers"], "the cluster DNS must be named: dns.upstreams do not know cluster.local"
    secret = volume("peer-secret")["secret"]
    assert (secret["secretName"], secret["defaultMode"]) == ("dnsmirror-peer-secret", 0o400)
    assert PurePosixPath(peers["secret_file"]).parent == PurePosixPath(mount_of("peer-secret")["mountPath"])
    assert PurePosixPath(peers["secret_file"]).name == "secret"


def test_cache_is_the_hostpath_of_cache_dir(effective):
    assert volume("cache")["hostPath"]["path"] == effective["cache"]["dir"]
    assert mount_of("cache")["mountPath"] == effective["cache"]["dir"]
    assert not mount_of("cache").get("readOnly")


def test_containerd_content_is_mounted_read_only(effective):
    path = effective["cache"]["containerd_content"]
    assert path == "/var/lib/containerd/io.containerd.content.v1.content"
    assert volume("containerd-content")["hostPath"]["path"] == path
    assert mount_of("containerd-content")["mountPath"] == path
    assert mount_of("containerd-content")["readOnly"] is True


def test_pod_runs_on_every_node_in_the_host_network(effective):
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "Default"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    # room for the fail-open switch and answers already given (dns.ttl) before the pod is killed
    assert spec["terminationGracePeriodSeconds"] >= 2 * effective["dns"]["ttl"]
    strategy = find("DaemonSet", "dnsmirror")["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"]
    capabilities = main_container()["securityContext"]["capabilities"]
    assert capabilities == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "SYS_NICE"]}
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    resources = main_container()["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]


def test_node_setup_daemonset_matches_dnsmirror(effective):
    spec = pod_spec("dnsmirror-node-setup", NODE_SETUP)
    (init,) = spec["initContainers"]
    env = {item["name"]: item["value"] for item in init["env"]}
    assert env["DNSMIRROR_ADDRESS"] == effective["mirror"]["address"]
    assert int(env["DNSMIRROR_METRICS_PORT"]) == host_port(effective["metrics"]["listen"])[1]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert env["NODE_ROOT"] == mounts["host"]
    assert init["command"] == ["bash", f"{mounts['script']}/node-setup.sh", "install"]
    assert PurePosixPath(env["DNSMIRROR_CA_FILE"]).parent == PurePosixPath(mounts["root-ca"])
    assert spec["hostPID"] is True and spec["hostNetwork"] is True


def test_node_setup_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _subcommands(parser) -> dict:
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def test_deployment_doc_names_only_real_commands_and_keys():
    """Every ``dnsmirror ...`` command and option, and every config key, in docs/deployment.md exists."""
    from dnsmirror.cli import build_parser

    text = (ROOT / "docs/deployment.md").read_text()
    commands = re.findall(r"dnsmirror ((?:ca|config) [a-z]+|serve)([^`\n]*)", text)
    assert len(commands) >= 5
    for command, rest in commands:
        parser = build_parser()
        for word in command.split():
            parser = _subcommands(parser)[word]
        options = {flag for action in parser._actions for flag in action.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z-]+", rest):
            assert flag in options, f"dnsmirror {command}: no option {flag}"
    defaults = yaml.safe_load((ROOT / "dnsmirror/default.yaml").read_text())
    keys = [key for key in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", text)
            # tls.crt: a file
            if key.split(".")[0] in defaults and key.rsplit(".", 1)[1] not in ("crt", "key")]
    assert len(keys) >= 10
    for key in keys:
        node = defaults
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"docs/deployment.md: no config key {key}"
            node = node[part]


def test_dockerfile_installs_the_package_from_the_build_context():
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [
        line.strip() for line in dockerfile.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE}"], "the base image comes from a build argument"
    assert any(line.startswith("ARG BASE_IMAGE=") for line in lines)
    copied = " ".join(line for line in lines if line.startswith("COPY "))
    assert "pyproject.toml" in copied and project["name"] in copied.split()
    if isinstance(project.get("readme"), str):
        assert project["readme"] in copied, "setuptools needs the readme pyproject names"
    assert any("pip install" in line and " ." in line for line in lines)
    assert "dnsmirror" in project["scripts"]
    assert main_container()["command"][0] in project["scripts"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert f"!{project['name']}/" in ignored and "!pyproject.toml" in ignored


# --- on a node: the init container, dnsmirror's probes, node-setup.sh against a fake root ----------


def wait_for(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def dummy_standin(directory: Path) -> Path:
    """A directory with an ``ip`` that creates a veth pair where a dummy interface is asked for."""
    directory.mkdir()
    real_ip = shutil.which("ip")
    wrapper = directory / "ip"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "link add" ] && [ "$4 $5" = "type dummy" ]; then\n'
        f'  {real_ip} link add "$3" type veth peer name "$3p" && exec {real_ip} link set "$3p" up\n'
        "fi\n"
        f'exec {real_ip} "$@"\n'
    )
    wrapper.chmod(0o755)
    return directory


def fake_node_root(root: Path, resolv_conf: str) -> Path:
    """A directory standing in for a node's ``/``: resolv.conf and a Debian trust store holding one
    "distribution" root (``usr/share/ca-certificates/distro/other.crt``)."""
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "usr/local/share/ca-certificates").mkdir(parents=True)
    (root / "etc/ca-certificates/update.d").mkdir(parents=True)
    other = create_ca(root / "other-ca", common_name="a distribution root")
    (root / "usr/share/ca-certificates/distro").mkdir(parents=True)
    shutil.copy(other.cert_path, root / "usr/share/ca-certificates/distro/other.crt")
    (root / "etc/ca-certificates.conf").write_text("distro/other.crt\n")
    (root / "etc/resolv.conf").write_text(resolv_conf)
    return root


def setup_env(root: Path, ca_file: Path, **extra: str) -> dict[str, str]:
    """node-setup.sh's environment for a fake root: Debian's own update-ca-certificates on its dirs."""
    if shutil.which("update-ca-certificates"):
        update = (f"update-ca-certificates --fresh --certsconf {root}/etc/ca-certificates.conf"
                  f" --certsdir {root}/usr/share/ca-certificates"
                  f" --localcertsdir {root}/usr/local/share/ca-certificates"
                  f" --etccertsdir {root}/etc/ssl/certs --hooksdir {root}/etc/ca-certificates/update.d")
    else:
        update = (
            f"find {root}/usr/share/ca-certificates {root}/usr/local/share/ca-certificates -name '*.crt'"
            f" -exec cat {{}} + > {root}/etc/ssl/certs/ca-certificates.crt"
        )
    return clean_env(NODE_ROOT=str(root), DNSMIRROR_CA_FILE=str(ca_file),
                     DNSMIRROR_TRUST_DIR="/usr/local/share/ca-certificates", DNSMIRROR_TRUST_UPDATE=update,
                     DNSMIRROR_RESTART_CMD=f"echo restart >> {root}/containerd-restarts", **extra)


def nameservers(path: Path) -> list[str]:
    return [line.split()[1] for line in path.read_text().splitlines() if line.startswith("nameserver")]


def test_node_setup_in_a_network_namespace(tmp_path):
    require_netns()
    if shutil.which("dig") is None or shutil.which("openssl") is None:
        pytest.skip("dig and openssl are needed (scripts/setup.sh installs them)")
    document = yaml.safe_load(config_text())
    address = document["mirror"]["address"]
    metrics = f"http://{document['metrics']['listen']}"

    ca_dir = tmp_path / "ca"
    config_file = tmp_path / "configmap-config.yaml"
    config_file.write_text(config_text())
    done = subprocess.run([*DNSMIRROR, "ca", "init", "--dir", str(ca_dir), "--config", str(config_file)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The ConfigMap's addresses as they are; only paths of this machine and a loopback upstream differ.
    document["tls"] = {"ca_cert": str(ca_dir / "ca.crt"), "ca_key": str(ca_dir / "ca.key")}
    document["cache"].update(dir=str(tmp_path / "cache"), containerd_content=str(tmp_path / "containerd"))
    (tmp_path / "containerd").mkdir()
    document["dns"].update(upstreams=["127.0.0.1:53"], timeout="300ms")
    secret = tmp_path / "peer-secret"
    secret.write_text("a-test-peer-secret-of-enough-bytes\n")
    secret.chmod(0o600)
    document["peers"].update(secret_file=str(secret), resolvers=["127.0.0.1:53"])
    node_config = tmp_path / "node-config.yaml"
    node_config.write_text(yaml.safe_dump(document))

    with Cluster() as cluster:
        node = cluster.add("node")
        # the init container's script, twice: a restarted pod finds the interface in place
        init_env = clean_env()
        probe = node.run(["ip", "link", "add", "dmprobe0", "type", "dummy"], check=False)
        if probe.returncode == 0:
            node.run(["ip", "link", "del", "dmprobe0"])
        else:
            # this kernel has no dummy driver (real nodes do): an `ip` that makes a veth instead
            init_env["PATH"] = f"{dummy_standin(tmp_path / 'bin')}:{init_env['PATH']}"
        for _ in range(2):
            node.run(["/bin/sh", "-ec", init_script()], env=init_env)
        link = node.run(["ip", "-o", "addr", "show", "dev", "dnsmirror0"]).stdout.decode()
        assert f"inet {address}/32" in link and link.count("inet ") == 1
        assert "UP" in node.run(["ip", "-o", "link", "show", "dnsmirror0"]).stdout.decode()

        server = node.start([*DNSMIRROR, "serve", "--config", str(node_config)], name="dnsmirror",
                            env=clean_env(PYTHONPATH=str(ROOT)))
        # the DaemonSet's probes, at the addresses the manifest gives them
        wait_for(lambda: node.call(http_status, f"{metrics}/readyz") == 200 or not server.alive(), "/readyz")
        assert server.alive(), server.describe()
        assert node.call(http_status, f"{metrics}/healthz") == 200
        answer = node.run(["dig", "+short", "+time=2", "+tries=1", f"@{address}", "registry.k8s.io", "A"])
        assert answer.stdout.decode().split() == [address]
        skipped = node.run(["dig", "+short", "+time=2", "+tries=1", f"@{address}", document["skip"][0], "A"],
                           check=False)
        assert address not in skipped.stdout.decode(), "the bootstrap registry must not be captured"

        original = "search corp.example\nnameserver 10.0.0.2\nnameserver 10.0.0.3\noptions ndots:2\n"
        root = fake_node_root(tmp_path / "node-root", original)
        env = setup_env(root, ca_dir / "root.crt")
        node.run(["bash", str(SCRIPT), "install"], env=env)

        resolv = root / "etc/resolv.conf"
        assert nameservers(resolv) == [address, "10.0.0.2", "10.0.0.3"]
        assert "search corp.example" in resolv.read_text() and "options ndots:2" in resolv.read_text()
        assert (root / "etc/dnsmirror/resolv.conf.orig").read_text() == original
        assert nameservers(root / "etc/dnsmirror/resolv.conf.upstream") == ["10.0.0.2", "10.0.0.3"]
        assert (root / "containerd-restarts").read_text() == "restart\n"
        bundle = root / "etc/ssl/certs/ca-certificates.crt"
        assert (ca_dir / "root.crt").read_text().strip() in bundle.read_text()

        # the node's new resolver answers captured names with the mirror, and the node's new trust
        # store verifies the leaf dnsmirror mints for that name
        first = nameservers(resolv)[0]
        answer = node.run(["dig", "+short", "+time=2", "+tries=1", f"@{first}", "ghcr.io", "A"])
        assert answer.stdout.decode().split() == [address]
        handshake = node.run(["openssl", "s_client", "-connect", f"{address}:443", "-servername", "ghcr.io",
                              "-CAfile", str(bundle), "-verify_return_error", "-brief"],
                             input=b"", timeout=30, check=False)
        output = (handshake.stdout + handshake.stderr).decode()
        assert handshake.returncode == 0 and "Verification: OK" in output, output

        # idempotent: nothing changes, containerd is not restarted again
        before = resolv.read_text()
        node.run(["bash", str(SCRIPT), "install"], env=env)
        assert resolv.read_text() == before
        assert (root / "containerd-restarts").read_text() == "restart\n"
        assert node.run(["bash", str(SCRIPT), "status"], env=env).stdout.decode().count("dnsmirror") >= 2

        # systemd-resolved: resolv.conf is a symlink to the stub; the real resolvers are in its own file
        stub_root = fake_node_root(tmp_path / "resolved-root", "")
        (stub_root / "etc/resolv.conf").unlink()
        run_dir = stub_root / "run/systemd/resolve"
        run_dir.mkdir(parents=True)
        (run_dir / "stub-resolv.conf").write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n")
        (run_dir / "resolv.conf").write_text("nameserver 10.0.0.7\nsearch corp.example\n")
        (stub_root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
        stub_env = setup_env(stub_root, ca_dir / "root.crt")
        node.run(["bash", str(SCRIPT), "install"], env=stub_env)
        stub_resolv = stub_root / "etc/resolv.conf"
        assert not stub_resolv.is_symlink()
        assert nameservers(stub_resolv) == [address, "10.0.0.7"]
        assert "search corp.example" in stub_resolv.read_text()
        node.run(["bash", str(SCRIPT), "uninstall"], env=stub_env)
        assert (
            stub_resolv.is_symlink()
            and str(stub_resolv.readlink()) == "../run/systemd/resolve/stub-resolv.conf"
        )

        # uninstall: the resolver comes back first, then the CA goes (and containerd restarts once)
        node.run(["bash", str(SCRIPT), "uninstall"], env=env)
        assert resolv.read_text() == original
        assert not (root / "usr/local/share/ca-certificates/dnsmirror-root.crt").exists()
        assert (ca_dir / "root.crt").read_text().strip() not in bundle.read_text()
        assert "BEGIN CERTIFICATE" in bundle.read_text(), "the distribution root stays"
        assert (root / "containerd-restarts").read_text() == "restart\nrestart\n"

        # dnsmirror down: the CA is still installed (it must come first) but the resolver is left alone
        server.stop()
        down_root = fake_node_root(tmp_path / "down-root", original)
        refused = node.run(["bash", str(SCRIPT), "install"], env=setup_env(down_root, ca_dir / "root.crt"),
                           check=False)
        assert refused.returncode != 0
        assert "resolver left unchanged" in refused.stderr.decode()
        assert (down_root / "etc/resolv.conf").read_text() == original
        assert (down_root / "usr/local/share/ca-certificates/dnsmirror-root.crt").exists()


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed"
)
def test_the_image_is_set_in_one_place_for_the_daemonset_and_the_node_setup(tmp_path):
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    component = copy / "image" / "kustomization.yaml"
    (document,) = documents(component)
    document["images"] = [
        {"name": "dnsmirror", "newName": "registry.example.com/ops/dnsmirror", "newTag": "9.9.9"}
    ]
    component.write_text(yaml.safe_dump(document))
    for directory in (copy, copy / "node-setup"):
        built = subprocess.run(
            ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
        )
        assert built.returncode == 0, built.stderr
        images = {
            line.split("image:", 1)[1].strip() for line in built.stdout.splitlines() if "image:" in line
        }
        assert images == {"registry.example.com/ops/dnsmirror:9.9.9"}, (directory, images)
