"""The HTTP front door of a deployment: Open Inference Protocol v2, JSON and streaming endpoints.

``runner deploy`` runs ``http.workers`` ingress processes (:mod:`.process`) next to the workers;
each is a NATS client of the deployment (:mod:`.ingress`) serving HTTP on uvicorn (:mod:`.server`).
"""
