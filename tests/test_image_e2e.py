"""dnsmirror's own image: built from the Dockerfile with no network, pushed, pulled by containerd and run
as the DaemonSet runs it.

The build (``harness.imagebuild``) uses a Debian root filesystem and dependency wheels that
scripts/setup.sh caches, inside a namespace with no route anywhere. The image is pushed to the test
registry and pulled by containerd on a node namespace, then run by containerd (runc) with the
DaemonSet's settings, read from manifests/daemonset.yaml: the node's network, a read-only root
filesystem, every capability dropped but the ones the manifest adds, no new privileges, the
ConfigMap's config.yaml and the CA Secret mounted read-only, the cache and /tmp writable. It answers
DNS and HTTPS and serves a pull. The init container's own script runs in the image too, with only
NET_ADMIN, on a fresh node namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dns_support import busy_machine, children, wait_until
from harness import ECR_HOST, require_netns
from harness.containerd import Containerd
from harness.imagebuild import build_dnsmirror_image, image_inputs
from harness.images import build_image, push_image, skopeo_copy
from harness.netns import Cluster, Namespace
from harness.pki import TestCA, bundle, create_ca
from harness.registry import Registry
from harness.runtimes import missing
from mirror_support import resolve, upstream_dns

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
IMAGE = f"{ECR_HOST}/dnsmirror/dnsmirror:test"
# runc's default set (ctr run): what "drop ALL" has to take away
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")
CAPABILITY_BITS = {"NET_BIND_SERVICE": 10, "NET_ADMIN": 12, "SYS_NICE": 23}


def pod_spec() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests/daemonset.yaml").read_text())["spec"]["template"]["spec"]


def configmap_config() -> dict[str, Any]:
    return yaml.safe_load(
        yaml.safe_load((ROOT / "manifests/configmap.yaml").read_text())["data"]["config.yaml"]
    )


def capability_flags(container: dict[str, Any]) -> list[str]:
    """``ctr run`` flags for the container's ``securityContext.capabilities`` (drop ALL, add some)."""
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    added = capabilities.get("add", [])
    flags = [f"--cap-drop=CAP_{name}" for name in DEFAULT_CAPABILITIES if name not in added]
    return flags + [f"--cap-add=CAP_{name}" for name in added if name not in DEFAULT_CAPABILITIES]


@dataclass
class World:
    cluster: Cluster
    ca: TestCA
    registry: Registry
    dns: str
    work: Path
    node: Namespace
    dnsmirror_ca: Path
    trust: Path
    containerd: Containerd


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The image, built offline and pushed once, in a registry the node can reach."""
    require_netns()
    reason = missing("buildah", "runc", "containerd-shim-runc-v2", "nsenter", "unshare")
    inputs = image_inputs()
    if reason or isinstance(inputs, str):
        pytest.skip(reason or str(inputs))
    work = tmp_path_factory.mktemp("image-e2e")
    with Cluster() as cluster:
        registry_ns = cluster.add("registry")
        builder = cluster.add("builder", hosts={ECR_HOST: registry_ns.address})
        ca = create_ca(work / "public-ca")
        with Registry(registry_ns, ECR_HOST, ca, work / "registry") as registry, \
                upstream_dns(registry_ns, work / "dns", {ECR_HOST: registry_ns.address}) as dns:
            buildah = build_dnsmirror_image(builder, work / "buildah", ssl_cert_file=ca.cert_path)
            try:
                # pushed from the builder, which has no route but to the test namespaces; uncompressed
                # layers spare this small machine two gzip passes
                buildah.run(["push", "--quiet", "--disable-compression", "localhost/dnsmirror:test", f"docker://{IMAGE}"],
                            timeout=300)
            finally:
                buildah.close()
            # a node whose dnsmirror is not there yet resolves with the real DNS; containerd on it, trusting
            # the public CA and the dnsmirror root the node will use, pulls the image once for both tests
            node = cluster.add("node", nameservers=[dns])
            dnsmirror_ca = work / "dnsmirror-ca"
            subprocess.run([sys.executable, "-m", "dnsmirror", "ca", "init", "--dir", str(dnsmirror_ca)],
                           check=True, capture_output=True, timeout=60)
            trust = bundle([ca.cert_path, dnsmirror_ca / "root.crt"], work / "node-trust.pem")
            with Containerd(
                node, work / "containerd", ssl_cert_file=trust, runs_containers=True
            ) as containerd:
                pulled = containerd.pull(IMAGE, check=False, timeout=300)
                assert pulled.returncode == 0, (pulled.stdout + pulled.stderr).decode()
                yield World(cluster, ca, registry, dns, work, node, dnsmirror_ca, trust, containerd)


def task_pid(containerd: Containerd, name: str) -> int:
    for line in containerd.ctr(["task", "ls"]).stdout.decode().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return int(fields[1])
    raise AssertionError(f"no task {name}")


def realtime_refused_in_cgroup_of(pid: int) -> bool:
    """Whether the kernel gives ``pid``'s CPU cgroup no real-time time (``CONFIG_RT_GROUP_SCHED``, a cgroup
    v1 ``cpu`` hierarchy whose ``cpu.rt_runtime_us`` is 0)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            runtime = Path(f"/sys/fs/cgroup/{controllers}{path}/cpu.rt_runtime_us")
            return runtime.exists() and int(runtime.read_text()) == 0
    return False


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_the_image_runs_as_the_daemonset_runs_it(world: World, tmp_path: Path) -> None:
    node, dnsmirror_ca, trust, containerd = world.node, world.dnsmirror_ca, world.trust, world.containerd
    spec = pod_spec()
    (container,) = spec["containers"]

    # the volumes as the kubelet would lay them out: Secrets 0400, the ConfigMap's file, hostPaths
    host = {name: tmp_path / "volumes" / name for name in ("config", "ca", "peer-secret", "cache",
                                                          "containerd-content", "tmp")}
    for directory in host.values():
        directory.mkdir(parents=True)
    for name in ("ca.crt", "ca.key"):
        shutil.copy(dnsmirror_ca / name, host["ca"] / name)
        (host["ca"] / name).chmod(0o400)
    (host["peer-secret"] / "secret").write_text(secrets.token_hex(24))
    (host["peer-secret"] / "secret").chmod(0o400)
    shutil.copy(world.ca.cert_path, host["config"] / "public-ca.crt")
    config = configmap_config()
    # the ConfigMap as it is, but for this node's address, the test's DNS and registry CA, and no
    # cluster DNS to find peers with
    config["mirror"]["address"] = node.address
    config["dns"].update(listen=[f"{node.address}:53"], upstreams=[f"{world.dns}:53"])
    config["https"]["listen"] = [f"{node.address}:443"]
    config["metrics"]["listen"] = f"{node.address}:9090"
    config.setdefault("upstream", {})["ca_bundle"] = "/etc/dnsmirror/config/public-ca.crt"
    config["peers"] = {"listen": config["peers"]["listen"], "secret_file": config["peers"]["secret_file"]}
    (host["config"] / "config.yaml").write_text(yaml.safe_dump(config))

    volume_names = {volume["name"] for volume in spec["volumes"]}
    mounts = []
    for mount in container["volumeMounts"]:
        assert mount["name"] in volume_names and mount["name"] in host, mount
        mode = "ro" if mount.get("readOnly") else "rw"
        mounts.append(f"--mount=type=bind,src={host[mount['name']]},dst={mount['mountPath']},options=rbind:{mode}")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # ctr's default: no new privileges
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = [f"--env={item['name']}={item['value']}" for item in container.get("env", [])]

    log = tmp_path / "dnsmirror.log"
    name = f"dnsmirror-{secrets.token_hex(3)}"
    started = containerd.ctr(
        [
            "run",
            "--detach",
            "--log-uri",
            f"file://{log}",
            "--net-host",
            "--read-only",
            *capability_flags(container),
            *mounts,
            *env,
            IMAGE,
            name,
            *container["command"],
        ],
        check=False,
    )
    assert started.returncode == 0, (started.stdout + started.stderr).decode()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if node.call(resolve, node.address, ECR_HOST) == [node.address]:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert node.call(resolve, node.address, ECR_HOST) == [node.address], log.read_text()

        pid = task_pid(containerd, name)
        status = proc_status(pid)
        added = container["securityContext"]["capabilities"]["add"]
        assert int(status["CapEff"], 16) == sum(1 << CAPABILITY_BITS[cap] for cap in added)
        assert int(status["CapBnd"], 16) == int(status["CapEff"], 16)
        # SYS_NICE: the DNS process runs at real-time priority in the container's cgroup, within its budget,
        # unless the kernel gives that cgroup no real-time time (CONFIG_RT_GROUP_SCHED): then it says why
        dns_processes = children(pid)
        assert len(dns_processes) == 1, log.read_text()  # dns.processes: 1
        assert wait_until(lambda: log.read_text().count('"dns_realtime"') == len(dns_processes), 10), \
            log.read_text()
        said = [json.loads(line[line.index("{"):]) for line in log.read_text().splitlines()
                if '"dns_realtime"' in line]
        for dns_process, word in zip(dns_processes, said, strict=True):
            if realtime_refused_in_cgroup_of(dns_process):
                assert os.sched_getscheduler(dns_process) == os.SCHED_OTHER
                assert not word["enabled"] and word["reason"] == "Operation not permitted", word
            else:
                assert word["enabled"], word
                with busy_machine():  # held while the machine is busy (an idle one answers sooner without)
                    held = wait_until(lambda pid=dns_process: os.sched_getscheduler(pid) == os.SCHED_RR, 10)
                    assert held, log.read_text()
        assert status["NoNewPrivs"] == "1"
        root = next(line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                    if line.split()[4] == "/")
        assert "ro" in root[5].split(",")

        # HTTPS and a pull: the node's resolver is dnsmirror now, the node trusts its root
        node.write_resolv_conf([node.address])
        image = build_image(tmp_path / "app", tag="v1", platforms=("linux/amd64",))
        push_image(image, world.cluster.add("pusher", hosts={ECR_HOST: world.registry.address}),
                   f"{ECR_HOST}/team/app:v1", ca_file=world.ca.cert_path)
        skopeo_copy(node, f"docker://{ECR_HOST}/team/app:v1", f"oci:{tmp_path / 'copy'}:v1", ca_file=trust)
        layer = image.platform("linux/amd64").layers[0]
        records = [json.loads(line[line.index("{"):]) for line in log.read_text().splitlines() if "{" in line]
        assert any(record.get("event") == "access" and record.get("path", "").endswith(layer.digest)
                   and record.get("status") == 200 for record in records), log.read_text()[-3000:]
        # the blob went to the writable cache volume; the root filesystem stayed read-only
        assert any(layer.digest.split(":")[1] in path.name for path in host["cache"].rglob("*"))
        readyz = node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                           f"http://{node.address}:9090/readyz"], check=False).stdout
        assert readyz == b"200"
    finally:
        containerd.ctr(["task", "kill", "--signal", "SIGKILL", name], check=False)
        containerd.ctr(["task", "delete", "--force", name], check=False)
        containerd.ctr(["container", "delete", name], check=False)


def dummy_link_type_exists(namespace: Namespace) -> bool:
    probe = namespace.run(["ip", "link", "add", "dmprobe0", "type", "dummy"], check=False)
    if probe.returncode == 0:
        namespace.run(["ip", "link", "del", "dmprobe0"])
    return probe.returncode == 0


def test_the_init_container_adds_the_node_address_or_says_why_not(world: World, tmp_path: Path) -> None:
    (init,) = pod_spec()["initContainers"]
    address = configmap_config()["mirror"]["address"]
    fresh_node = world.cluster.add("fresh-node")
    done = world.containerd.ctr(
        [
            "run",
            "--rm",
            "--read-only",
            f"--with-ns=network:/run/netns/{fresh_node.name}",
            *capability_flags(init),
            IMAGE,
            f"init-{secrets.token_hex(3)}",
            *init["command"],
        ],
        check=False,
        timeout=60,
    )
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, output
    if dummy_link_type_exists(fresh_node):
        device = "dnsmirror0"
    else:
        device = "lo"
        assert "this kernel has no dummy link type" in output, output
    addresses = fresh_node.run(["ip", "-o", "addr", "show", "dev", device]).stdout.decode()
    assert f"inet {address}/32" in addresses
