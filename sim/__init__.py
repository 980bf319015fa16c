"""Vehicle fleet simulator, backend recorder and privacy conformance checker.

Talks to the gateway only over MQTT, like real cars and a real backend do.
"""
