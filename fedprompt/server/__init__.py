"""The server side: `fedprompt server` / `fedprompt simulate` and the ServerApp. No torch.

    app.py         the ServerApp: run or resume the federation, checkpoint, record, finish
    rounds.py      one training round (sample, send, check, screen, weigh, aggregate, evaluate)
    evaluation.py  a round's figures: robust federated, and centralized in simulation
    initial.py     round 0: a quorum of clients' seeded payloads, or a trusted adapter
    messages.py    push messages, pull replies with a deadline, wait for clients
    trust.py       what the server believes of a participant: capped claims, agreement,
                   robust figures, how long to wait
    aggregate.py   screening, bounding, Krum's choice, the strategy's aggregate, rollback
    strategies.py  the registry of Flower strategies, and their state for checkpoints
    robust.py      update norms, screening, bounding, Krum on numpy
    runner.py      start the SuperLink (and the front), submit the app, follow the run
    progress.py    the per-round table while a run goes, how it ended, the final summary
    metrics.py     the Prometheus exporter of a running server (server.metrics_address)
    front.py       the only listener on server.address: the Fleet API allowlist
    localgrid.py   an in-process Grid: the round loop against LocalClients in one process
    secagg.py      a secure round: Flower's SecAgg+ stages driven over our Grid, weights
                   capped before masking; the server holds only the mean update
Shared with the client: `fedprompt.wire` (records, bytes), `fedprompt.processes` (Flower's
binaries), `fedprompt.security` (TLS and keys), `fedprompt.protocol` (the vocabulary).
"""
