"""wrk, the HTTP load generator, POSTing one body for a while at a fixed number of connections."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# Paths go into Lua long brackets; wrk calls done() once, after the run, with every thread's
# counts merged. Latencies are in microseconds.
LUA = """
local f = assert(io.open([[{body}]], "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d %d %d %d %f %f %f\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


class WrkMissing(RuntimeError):
    pass


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def req_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


async def run_wrk(
    url: str,
    headers: dict[str, str],
    body: bytes,
    connections: int,
    duration_s: float,
    workdir: Path,
    timeout_s: float = 30.0,
) -> WrkResult:
    """Run wrk against ``url`` (keep-alive connections, up to 2 threads) and parse its summary."""
    if shutil.which("wrk") is None:
        raise WrkMissing("wrk is not installed (Debian: apt-get install -y wrk)")
    body_path = workdir / "wrk_body"
    body_path.write_bytes(body)
    script = workdir / "wrk_post.lua"
    lines = "\n".join(f"wrk.headers[ [[{k}]] ] = [[{v}]]" for k, v in headers.items())
    script.write_text(LUA.format(body=body_path, headers=lines))
    args = [
        "wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
        f"--timeout={timeout_s:g}s", "-s", str(script), url,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=duration_s + timeout_s + 30)
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {text[-800:]}")
    f = line.split()[1:]
    connect, read, write, status, timeout = (int(v) for v in f[2:7])
    errors = {"connect": connect, "read": read, "write": write, "non_2xx": status, "timeout": timeout}
    return WrkResult(
        requests=int(f[0]) - status,  # wrk counts non-2xx responses as requests too
        duration_s=int(f[1]) / 1e6,
        p50_ms=float(f[7]) / 1e3,
        p99_ms=float(f[8]) / 1e3,
        max_ms=float(f[9]) / 1e3,
        errors={k: v for k, v in errors.items() if v},
    )
