"""`fedprompt` commands: parse arguments, load the config, call one run_* function. No logic.

User errors (config, data, model, payload) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from fedprompt.config import ConfigError, load_config
from fedprompt.errors import UserError

# Offline by default: nothing is fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _common(p: argparse.ArgumentParser, output: bool = False) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults apply to missing keys")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.local_steps=50 (repeatable)",
    )
    if output:
        p.add_argument("--output", metavar="DIR", help="run directory (default: output.dir of the config)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedprompt", description="Federated parameter-efficient fine-tuning.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="centralized baseline: one client holding all the data")
    _common(p, output=True)
    p = sub.add_parser("simulate", help="federated run of federation.num_clients virtual clients on one machine")
    _common(p, output=True)
    p = sub.add_parser("server", help="the federation server: a SuperLink and the round loop (resumes from its checkpoint)")
    _common(p, output=True)
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, no client authentication (trusted networks only); default: TLS + registered clients from server.certs_dir",
    )
    p.add_argument(
        "--keep-alive",
        action="store_true",
        help="after the last round (or on a finished run) stay up, idle, until stopped: for a Kubernetes Deployment, which restarts a server that exits",
    )
    p = sub.add_parser("client", help="a federation client: loads the backbone once and serves every round")
    _common(p)
    p.add_argument("--server", metavar="HOST:PORT", help="the server's address (default: client.server of the config)")
    p.add_argument("--partition-id", type=int, default=0, metavar="I", help="this client's partition of built-in data (default 0)")
    p.add_argument(
        "--num-partitions",
        type=int,
        default=1,
        metavar="N",
        help="how many partitions the built-in data is cut into (default 1: all of it, e.g. with --set data.path=...)",
    )
    p.add_argument("--insecure", action="store_true", help="connect to an --insecure server (plain HTTP, no client key)")
    p.add_argument("--ranks", type=int, metavar="N", help="train on N data-parallel ranks (one per GPU, or CPU processes), started once (sets client.ranks)")
    p = sub.add_parser("eval", help="evaluate an exported adapter on the config's test split")
    _common(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="an adapter/ folder written by a run")
    p = sub.add_parser("audit", help="privacy audit of a finished run: membership inference, canary exposure, the server's label inference")
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory (its config.yaml and adapter/ are used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key of the run's config (e.g. audit.client=2)")
    p = sub.add_parser("compare", help="runs side by side: one table and one PNG of their accuracy curves")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (their metrics.jsonl and config.yaml)")
    p.add_argument("--output", default="compare.png", metavar="PNG", help="where the curves go (default compare.png; the table also as .json beside it)")
    _certs_parser(sub)
    p = sub.add_parser("validate", help="check a config file and print it fully resolved")
    p.add_argument("file", metavar="FILE", nargs="?", help="the config (or use --config FILE)")
    _common(p)
    return ap


def _certs_parser(sub) -> None:
    p = sub.add_parser("certs", help="TLS certificates and client keys for a federation (CA, server, clients, register/revoke)")
    act = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = act.add_parser("init", help="a CA and the server's certificate (ca.crt, server.crt, server.key) in --dir")
    a.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP the clients use to reach the server (repeatable; localhost and 127.0.0.1 always)",
    )
    a = act.add_parser("client", help="a client's key pair (clients/NAME, clients/NAME.pub); --register admits it at once")
    a.add_argument("--name", required=True)
    a.add_argument("--register", action="store_true", help="also add the public key to authorized/")
    a = act.add_parser("register", help="admit a client: copy its public key into authorized/ (a running server picks it up)")
    a.add_argument("--name", required=True)
    a.add_argument("--public-key", metavar="FILE", help="the client's .pub file (default: clients/NAME.pub in --dir)")
    a = act.add_parser("revoke", help="remove a client's key from authorized/ (a running server unregisters it)")
    a.add_argument("--name", required=True)
    act.add_parser("list", help="the admitted clients")
    for a in act.choices.values():
        a.add_argument("--dir", required=True, metavar="DIR", help="the federation's certificate folder")
        a.add_argument(
            "--overwrite", action="store_true", help=argparse.SUPPRESS if a.prog.endswith(("register", "revoke", "list")) else "replace existing files"
        )


def _certs(args) -> None:
    from fedprompt import certs

    d = Path(args.dir)
    if args.action == "init":
        certs.init_ca(d, overwrite=args.overwrite)
        crt = certs.issue_server_cert(d, names=args.server_name, overwrite=args.overwrite)
        print(f"CA: {d / 'ca.crt'} (give it to every client); server: {crt}, {d / 'server.key'}; keep {d / 'ca.key'} offline")
    elif args.action == "client":
        key = certs.new_client_key(d, name=args.name, overwrite=args.overwrite)
        print(f"client {args.name}: private key {key} (only for that client), public key {key}.pub")
        if args.register:
            print(f"registered: {certs.register(d, name=args.name)}")
    elif args.action == "register":
        print(f"registered: {certs.register(d, name=args.name, public_key=args.public_key)}")
    elif args.action == "revoke":
        certs.revoke(d, name=args.name)
        print(f"revoked: {args.name}")
    else:
        for name, f in certs.registered(d).items():
            print(f"{name}\t{f}")


def _run_error(msg: str) -> Exception:
    from fedprompt.rundir import RunError

    return RunError(msg)


def _one_line(msg: str) -> str:
    """Messages are one line each; a library's multi-line text (e.g. a native-library load
    failure quoted in a BackboneError) must not break that."""
    return " ".join(msg.split())


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _validate(args) -> None:
    file = args.file or args.config
    cfg = load_config(file, args.overrides)
    print(cfg.to_yaml(), end="")
    print(f"# {file or 'defaults'}: valid", file=sys.stderr)


def _audit(args) -> None:
    from fedprompt.audit import run_audit

    run_cfg = Path(args.run) / "config.yaml"
    if not run_cfg.is_file():
        raise _run_error(f"--run {args.run!r}: no config.yaml there; pass the directory of a finished run")
    run_audit(load_config(run_cfg, args.overrides), args.run)


def _compare(args) -> None:
    from fedprompt.compare import compare

    compare([Path(r) for r in args.runs], Path(args.output))


def _train(args, cfg) -> None:
    from fedprompt import run

    run.run_train(cfg, args.output or cfg.output.dir, overwrite=args.overwrite)


def _federated(args, cfg) -> None:
    from fedprompt.server import runner

    # Stop Flower's processes on SIGTERM too, and on SIGINT even when it was inherited as
    # ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.command == "simulate":
        runner.run_simulate(cfg, args.output or cfg.output.dir, overwrite=args.overwrite)
    else:  # the server imports no torch: it aggregates tiny numpy arrays
        runner.run_server(cfg, args.output or cfg.output.dir, overwrite=args.overwrite, insecure=args.insecure, keep_alive=args.keep_alive)


def _client(args, cfg) -> None:
    from fedprompt.client.worker import run_client

    run_client(cfg, partition_id=args.partition_id, num_partitions=args.num_partitions, server=args.server, insecure=args.insecure)


def _eval(args, cfg) -> None:
    from fedprompt import run

    run.run_eval(cfg, args.adapter)


# Commands that take arguments only, and those that take the loaded config too.
PLAIN = {"validate": _validate, "certs": _certs, "audit": _audit, "compare": _compare}
WITH_CONFIG = {"train": _train, "simulate": _federated, "server": _federated, "client": _client, "eval": _eval}


# Settings a deployment refuses: (applies to this config, why, naming the command).
SIMULATION_ONLY = [
    # Poisoning measures robust aggregation in a simulation; a deployed client never sends it.
    (
        lambda c: c.attack.clients,
        lambda c: (
            f"attack.clients: {c.attack.clients} poisons updates, a simulation-only research setting; {{command}} refuses it; "
            "set attack.clients=0 (or use `fedprompt simulate`)"
        ),
    ),
    (
        lambda c: c.client.reload_per_message,
        lambda c: (
            "client.reload_per_message: true is a benchmark of the reload-every-message pattern in `fedprompt simulate`; "
            "{command} refuses it; set client.reload_per_message=false"
        ),
    ),
    (
        lambda c: c.federation.lora_ranks,
        lambda c: (
            f"federation.lora_ranks: {c.federation.lora_ranks} gives a simulation's virtual clients their ranks; {{command}} "
            "refuses it: in a deployment each client sets its own peft.lora_r (the server's is the largest), with lora_aggregation 'svd'"
        ),
    ),
]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in PLAIN:
            PLAIN[args.command](args)
            return 0
        ranks = getattr(args, "ranks", None)
        cfg = load_config(args.config, args.overrides + ([f"client.ranks={ranks}"] if ranks is not None else []))
        if cfg.client.ranks > 1 and args.command not in ("client", "server"):  # the server ignores client.*
            raise _run_error(
                f"client.ranks: {cfg.client.ranks} applies to `fedprompt client`; `fedprompt {args.command}` trains in one process per "
                "worker (a simulation fills the machine with federation.workers); set client.ranks=1"
            )
        if args.command in ("server", "client"):
            for applies, why in SIMULATION_ONLY:
                if applies(cfg):
                    raise _run_error(why(cfg).format(command=f"`fedprompt {args.command}`"))
        WITH_CONFIG[args.command](args, cfg)
        return 0
    except ConfigError as e:
        for line in e.problems:
            print(f"fedprompt: config error: {_one_line(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedprompt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, UserError):
            print(f"fedprompt: error: {_one_line(str(e))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
