"""The MQTT edges; their codec is compiled to C when built (see gateway.compiled)."""

from gateway.compiled import prefer_compiled

COMPILED = prefer_compiled(__name__, __path__)
