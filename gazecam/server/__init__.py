"""The stop-and-ask service (``gazecam serve``): a FastAPI app with websocket asks, live state,
REST status and control, metrics, and a web client for the phone.

Modules: ``settings`` (ServerSettings), ``command`` (the CLI command), ``app`` (create_app,
serve), ``runtime`` (the assistant and its threads), ``pipeline`` (the capture loop),
``routes`` and ``ws`` (HTTP and websockets), ``deps`` (dependencies), ``protocol`` (client
messages and limits), ``errors`` (exceptions to client errors), ``metrics`` (Prometheus).
This package's own import stays cheap: ``gazecam.cli`` imports ``command`` for every command.
"""
