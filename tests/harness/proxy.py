"""tinyproxy in a namespace: the HTTP egress proxy of a network whose nodes have no direct way out.

It allows ``CONNECT`` to port 443 from the cluster's subnet, resolves names with its namespace's
``/etc/hosts`` (``Cluster.add(..., hosts=...)``), and logs each request on stderr, which
:meth:`EgressProxyServer.connects` reads:

    with EgressProxyServer(proxy_ns, tmp / "proxy") as proxy:
        mirror_config["upstream"]["proxy"] = proxy.url
        ...
        assert proxy.connects() == [f"{ECR_HOST}:443"]
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .netns import Namespace, Process

_CONNECT_LINE = re.compile(r"Request \(file descriptor \d+\): CONNECT (?P<target>\S+) HTTP/")


class EgressProxyServer:
    """tinyproxy on ``namespace.address:port``."""

    def __init__(self, namespace: Namespace, workdir: str | os.PathLike[str], *, port: int = 3128) -> None:
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.port = port
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{self.namespace.address}:{self.port}"

    def start(self, timeout: float = 15) -> EgressProxyServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "tinyproxy.conf"
        config.write_text("\n".join([
            f"Port {self.port}",
            f"Listen {self.namespace.address}",
            "Timeout 60",
            f"Allow {self.namespace.cluster.network}",
            "ConnectPort 443",
            "LogLevel Connect",
            "MaxClients 100",
            "DisableViaHeader Yes",
        ]) + "\n")
        self.process = self.namespace.start(["tinyproxy", "-d", "-c", str(config)], "tinyproxy")
        self.process.wait_listening(self.port, timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> EgressProxyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def connects(self) -> list[str]:
        """The ``host:port`` of every CONNECT request so far, oldest first."""
        if self.process is None:
            return []
        return [
            match["target"] for match in _CONNECT_LINE.finditer(self.process.stdout() + self.process.stderr())
        ]
