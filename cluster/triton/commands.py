"""``fleet import-triton`` and ``fleet export-triton`` (registered by ``cluster.cli``)."""

from __future__ import annotations

import argparse

from workers.errors import InvalidConfig

from cluster.console import say


def cmd_import_triton(args: argparse.Namespace) -> int:
    from cluster.running import repository_of, require_fleet_for_targets
    from cluster.triton.importer import import_repository

    repo, fleet = repository_of(args)  # with a fleet running: its repository, written by its controller
    require_fleet_for_targets(args.targets, fleet, bool(args.repository))
    if fleet is not None:
        say(f"fleet '{fleet.info['fleet']}' is running: ONNX models are built on its workers for "
            f"{args.targets or 'every target it has'}, and loaded")
    report = import_repository(args.source, repo, controller=fleet.controller if fleet is not None else None,
                               targets=args.targets or "auto")
    return 0 if report.ok and report.imported else 1


def cmd_export_triton(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.running import repository_of
    from cluster.triton.export import export_repository

    repo, _ = repository_of(args)
    config = load_config(args.config)
    if not args.target:
        raise InvalidConfig("--target is required: the compute capabilities of the Triton host's GPUs (e.g. 7.5 "
                            "or 7.5,8.6), cpu for ONNX models only, or all for every target built")
    report = export_repository(repo, args.destination, args.target,
                               lambda model: config.model_config_for(model).load_options(), slots=config.slots)
    return 0 if report.exported else 1


def add_commands(sub, with_config) -> None:
    """The two subcommands; ``with_config`` adds --config and --repository as the other commands have them."""
    p = sub.add_parser("import-triton", help="serve a Triton model repository: read its config.pbtxt files, build "
                       "its ONNX models for the fleet's targets, publish its plans per compute capability")
    with_config(p)
    p.add_argument("source", help="the Triton model repository: a directory or a URI (s3://bucket/models, ...)")
    p.add_argument("--targets", help="where ONNX models are built: auto (every target in the running fleet) or a list "
                   "(7.5,T4,V100,cpu); default: auto with a running fleet, else this machine's CPU")
    p.add_argument("--address", help="Ray address of the running fleet (default: auto)")
    p.set_defaults(func=cmd_import_triton)

    p = sub.add_parser("export-triton", help="write the fleet's models as a plain Triton model repository for one "
                       "target (its plans with cc_model_filenames, else ONNX)")
    with_config(p)
    p.add_argument("destination", help="directory (or URI) to write the Triton model repository into")
    p.add_argument("--target", help="compute capabilities of the Triton host's GPUs (7.5, or 7.5,8.6), cpu, or all")
    p.add_argument("--address", help="Ray address of the running fleet (default: auto)")
    p.set_defaults(func=cmd_export_triton)
