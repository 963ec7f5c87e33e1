from pipeline_runner import Operator, Request


class BadSetup(Operator):
    async def setup(self) -> None:
        raise RuntimeError("model weights not found at /nonexistent")

    async def execute(self, requests: list[Request]) -> None:  # pragma: no cover
        raise AssertionError("never served")
