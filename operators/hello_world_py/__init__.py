"""hello_world written Python-first: the classes declare their callees and their defaults.

    runner deploy operators.hello_world_py:EncoderDecoder     (compiles in memory, then deploys)
    runner compile operators.hello_world_py:EncoderDecoder -o deployments/hello_world_py.yaml
"""

from .pipeline import Decoder, Encoder, EncoderDecoder

__all__ = ["Decoder", "Encoder", "EncoderDecoder"]
