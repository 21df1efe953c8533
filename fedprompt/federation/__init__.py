"""Flower glue: the only importer of flwr, thin around the plain client code in `local.py`.

    wire.py        payload <-> Flower records, bytes on the wire
    strategy.py    Flower's strategy classes from the config, and their state for checkpoints
    server_app.py  the ServerApp: the round loop (sample, send, validate, aggregate, evaluate,
                   checkpoint, record)
    handler.py     what a client does with one request (init / fit / evaluate), no Flower
    client_app.py  the ClientApp: in simulation it runs the handler in its long-lived worker;
                   in deployment it forwards to the `fedprompt client` process (bridge)
    worker.py      `fedprompt client`: holds the backbone, serves the bridge, supervises the
                   SuperNode
    processes.py   starting and stopping SuperLink / SuperNode / `flwr run` subprocesses
    runner.py      `fedprompt simulate` / `fedprompt server`: start, follow, summarise
    app/           the Flower App (pyproject.toml only: components point into this package)
"""
