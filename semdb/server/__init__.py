"""``semdb serve``: a search page and a JSON API over one database, the model kept loaded.

:mod:`semdb.server.app` is the ASGI app, :mod:`semdb.server.thumbnails` the thumbnail cache,
:mod:`semdb.server.command` the sub-command; ``static/`` holds the page. FastAPI and uvicorn are
the ``server`` extra (``pip install 'semdb[server]'``), imported only when serving.
"""
