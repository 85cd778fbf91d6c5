"""`shipyard` command line: run | resume | runs | check | export | report | submit | status | logs | stop.

    shipyard check jobs/**/*.yaml [k.s=v ...]  validate specs (with overrides) without running anything
    shipyard run JOB [key.sub=value ...]       train on an embedded Ray cluster (or --address)
    shipyard runs                              list runs recorded in MLflow
    shipyard resume RUN [key.sub=value ...]    continue a run from its newest complete checkpoint
    shipyard export RUN_OR_CHECKPOINT DIR      write the model (--format safetensors | a family's own)
    shipyard report RUN_OR_CHECKPOINT          a short look at a trained model
    shipyard laplace RUN_OR_CHECKPOINT [laplace.k=v ...]
                                               last-layer Laplace (ICLA, diag, KFAC, full) on a classifier checkpoint
    shipyard serve RUN_OR_CHECKPOINT [--port P] [--replicas N | --autoscaling MIN:MAX] [--token T]
                                               serve it with Ray Serve (--config OUT.yaml: a Serve config file)
    shipyard sweep jobs/sweeps/X.yaml          a Ray Tune sweep over a job (ASHA), one MLflow parent run
    shipyard submit JOB --address http://HEAD:8265 [key.sub=value ...]
                                               run it on a Ray cluster through the Jobs API
    shipyard status [ID] | logs ID [-f] | stop ID   follow submitted jobs (--address or RAY_ADDRESS)
"""
from __future__ import annotations

import argparse
import glob
import sys
import time

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
# Piped or captured output gets full lines instead of a table squeezed to 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shipyard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate job specs")
    p.add_argument("specs", nargs="+", metavar="SPEC_OR_OVERRIDE",
                   help="job spec files (globs like jobs/**/*.yaml work), then any key.sub=value overrides")
    p.set_defaults(func=cmd_check)

    for name, helptext in (("run", "run a job spec"), ("resume", "continue a run")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("target", help="job spec file" if name == "run" else "MLflow run id (or prefix) or run name")
        p.add_argument("overrides", nargs="*", help="key.sub=value")
        p.add_argument("--address", help="an existing Ray cluster (default: embedded local cluster; "
                                         "RAY_ADDRESS also works)")
        p.add_argument("--stop-at", type=int, metavar="STEP",
                       help="stop cleanly with a checkpoint at this step; `shipyard resume` continues")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, else embedded sqlite)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        p.add_argument("--report", action="store_true", help="after the run, print `shipyard report` of it")
        if name == "run":
            p.add_argument("--run-name", help="name of the run (default: JOB-NAME-DATE-TIME-XXXX); "
                                              "`shipyard submit` sets it to the submission id")
        p.set_defaults(func=cmd_run if name == "run" else cmd_resume)

    p = sub.add_parser("sweep", help="a hyperparameter sweep (Ray Tune) over a job: jobs/sweeps/*.yaml")
    p.add_argument("target", nargs="?", help="sweep spec file (not needed with --resume)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, applied to the sweep's job")
    p.add_argument("--resume", metavar="SWEEP_RUN",
                   help="continue an interrupted sweep (its run name, printed when it started): finished "
                        "trials stay, unfinished ones continue from their last checkpoint")
    p.add_argument("--address", help="an existing Ray cluster (default: embedded local cluster)")
    p.add_argument("-q", "--quiet", action="store_true", help="no live table")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("submit", help="run a job spec on a Ray cluster through the Ray Jobs API")
    p.add_argument("target", help="job spec file")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--address", help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI the cluster can reach")
    p.add_argument("-f", "--follow", action="store_true", help="print the job's logs until it ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="status of a submitted job, or of all of them")
    p.add_argument("job_id", nargs="?", help="submission id (default: list all)")
    p.add_argument("--address")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id")
    p.add_argument("--address")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop a submitted job (its last complete checkpoint stays usable)")
    p.add_argument("job_id")
    p.add_argument("--address")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("export", help="write a checkpoint's model in a format other tools read")
    p.add_argument("target", help="checkpoint directory, run directory, or MLflow run (id, prefix, name)")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", default="safetensors", help="safetensors (any family) or a family's own, e.g. hf")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="a short look at a trained model (what make demo prints)")
    p.add_argument("target", help="checkpoint directory, run directory, or MLflow run (id, prefix, name)")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("laplace", help="fit last-layer Laplace approximations on a finished classifier "
                                       "checkpoint; logs a child run in its MLflow experiment")
    p.add_argument("target", help="checkpoint directory, run directory, or MLflow run (id, prefix, name)")
    p.add_argument("overrides", nargs="*", help="laplace.key=value over the checkpoint spec's `laplace:` block")
    p.add_argument("--address", help="an existing Ray cluster (default: embedded local cluster)")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=cmd_laplace)

    p = sub.add_parser("serve", help="serve a checkpoint with Ray Serve (OpenAI-compatible completions, /docs)")
    p.add_argument("target", help="checkpoint or run directory (local or s3://), MLflow run (id, prefix, name) "
                                  "or registered model (NAME, NAME/VERSION, models:/NAME/VERSION)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; in --config files 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000)
    scaling = p.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    scaling.add_argument("--autoscaling", metavar="MIN:MAX", help="Serve's autoscaler between MIN and MAX replicas")
    p.add_argument("--token", help="require `Authorization: Bearer TOKEN` on /v1/* (or set SHIPYARD_SERVE_TOKEN)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=65536, help="largest request body (bigger: 413)")
    p.add_argument("--exit-layer", type=int, help="LayerSkip: default draft layers (default L // 3)")
    p.add_argument("--num-speculations", type=int, default=4, help="LayerSkip: default drafts per round")
    p.add_argument("--max-batch", type=int, default=16,
                   help="minRNN: concurrent requests whose decoding steps run as one batch (1: off)")
    p.add_argument("--max-atoms", type=int, default=256,
                   help="Allegro / Matformer: most atoms in one posted structure")
    p.add_argument("--num-cpus", type=float, default=1.0, help="logical CPUs per replica")
    p.add_argument("--config", metavar="OUT.yaml", help="write a Serve config file (`serve deploy OUT.yaml`) "
                                                       "instead of serving")
    p.add_argument("--address", help="an existing Ray cluster (default: embedded local cluster)")
    p.add_argument("--tracking-uri")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("runs", help="list runs from MLflow")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment", help="only this experiment")
    p.add_argument("-n", "--limit", type=int, default=20)
    p.add_argument("-l", "--long", action="store_true", help="also show checkpoint paths")
    p.set_defaults(func=cmd_runs)

    args = parser.parse_args(argv)
    from shipyard.spec import SpecError
    try:
        return args.func(args)
    except SpecError as e:
        console.print(f"[red]invalid job spec[/red] {e}", markup=True, highlight=False)
        return 2
    except LookupError as e:
        console.print(f"[red]error:[/red] {e.args[0]}", highlight=False)
        return 2
    except RuntimeError as e:
        from shipyard.submit import SubmitError
        if not isinstance(e, SubmitError):
            raise
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2


def cmd_check(args) -> int:
    from shipyard.spec import SpecError, load_job
    import os
    overrides = [a for a in args.specs if "=" in a and not os.path.exists(a)]
    patterns = [a for a in args.specs if a not in overrides]
    paths = sorted({p for pattern in patterns for p in (glob.glob(pattern, recursive=True) or [pattern])})
    bad = 0
    for path in paths:
        try:
            if _is_sweep_file(path):
                from shipyard.tune.spec import load_sweep
                sweep = load_sweep(path, overrides)
                out.print(f"[green]ok[/green]   {path}  (sweep of {sweep.job.name}: {len(sweep.tune.space)} fields, "
                          f"{sweep.tune.num_samples} samples, {sweep.tune.scheduler.type})", highlight=False)
                continue
            spec = load_job(path, overrides)
            out.print(f"[green]ok[/green]   {path}  ({spec.family}, {spec.sharding.strategy}, "
                      f"{spec.scaling.num_workers} workers)", highlight=False)
        except SpecError as e:
            bad += 1
            out.print(f"[red]FAIL[/red] {e}", highlight=False)
    return 1 if bad else 0


def _is_sweep_file(path: str) -> bool:
    import yaml
    from shipyard.tune.spec import is_sweep
    try:
        return is_sweep(yaml.safe_load(open(path)))
    except (OSError, yaml.YAMLError):
        return False


def cmd_run(args) -> int:
    from shipyard.spec import load_job
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    spec = load_job(args.target, overrides)
    return _run(spec, args, resume=None)


def cmd_resume(args) -> int:
    from shipyard.spec import parse_job
    from shipyard.train.tracking import client, TAG
    mlflow = client(args.tracking_uri)
    run = find_run(mlflow, args.target)
    spec_path = mlflow.download_artifacts(run.info.run_id, "spec.yaml")
    import yaml
    with open(spec_path) as f:
        raw = yaml.safe_load(f)
    if args.tracking_uri:
        raw.setdefault("tracking", {})["uri"] = args.tracking_uri
    spec = parse_job(raw, list(args.overrides))
    console.print(f"resuming run {run.info.run_name} ({run.info.run_id}) from "
                  f"{run.data.tags.get(TAG + 'run_dir')}", highlight=False)
    return _run(spec, args, resume=(run.info.run_id, run.info.run_name))


def _run(spec, args, resume) -> int:
    from shipyard.train.launch import run_job
    result = run_job(spec, address=args.address, resume=resume, stop_at=args.stop_at, quiet=args.quiet,
                     run_name=getattr(args, "run_name", None))
    if args.report and result.checkpoint and result.error is None:
        args.target = result.checkpoint
        cmd_report(args)
    table = Table(title=f"run {result.run_name}: {result.status}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("MLflow run", result.run_id)
    table.add_row("tracking", result.tracking_uri)
    table.add_row("checkpoint", result.checkpoint or "none")
    for k in ("step", "train/loss", "val/loss", "val/bits_per_byte"):
        if k in result.metrics:
            table.add_row(k, f"{result.metrics[k]:.4g}" if isinstance(result.metrics[k], float) else str(result.metrics[k]))
    out.print(table)
    if result.tracking_uri.startswith("sqlite:"):
        out.print(f"browse it: mlflow ui --backend-store-uri {result.tracking_uri}", highlight=False)
    if result.status == "KILLED" and result.checkpoint:
        out.print(f"continue it: shipyard resume {result.run_id[:12]}", highlight=False)
    if result.error is not None:
        console.print(f"[red]the run failed:[/red] {result.error}", highlight=False)
        return 1
    if spec.laplace.after_training and result.status == "FINISHED" and result.checkpoint:
        args.target, args.overrides = result.run_id, []
        return cmd_laplace(args)
    return 0


def cmd_sweep(args) -> int:
    from shipyard.tune.spec import load_sweep
    from shipyard.tune.sweep import run_sweep
    if not args.target and not args.resume:
        console.print("[red]shipyard sweep: give a sweep file (jobs/sweeps/*.yaml) or --resume SWEEP_RUN[/red]")
        return 2
    if args.resume:
        from shipyard.tune.sweep import load_state
        try:
            saved = load_state(args.resume)
        except ValueError as e:
            console.print(f"[red]{e}[/red]", highlight=False)
            return 2
        target, overrides = args.target or saved["sweep_file"], list(args.overrides) or saved["overrides"]
    else:
        target, overrides = args.target, list(args.overrides)
    sweep = load_sweep(target, overrides)
    if not args.resume:
        console.print(f"sweep {sweep.name}: Ctrl-C stops it; `shipyard sweep --resume <run>` continues it",
                      highlight=False)
    result = run_sweep(sweep, address=args.address, quiet=args.quiet, resume=args.resume)
    if result.interrupted:
        console.print(f"[yellow]sweep {result.run_name} interrupted[/yellow]: finished trials are kept; "
                      f"`shipyard sweep --resume {result.run_name}` continues the rest", highlight=False)
        return 130
    table = Table(title=f"sweep {result.run_name}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("MLflow parent run", result.run_id)
    table.add_row("tracking", result.tracking_uri)
    counts = {}
    for o in result.trials:
        counts[o.status] = counts.get(o.status, 0) + 1
    table.add_row("trials", ", ".join(f"{n} {s.lower().replace('_', ' ')}" for s, n in sorted(counts.items())))
    if result.best:
        table.add_row(f"best {sweep.tune.metric}", f"{result.best.metric:.4g} ({result.best.trial_id}: "
                      + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in result.best.params.items()) + ")")
        table.add_row("best checkpoint", result.best.checkpoint or "none")
    if result.registered_version:
        table.add_row("registered model", f"{sweep.job.name} version {result.registered_version}")
    table.add_row("Tune state", result.experiment_path)
    out.print(table)
    for e in result.errors:
        console.print(f"[red]{e}[/red]", highlight=False)
    return 0 if result.best else 1


def cmd_submit(args) -> int:
    from shipyard.spec import load_job
    from shipyard.submit import submit
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    spec = load_job(args.target, overrides)
    job_id = submit(spec, args.address)
    out.print(f"submitted {job_id}\n  follow it: shipyard logs {job_id} -f\n  status:    shipyard status "
              f"{job_id}\n  stop it:   shipyard stop {job_id}", highlight=False)
    if args.follow:
        return _follow(args.address, job_id)
    return 0


def cmd_status(args) -> int:
    from shipyard.submit import job_client
    client = job_client(args.address)
    jobs = [client.get_job_info(args.job_id)] if args.job_id else client.list_jobs()
    table = Table(show_header=True, header_style="bold")
    for col in ("submission id", "status", "started", "message"):
        table.add_column(col, overflow="fold")
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else ""
        table.add_row(j.submission_id or j.job_id or "?", str(j.status.value if hasattr(j.status, "value") else j.status),
                      started, (j.message or "")[:200])
    out.print(table)
    return 0


def cmd_logs(args) -> int:
    from shipyard.submit import job_client
    if args.follow:
        return _follow(args.address, args.job_id)
    sys.stdout.write(job_client(args.address).get_job_logs(args.job_id))
    return 0


def cmd_stop(args) -> int:
    from shipyard.submit import job_client
    stopped = job_client(args.address).stop_job(args.job_id)
    out.print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}; the run keeps its last "
              f"complete checkpoint (`shipyard resume {args.job_id}` continues it)", highlight=False)
    return 0


def _follow(address, job_id: str) -> int:
    """Print a job's logs as they come; exit 0 if it succeeded, 1 otherwise."""
    import asyncio
    from shipyard.submit import job_client
    client = job_client(address)

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    out.print(f"{job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""),
              highlight=False)
    return 0 if status == "SUCCEEDED" else 1


def find_run(mlflow, target: str):
    """An MLflow run by id, id prefix, or run name (newest first)."""
    from mlflow.exceptions import MlflowException
    try:
        return mlflow.get_run(target)
    except MlflowException:
        pass
    exps = [e.experiment_id for e in mlflow.search_experiments()]
    runs = mlflow.search_runs(exps, max_results=1000, order_by=["attributes.start_time DESC"])
    matches = [r for r in runs if r.info.run_id.startswith(target) or r.info.run_name == target]
    if not matches:
        raise LookupError(f"no run {target!r} in {mlflow.tracking_uri}; `shipyard runs` lists them")
    if len({r.info.run_id for r in matches}) > 1 and not all(r.info.run_name == target for r in matches):
        raise LookupError(f"{target!r} matches several runs; give more of the run id")
    return matches[0]


def cmd_export(args) -> int:
    from pathlib import Path
    from shipyard.export import export, resolve_checkpoint
    source, storage = resolve_checkpoint(args.target, args.tracking_uri)
    try:
        files = export(source, args.format, Path(args.out), storage)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    out.print(f"exported {source} as {args.format} to {args.out}: {', '.join(files)}", highlight=False)
    return 0


def cmd_report(args) -> int:
    from shipyard.cluster import home
    from shipyard.export import load_model, local_checkpoint, resolve_checkpoint
    from shipyard.registry import MODELS
    source, storage = resolve_checkpoint(args.target, getattr(args, "tracking_uri", None))
    with local_checkpoint(source, storage) as directory:
        model, spec, meta = load_model(directory)
    family = MODELS[spec.family]
    out.print(f"{spec.name} ({spec.family}) at step {meta.step}: {source}", highlight=False)
    if family.report is None:
        out.print(f"family {spec.family} has no report; see `shipyard runs` for its metrics")
        return 0
    out.print(family.report(model, spec.model, spec.data, home() / "data"), highlight=False)
    return 0


def cmd_laplace(args) -> int:
    from shipyard.posthoc.laplace import STAGE, run_laplace
    run = run_laplace(args.target, list(args.overrides), tracking_uri=getattr(args, "tracking_uri", None),
                      address=getattr(args, "address", None))
    table = Table(title=f"laplace {run.run_name} (MLflow run {run.run_id})")
    methods = sorted({k.split("/")[1] for k in run.metrics}, key=lambda m: (m != "map", m))
    keys = sorted({k.split("/", 2)[2] for k in run.metrics})
    table.add_column("metric")
    for m in methods:
        table.add_column(m, justify="right")
    for key in keys:
        table.add_row(key, *(f"{run.metrics.get(f'{STAGE}/{m}/{key}', float('nan')):.4g}" for m in methods))
    out.print(table)
    out.print(f"checkpoint {run.checkpoint}; reliability diagram: artifact reliability.png", highlight=False)
    return 0


def cmd_serve(args) -> int:
    import os
    from shipyard.serve import app as serving
    from shipyard.serve.target import resolve
    target = resolve(args.target, args.tracking_uri)
    token = args.token or os.environ.get(serving.TOKEN_ENV)
    storage = None
    if target.storage is not None:  # credentials stay in the environment, never in the app's args
        storage = {k: v for k, v in vars(target.storage).items()
                   if v is not None and k not in ("access_key_id", "secret_access_key")} or None
    try:
        autoscaling = None
        if args.autoscaling:
            low, sep, high = args.autoscaling.partition(":")
            if not sep or not low.isdigit() or not high.isdigit():
                raise ValueError(f"--autoscaling must be MIN:MAX (e.g. 1:4), got {args.autoscaling!r}")
            autoscaling = [int(low), int(high)]
        options = serving.ServeOptions(
            checkpoint=target.checkpoint, storage=storage, run_id=target.run_id, run_name=target.run_name,
            registered_model=target.registered_model, max_tokens=args.max_tokens,
            max_body_bytes=args.max_body_bytes, token_sha256=serving.token_hash(token) if token else None,
            exit_layer=args.exit_layer, num_speculations=args.num_speculations, replicas=args.replicas,
            autoscaling=autoscaling, num_cpus=args.num_cpus, max_batch=args.max_batch,
            max_atoms=args.max_atoms)
    except ValueError as e:
        from rich.markup import escape
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 2
    if args.config:
        import yaml
        config = serving.deploy_config(options, host=args.host or "0.0.0.0", port=args.port)
        with open(args.config, "w") as f:
            f.write(f"# serve deploy {args.config}   (written by `shipyard serve {args.target} --config`; "
                    f"no credentials{', the token only as its SHA-256' if token else ''})\n")
            yaml.safe_dump(config, f, sort_keys=False)
        out.print(f"wrote {args.config}: {target.checkpoint}", highlight=False)
        return 0
    from shipyard.cluster import connect
    connect(args.address)
    url = serving.start(options, host=args.host or "127.0.0.1", port=args.port)
    out.print(f"serving {target.checkpoint}\n  at {url}  (OpenAPI: {url}/docs; models: {url}/v1/models)"
              f"{'; bearer token required on /v1/*' if token else ''}\n  Ctrl-C stops", highlight=False)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serving.stop()
    return 0


def cmd_runs(args) -> int:
    from shipyard.train.tracking import client, TAG
    mlflow = client(args.tracking_uri)
    exps = mlflow.search_experiments()
    if args.experiment:
        exps = [e for e in exps if e.name == args.experiment]
    names = {e.experiment_id: e.name for e in exps}
    runs = mlflow.search_runs(list(names), max_results=args.limit,
                              order_by=["attributes.start_time DESC"]) if names else []
    from rich import box
    table = Table(title=f"runs in {mlflow.tracking_uri}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("run id", no_wrap=True)
    table.add_column("name", overflow="fold", ratio=1, min_width=20)
    for col in ("status", "job", "step", "loss", "val", "started"):
        table.add_column(col, no_wrap=True)
    if args.long:
        table.add_column("checkpoint", overflow="fold", ratio=1)
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        job = f"{t.get(TAG + 'family', '?')} {t.get(TAG + 'strategy', '?')}x{t.get(TAG + 'world_size', '?')}"
        started = time.strftime("%m-%d %H:%M", time.localtime(r.info.start_time / 1000))
        table.add_row(r.info.run_id[:12], f"{r.info.run_name} [dim]({names[r.info.experiment_id]})[/dim]",
                      r.info.status, job, _fmt(m.get("step")), _fmt(m.get("train/loss")),
                      _fmt(m.get("val/loss")), started,
                      *((t.get(TAG + "checkpoint", ""),) if args.long else ()))
    out.print(table)
    return 0


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}"


if __name__ == "__main__":
    sys.exit(main())
