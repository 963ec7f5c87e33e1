"""hello_streaming: frontend -> middle -> backend, streaming text word by word (the Dynamo hello world)."""
