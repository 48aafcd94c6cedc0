"""The eDIF broker: the public endpoint nnsight 0.8.1 clients talk to (`remote=True`).

`app` is the HTTP/websocket front (wire protocol only), `service` the job lifecycle behind it
(admission, routing, relaying site updates, result delivery), `sites`/`catalog` the gRPC side
towards site agents, and `main` the wiring (`build_app`, `run`). See each module's docstring.
"""
