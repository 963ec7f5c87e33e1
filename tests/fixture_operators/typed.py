"""Python-first operators with typed endpoints, and one calling them through ``depends``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from pipeline_runner import BadInputError, Operator, endpoint, depends, operator_defaults


class GreetRequest(BaseModel):
    name: str = Field(min_length=1)
    times: int = Field(1, ge=1, le=10)


class Greeting(BaseModel):
    text: str


class CountRequest(BaseModel):
    up_to: int = Field(ge=0, le=100)


class Count(BaseModel):
    index: int


class Total(BaseModel):
    greeting: str
    counted: list[int]


class Greeter(Operator):
    @endpoint
    async def greet(self, request: GreetRequest) -> Greeting:
        if request.name == "nobody":
            raise BadInputError("nobody cannot be greeted")
        return Greeting(text=" ".join([f"hello {request.name}"] * request.times))


@operator_defaults(name="counter", max_inflight_requests=4)
class Counting(Operator):
    @endpoint
    async def count(self, request: CountRequest) -> AsyncIterator[Count]:
        for index in range(request.up_to):
            yield Count(index=index)


class Liar(Operator):
    """Answers something that is not its response model."""

    @endpoint
    async def greet(self, request: GreetRequest) -> Greeting:
        return {"text": 42}  # type: ignore[return-value]


@operator_defaults(workers=2)
class Front(Operator):
    greeter = depends(Greeter)
    counter = depends(Counting)
    liar = depends("fixture_operators.typed:Liar")  # by name: resolved when first used

    @endpoint
    async def run(self, request: GreetRequest) -> Total:
        greeting = await self.greeter.request(request)
        counted = [count.index async for count in self.counter.stream(CountRequest(up_to=request.times))]
        if request.name == "liar":
            await self.liar.request(request)
        return Total(greeting=greeting.text, counted=counted)
