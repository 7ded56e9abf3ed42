"""gradad.serve: ``gradad serve``, a line-side inspection service on an exported model, without
torch. :mod:`.config` owns the settings, :mod:`.store` the durable log (SQLite in WAL mode and
the heatmap files), :mod:`.inspector` the micro-batched scoring, :mod:`.sources` the watched
folder and the webhook, :mod:`.service` ties them together, :mod:`.app` is the HTTP API and
:mod:`.page` its page, :mod:`.server` runs it under uvicorn. Only :mod:`.app`, :mod:`.openapi`
users and :mod:`.server` need the ``[serve]`` extra (starlette, uvicorn, python-multipart)."""
