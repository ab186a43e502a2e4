"""The console: what an administrator sees and does over HTTP.

``app`` (the FastAPI application: pages, JSON API under ``/api/``, ``/healthz`` and ``/readyz``), ``server`` (uvicorn
in a thread of the node, optional TLS), ``users`` (local accounts, roles, API tokens), ``health`` (readiness
checks), ``preview`` (PNG of a received image with the model's boxes), ``webhooks`` (notifications that follow the
job store's events), ``templates/`` and ``static/`` (Jinja2 pages, a little CSS and JavaScript).
"""
