"""hello_streaming written Python-first: frontend -> middle -> backend, declared in code.

    runner deploy operators.hello_streaming_py:Frontend     (compiles in memory, then deploys)
    runner compile operators.hello_streaming_py:Frontend -o deployments/hello_streaming_py.yaml
"""

from .pipeline import Backend, Frontend, Middle, TextChunk, TextRequest

__all__ = ["Backend", "Frontend", "Middle", "TextChunk", "TextRequest"]
