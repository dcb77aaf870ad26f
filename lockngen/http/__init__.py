"""The REST API's shared HTTP layer; the file names are the table of contents.

- ``inbound``: what may reach Django at all (the WSGI gate, the bounded JSON
  parser);
- ``views``: the base view every ``/api/v1`` endpoint extends;
- ``fields``: strict input fields and serializers;
- ``pagination``: keyset pagination and its cursor;
- ``errors``: every error as JSON;
- ``schema``: OpenAPI pieces shared by the endpoints;
- ``routers``: the router.

Routes are registered in ``lockngen/urls.py``; the endpoints live in
``generations/api.py`` and ``apikeys/api.py``.
"""
