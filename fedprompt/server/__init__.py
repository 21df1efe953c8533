"""The server side: `fedprompt server` / `fedprompt simulate` and the ServerApp. No torch.

    app.py         the ServerApp: the round loop (sample, send, validate, screen, aggregate,
                   evaluate, checkpoint, record)
    aggregate.py   screening, bounding, Krum's choice, the strategy's aggregate, rollback
    strategies.py  the registry of Flower strategies, and their state for checkpoints
    robust.py      update norms, screening, bounding, Krum on numpy
    runner.py      start the SuperLink (and the front), submit the app, follow the run
    progress.py    the per-round table while a run goes, how it ended, the final summary
    front.py       the only listener on server.address: the Fleet API allowlist
    localgrid.py   an in-process Grid: the round loop against LocalClients in one process
Shared with the client: `fedprompt.wire` (records, bytes), `fedprompt.processes` (Flower's
binaries), `fedprompt.security` (TLS and keys), `fedprompt.protocol` (the vocabulary).
"""
