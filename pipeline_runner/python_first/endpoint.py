"""Typed endpoints: an operator method taking and returning pydantic models, checked at both ends.

``@endpoint`` on ``async def generate(self, request: GenerateRequest) -> GenerateResponse`` (or an
async generator annotated ``-> AsyncIterator[GenerateResponse]``, which streams) gives the class
its ``execute``: request parameters are validated into the request model (a ``bad_input`` error
with pydantic's message if they do not fit) and every response is validated before it is sent,
as its parameters. A streamed answer ends with a final response without parameters. Callers
that hold an :class:`OperatorHandle` (``depends``) validate the same way on their side.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import inspect
import logging
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import BadInputError, ConfigError, OperatorError
from ..operator import Operator, Request
from ..remote import Connection, RemoteOperator
from .declare import class_path, describe_errors, operator_name, operator_version

log = logging.getLogger("pipeline_runner.endpoint")

_ENDPOINT_ATTR = "__pipeline_runner_endpoint__"
_STREAMS = (collections.abc.AsyncIterator, collections.abc.AsyncIterable, collections.abc.AsyncGenerator)


class InvalidResponseError(Exception):
    """An endpoint answered something that is not its response model."""


@dataclass(frozen=True)
class EndpointSpec:
    """The typed entry method of an operator class."""

    owner: type
    method: str
    request_model: type[BaseModel]
    response_model: type[BaseModel]
    streaming: bool

    @property
    def qualname(self) -> str:
        return f"{class_path(self.owner)}.{self.method}"

    def parse_request(self, parameters: Any) -> BaseModel:
        """``parameters`` as the request model; BadInputError with pydantic's message if they do not fit."""
        try:
            return self.request_model.model_validate(parameters)
        except ValidationError as exc:
            raise BadInputError(f"invalid {self.request_model.__name__}: {'; '.join(describe_errors(exc))}") from None

    def request_parameters(self, request: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
        """What a caller sends for ``request`` (a request model or its JSON form), checked as the
        worker will check it."""
        if isinstance(request, BaseModel):
            if not isinstance(request, self.request_model):
                raise BadInputError(f"{self.qualname} takes a {self.request_model.__name__}, got a {type(request).__name__}")
            sent = request.model_dump(mode="json")
            self.parse_request(sent)  # it may have been changed since it was made
            return sent
        return self.parse_request(request).model_dump(mode="json")

    def response_parameters(self, response: Any) -> dict[str, Any]:
        """``response`` (a response model or its JSON form) as the parameters to send, checked as
        its caller will check them."""
        model = self.response_model
        if isinstance(response, BaseModel) and not isinstance(response, model):
            raise InvalidResponseError(f"{self.qualname} must answer {model.__name__}, got a {type(response).__name__}")
        sent = response.model_dump(mode="json") if isinstance(response, BaseModel) else response
        try:
            validated = model.model_validate(sent)
        except ValidationError as exc:
            raise InvalidResponseError(f"{self.qualname} answered an invalid {model.__name__}: {'; '.join(describe_errors(exc))}") from None
        return sent if isinstance(response, BaseModel) else validated.model_dump(mode="json")


class _Endpoint:
    """What ``@endpoint`` puts in the class body until the class exists (see ``__set_name__``)."""

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def __set_name__(self, owner: type, name: str) -> None:
        # Runs while the class is created, before ABCMeta decides whether it is abstract, so the
        # execute() installed here makes the class complete.
        where = class_path(owner)
        if "execute" in owner.__dict__:
            raise TypeError(f"{where}: define execute() or an @endpoint method, not both")
        if _ENDPOINT_ATTR in owner.__dict__:
            raise TypeError(f"{where}: one @endpoint per operator, got {owner.__dict__[_ENDPOINT_ATTR]}() and {name}()")
        setattr(owner, name, self.function)
        setattr(owner, _ENDPOINT_ATTR, name)
        owner.execute = _execute_endpoint  # type: ignore[attr-defined]


def endpoint(function: Callable[..., Any]) -> Any:
    """Make an ``async def`` method taking a pydantic model the operator's typed entry point."""
    if not (inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)):
        raise TypeError(f"@endpoint {function.__qualname__}: must be an 'async def' method")
    return _Endpoint(function)


def endpoint_spec(cls: type) -> EndpointSpec | None:
    """The endpoint of ``cls`` (None without one); ConfigError when its annotations are not usable."""
    return _endpoint_spec(cls)


@cache
def _endpoint_spec(cls: type) -> EndpointSpec | None:
    method = getattr(cls, _ENDPOINT_ATTR, None)
    if method is None:
        return None
    function = getattr(cls, method)
    where = f"{class_path(cls)}.{method}"
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:
        raise ConfigError([f"{where}: cannot resolve its annotations: {type(exc).__name__}: {exc}"]) from None
    parameters = list(inspect.signature(function).parameters.values())[1:]  # after self
    if len(parameters) != 1 or parameters[0].name not in hints:
        raise ConfigError([f"{where}: an @endpoint takes one argument annotated with a pydantic model"])
    request_model = hints[parameters[0].name]
    if not _is_model(request_model):
        raise ConfigError([f"{where}: its argument must be annotated with a pydantic model, got {request_model!r}"])
    returned = hints.get("return")
    streaming = inspect.isasyncgenfunction(function)
    if streaming:
        args = typing.get_args(returned)
        if typing.get_origin(returned) not in _STREAMS or not args or not _is_model(args[0]):
            raise ConfigError([f"{where}: a streaming @endpoint is annotated -> AsyncIterator[Model], got {returned!r}"])
        response_model = args[0]
    elif not _is_model(returned):
        raise ConfigError([f"{where}: an @endpoint is annotated -> Model (a pydantic model), got {returned!r}"])
    else:
        response_model = returned
    return EndpointSpec(cls, method, request_model, response_model, streaming)


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


async def _execute_endpoint(self: Operator, requests: list[Request]) -> None:
    spec = endpoint_spec(type(self))
    assert spec is not None
    method = getattr(self, spec.method)
    if len(requests) == 1:  # the common case, without gather's task per request
        await _serve(spec, method, requests[0])
    else:
        await asyncio.gather(*(_serve(spec, method, request) for request in requests))


async def _serve(spec: EndpointSpec, method: Callable[..., Any], request: Request) -> None:
    """Answer one request, failing it alone (a batch's others go on) when something is wrong."""
    try:
        parsed = spec.parse_request(request.parameters)
        if spec.streaming:
            async for item in method(parsed):
                await request.respond(parameters=spec.response_parameters(item), final=False)
            await request.respond(final=True)
        else:
            await request.respond(parameters=spec.response_parameters(await method(parsed)))
    except BadInputError as exc:
        await _fail(request, str(exc), "bad_input")
    except OperatorError as exc:  # a downstream operator's error keeps its code
        await _fail(request, str(exc), exc.code)
    except InvalidResponseError as exc:
        log.warning("%s", exc)
        await _fail(request, str(exc), "operator_failed")
    except Exception as exc:
        log.exception("%s raised", spec.qualname)
        await _fail(request, f"{type(exc).__name__}: {exc}", "operator_failed")


async def _fail(request: Request, message: str, code: str) -> None:
    if not request.answered:
        await request.fail(message, code)


class OperatorHandle(RemoteOperator):
    """A ``RemoteOperator`` on the operator of an Operator class, with typed calls to its endpoint.

    ``depends`` makes these; elsewhere ``OperatorHandle(Backend, connection=connection)``.
    """

    def __init__(self, target: type[Operator], *, connection: Connection | None = None):
        super().__init__(operator_name(target), operator_version(target), connection=connection)
        self.target = target

    def _spec(self, streaming: bool) -> EndpointSpec:
        spec = endpoint_spec(self.target)
        if spec is None:
            raise TypeError(f"{class_path(self.target)} has no @endpoint: use call() or infer()")
        if spec.streaming != streaming:
            use = "stream()" if spec.streaming else "request()"
            raise TypeError(f"{spec.qualname} {'streams' if spec.streaming else 'answers once'}: use {use}")
        return spec

    async def request(
        self, request: BaseModel | Mapping[str, Any], *, timeout_s: float | None = None
    ) -> BaseModel:
        """Call the endpoint and return its validated response; BadInputError before sending
        when ``request`` does not fit the request model."""
        spec = self._spec(streaming=False)
        parameters = spec.request_parameters(request)
        response = await self.infer(parameters=parameters, timeout_s=timeout_s)
        return self._parse(spec, response.parameters)

    async def stream(
        self, request: BaseModel | Mapping[str, Any], *, timeout_s: float | None = None
    ) -> AsyncIterator[BaseModel]:
        """Call a streaming endpoint and yield each validated response."""
        spec = self._spec(streaming=True)
        parameters = spec.request_parameters(request)
        async with contextlib.aclosing(self.call(parameters=parameters, timeout_s=timeout_s)) as responses:
            async for response in responses:
                if response.final:
                    break  # the end of the stream, without parameters
                yield self._parse(spec, response.parameters)

    def _parse(self, spec: EndpointSpec, parameters: dict[str, Any]) -> BaseModel:
        try:
            return spec.response_model.model_validate(parameters)
        except ValidationError as exc:
            problems = "; ".join(describe_errors(exc))
            message = f"answered an invalid {spec.response_model.__name__}: {problems}"
            raise OperatorError(self.name, "operator_failed", message) from None
