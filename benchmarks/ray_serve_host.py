"""Keeps the peer's Ray Serve hello_world up behind Serve's HTTP proxy, for an outside load generator.

Run with the Python of a venv holding ``ray[serve]`` (see ../shared/peers/ray_serve/README.md);
benchmarks/http_ingress.py starts it. It starts Ray exactly as the peer's bench.py does (private,
loopback only, no dashboard or usage stats: bench.py sets that environment on import), deploys
the app, prints ``READY <url>`` once the proxy routes it, then serves until its stdin closes or
it gets SIGTERM, and shuts Ray down, killing any Ray process left after 15 s.

    ray-venv/bin/python benchmarks/ray_serve_host.py --peer ../shared/peers/ray_serve --port 8123
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", type=Path, required=True, help="directory of the peer's bench.py and hello_world.py")
    parser.add_argument("--port", type=int, required=True, help="port of Serve's HTTP proxy on 127.0.0.1")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of each of the three deployments (2)")
    parser.add_argument("--max-ongoing-requests", type=int, default=64)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    sys.path.insert(0, str(args.peer.resolve()))
    import bench  # the peer's driver: its import keeps Ray on loopback and off the network
    import hello_world
    import ray
    from ray import serve

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    scratch_home = tempfile.mkdtemp(prefix="ray_peer_home_")
    Path(scratch_home, "ray_bootstrap_config.yaml").write_text("{}\n")
    os.environ["HOME"] = scratch_home
    procs: dict[int, str] = {}
    try:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)
        log_cfg = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port},
                    logging_config=log_cfg)
        app = hello_world.build_app({
            "encoder_replicas": args.replicas, "decoder_replicas": args.replicas,
            "encoder_decoder_replicas": args.replicas, "max_ongoing_requests": args.max_ongoing_requests,
        })
        serve.run(app, name=bench.APP, route_prefix=bench.ROUTE, logging_config=log_cfg)
        base = f"http://127.0.0.1:{args.port}"
        until = time.monotonic() + 60
        while bench.ROUTE not in _get(base + "/-/routes"):  # the proxy learns its routes late
            if time.monotonic() > until:
                raise RuntimeError(f"Serve's proxy on {base} has no route {bench.ROUTE} after 60 s")
            time.sleep(0.2)
        procs = bench._descendants(os.getpid())
        print(f"READY {base}{bench.ROUTE} {len(procs)} processes", flush=True)
        stop.wait()
    finally:
        procs.update(bench._descendants(os.getpid()))
        for step in (serve.shutdown, ray.shutdown):
            try:
                step()
            except Exception as exc:  # shut down what can be, then reap the rest
                print(f"{step.__name__}: {type(exc).__name__}: {exc}", file=sys.stderr)
        left = bench.reap(procs)
        shutil.rmtree(scratch_home, ignore_errors=True)
        print(f"STOPPED {left} Ray processes were left 15 s after shutdown (then killed)", flush=True)
    return 0


def _get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.read().decode(errors="replace")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
