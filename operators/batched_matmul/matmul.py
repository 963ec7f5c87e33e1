"""A batch-friendly operator: ``y = x @ W`` for each request's vector, one product per batch.

Each request sends ``x``, a vector of ``dim`` numbers; the answer is ``y``, its product with a
fixed ``dim`` x ``dim`` float32 weight matrix (4 MiB at the default 1024), and the parameter
``batch``, the number of requests served by the same product.

Batching pays where a call has a fixed cost that a batch shares. On a GPU that is the kernel
launch, the synchronisation and reading the weights from memory, whatever the batch size. On a
CPU a matrix-vector product is already efficient, so the operator models the GPU's fixed cost
with ``call_overhead_ms`` (default 2): every ``execute`` holds a one-at-a-time "device" for that
long before its product, leaving the worker's CPU free meanwhile as a GPU would.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import numpy as np

from pipeline_runner import BadInputError, Operator, OperatorContext, Request


class BatchedMatmul(Operator):
    def __init__(self, context: OperatorContext):
        super().__init__(context)
        self.dim = int(self.parameters.get("dim", 1024))
        self.call_overhead_s = float(self.parameters.get("call_overhead_ms", 2.0)) / 1000
        rng = np.random.default_rng(int(self.parameters.get("seed", 0)))
        self.weights = (rng.standard_normal((self.dim, self.dim), dtype=np.float32) / math.sqrt(self.dim))
        self._device = asyncio.Lock()  # one batch on the device at a time
        self.batch_sizes: Counter[int] = Counter()

    async def execute(self, requests: list[Request]) -> None:
        vectors, members = [], []
        for request in requests:
            try:
                vectors.append(await self._vector(request))
                members.append(request)
            except BadInputError as exc:  # the others of the batch go on
                await request.fail(str(exc), "bad_input")
        if not members:
            return
        async with self._device:
            if self.call_overhead_s:
                await asyncio.sleep(self.call_overhead_s)
            products = np.stack(vectors) @ self.weights
        self.batch_sizes[len(members)] += 1
        for request, y in zip(members, products, strict=True):
            await request.respond({"y": y}, parameters={"batch": len(members)})

    async def _vector(self, request: Request) -> np.ndarray:
        x = np.asarray(await request.array("x"))
        if x.shape != (self.dim,) or x.dtype.kind not in "iuf":
            raise BadInputError(f"x must be a vector of {self.dim} numbers, got {x.dtype} of shape {x.shape}")
        return x.astype(np.float32, copy=False)

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())}}
