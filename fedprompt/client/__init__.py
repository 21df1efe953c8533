"""The client side: `fedprompt client` and the ClientApp.

    app.py       the ClientApp: Flower message <-> protocol.Request / Reply; in simulation it
                 serves in the Ray worker, in deployment inside the `fedprompt client` process
    worker.py    `fedprompt client`: holds the backbone, supervises the SuperNode, serves tasks
    executor.py  takes the SuperNode's tasks and answers them in this process, refusing runs
                 of any app but the fedprompt installed here
    handler.py   what a client does with one Request (init / fit / evaluate), no Flower
    secagg.py    the mods of a secure round around Flower's SecAgg+ mod (claim, unmask guard,
                 the bridge to fedprompt's train reply)
    guard.py     the checks of a server's global before anything is loaded, and the record
                 of what was received and sent
The client's plain training code is `fedprompt.local` (shared with the audit and benchmarks).
"""
