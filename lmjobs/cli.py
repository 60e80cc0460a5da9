"""`lmjobs`: the one console script.  Specs are validated before any cluster work."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from cluster.spec import SpecError, load_spec

EXIT_SPEC = 2


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec YAML (kind, name, one section per component)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field, e.g. --set optim.lr=3e-4 (repeatable)")


def _load(args, kind: str | None):
    from lmjobs.kinds import KINDS, REGISTRY

    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"{REGISTRY[kind].address_field}={args.address}")
    return load_spec(args.spec, KINDS, overrides, expect_kind=kind)


def check_paths(spec, spec_path: str) -> None:
    """Every local path the spec names must exist: `validate` and the job commands answer a missing
    one alike (exit 2, every missing field named) before any cluster work."""
    from lmjobs.kinds import problems

    found = problems(spec)
    if found:
        raise SpecError(spec_path, found)


def cmd_validate(args) -> int:
    spec = _load(args, None)
    check_paths(spec, args.spec)
    print(f"{args.spec}: valid {spec.kind} spec '{spec.name}'")
    return 0


def cmd_kind(args) -> int:
    """Any registered job kind: validate the spec (before any cluster work), run, summarise."""
    from lmjobs import kinds

    spec = _load(args, args.kind)
    check_paths(spec, args.spec)
    out = kinds.run(spec)
    if getattr(args, "result_json", None):  # a pipeline's stage: its result, for the later stages
        pathlib.Path(args.result_json).write_text(json.dumps(out, default=str))
    for line in kinds.summary(spec, out):
        print(line)
    return 0


def cmd_export(args) -> int:
    from lmjobs.export import export

    out = export(args.checkpoint, args.out_dir)
    print(f"[export] step {out['step']} -> {out['out_dir']}: {', '.join(out['files'])}")
    print(f"  loads with transformers.AutoModelForCausalLM.from_pretrained; logits match the "
          f"trained model (max diff {out['max_logit_diff']:.1e})")
    return 0


def cmd_data_stats(args) -> int:
    from cluster import storage

    path = args.path if args.path.endswith(".json") else storage.join(args.path, "manifest.json")
    manifest = json.loads(storage.read_text(path))
    (print_labelled_stats if "task" in manifest else print_stats)(manifest)
    return 0


def prepare_summary(out: dict) -> list[str]:
    import contextlib
    import io

    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_stats(out)
    return [*table.getvalue().splitlines(), f"  dataset   : {out['dir']}", f"  manifest  : {out['manifest']}",
            f"  rejects   : {out['dir']}/rejects/" if out["counts"]["total"]["rejected"] else "  rejects   : none"]


def ingest_summary(out: dict) -> list[str]:
    import contextlib
    import io

    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_labelled_stats(out)
    return [*table.getvalue().splitlines(), f"  dataset   : {out['dir']}", f"  manifest  : {out['manifest']}",
            f"  rejects   : {out['dir']}/rejects.jsonl ({out['rejected']})"]


def print_labelled_stats(m: dict) -> None:
    print(f"task {m['task']}: {m['read']} rows read, {m['rejected']} rejected")
    for i in m["inputs"]:
        print(f"  {i['split']:<8}{i['read']:>8} read {i['kept']:>8} kept {i['rejected']:>6} rejected  {i['path']}")
    for split, s in m["splits"].items():
        counts = s.get("label_counts")
        shown = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:12]) if counts else ""
        print(f"  {split}: {s['rows']} rows -> {s['file']}" + (f"  [{shown}]" if shown else ""))
    for reason, n in m.get("rejected_by_reason", {}).items():  # one line per cause
        print(f"  rejected{n:>7}  {reason}")


def print_stats(m: dict) -> None:
    cols = ("read", "kept", "filtered", "exact_dup", "near_dup", "rejected")
    rows = [(s["path"], *(s[c] for c in cols)) for s in m["counts"]["per_source"]]
    rows.append(("TOTAL", *(m["counts"]["total"][c] for c in cols)))
    width = max(len(r[0]) for r in rows)
    print(f"{'source':<{width}}  " + "  ".join(f"{c:>9}" for c in cols))
    for r in rows:
        print(f"{r[0]:<{width}}  " + "  ".join(f"{v:>9}" for v in r[1:]))
    for s in m["counts"]["per_source"]:
        for label, key in (("filtered", "filtered_by_rule"), ("rejected", "rejected_by_reason")):
            for reason, n in sorted(s[key].items()):
                print(f"  {label:<9}{n:>7}  {reason}  [{s['path']}]")
    t = m["tokenizer"]
    print(f"tokenizer {t['kind']} vocab {t['vocab_size']} ({t['hash'][:19]}), seq_len {m['seq_len']}: "
          f"{m['sequences']['train']} train / {m['sequences']['val']} val sequences, "
          f"{m['tokens']['train'] + m['tokens']['val']} tokens ({m['tokens']['dropped_tails']} in dropped tails)")


def cmd_cluster(args) -> int:
    from cluster import local

    if args.action == "up":
        c = local.up(num_cpus=args.num_cpus, port=args.port, dashboard_port=args.dashboard_port,
                     temp_dir=args.temp_dir, autoscaling_config=args.autoscaling_config)
        print(f"local Ray cluster up: address {c.gcs_address}, dashboard {c.dashboard_url}, "
              f"{c.num_cpus} CPUs, token auth on (token in ~/.ray/auth_token)")
        print(f"  use it: RAY_ADDRESS={c.gcs_address} lmjobs pretrain SPEC.yaml")
    elif args.action == "down":
        n = local.down()
        print(f"local Ray cluster down ({n} processes stopped)" if n else "no local cluster started by lmjobs is running")
    else:
        info = local.status(args.address)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
            return 0
        res, avail = info["resources"], info["available"]
        print(f"address   {info['address']}")
        if info["dashboard"]:
            print(f"dashboard {info['dashboard']}")
        print(f"nodes     {sum(n['alive'] for n in info['nodes'])} alive")
        for key in sorted(res):
            if key in ("CPU", "GPU", "memory", "object_store_memory") or not key.startswith("node:"):
                total, free = res[key], avail.get(key, 0.0)
                if key in ("memory", "object_store_memory"):
                    print(f"{key:<22}{free / 2**30:8.2f} / {total / 2**30:.2f} GiB free")
                else:
                    print(f"{key:<22}{free:8g} / {total:g} free")
        print(f"jobs      {len(info['jobs'])}")
        for j in info["jobs"]:
            print(f"  {j['id']:<28} {j['status']:<10} {j['entrypoint']}")
    return 0


def cmd_submit(args) -> int:
    import pathlib

    import yaml

    from cluster import jobs
    from cluster.spec import resolved_dict

    from lmjobs.kinds import KINDS, REGISTRY

    spec = load_spec(args.spec, KINDS, args.overrides)  # validated before any cluster work; --address is the Jobs API's
    data = resolved_dict(spec)
    root = (data.get("output") or {}).get("root")
    if isinstance(root, str) and not (root.startswith("s3://") or pathlib.Path(root).expanduser().is_absolute()):
        raise jobs.JobsError(f"output.root: '{root}' is relative; a submitted job runs in a temporary working "
                             "dir on the cluster, so give an absolute path on the cluster or s3://BUCKET/PREFIX "
                             "(a retried job resumes from there)")
    sub = jobs.Submission(kind=spec.kind, name=spec.name, command=list(REGISTRY[spec.kind].words),
                          spec_yaml=yaml.safe_dump(data, sort_keys=False), submit=spec.submit,
                          working_dir=pathlib.Path(args.working_dir).resolve() if args.working_dir else jobs.project_root())
    job_id, status = jobs.submit(sub, args.address, follow=args.follow, wait_for_end=args.wait)
    if status is None:
        print(f"  follow it: lmjobs jobs logs {job_id} --follow    stop it: lmjobs jobs stop {job_id}")
        return 0
    return 0 if status == "SUCCEEDED" else 1


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_jobs(args) -> int:
    from cluster import jobs

    if args.action == "list":
        rows = jobs.list_jobs(args.address)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'SUBMISSION ID':<44}{'STATUS':<11}{'STARTED':<21}{'DURATION':>9}  ENTRYPOINT")
        now = time.time()
        for r in rows:
            dur = (r["end_time"] or now) - r["start_time"] if r["start_time"] else 0
            print(f"{r['id']:<44}{r['status']:<11}{_when(r['start_time']):<21}{dur:>8.0f}s  {r['entrypoint']}")
        return 0
    if args.action == "status":
        info = jobs.status(args.address, args.job_id)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"{info['id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        print(f"  started {_when(info['start_time'])}, ended {_when(info['end_time'])}")
        print(f"  entrypoint {info['entrypoint']}")
        return 0 if info["status"] != "FAILED" else 1
    if args.action == "logs":
        final = jobs.logs(args.address, args.job_id, args.follow)
        if final is not None:
            print(f"[jobs] {args.job_id}: {final}", file=sys.stderr)
        return 0
    final = jobs.stop(args.address, args.job_id, args.timeout)
    print(f"{args.job_id}: {final}")
    return 0


def _add_kind_commands(sub, groups: dict) -> None:
    """One command per registered job kind (lmjobs.kinds.REGISTRY): `lmjobs WORDS SPEC.yaml`."""
    from lmjobs.kinds import REGISTRY

    for kind in REGISTRY.values():
        *group, word = kind.words
        parent = sub
        if group:
            if group[0] not in groups:
                groups[group[0]] = sub.add_parser(group[0]).add_subparsers(dest="action", required=True)
            parent = groups[group[0]]
        p = parent.add_parser(word, help=kind.help)
        _add_spec_args(p)
        if kind.address_field:
            p.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else an embedded local cluster)")
        p.add_argument("--result-json", help=argparse.SUPPRESS)  # where a pipeline stage leaves its result
        p.set_defaults(func=cmd_kind, kind=kind.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmjobs", description="Distributed language-model jobs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a job spec without touching any cluster")
    _add_spec_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="a checkpoint as a Hugging Face directory (config, safetensors, tokenizer)")
    p.add_argument("checkpoint", help="checkpoint directory, local or s3:// (RUN_DIR/checkpoint_stepNNNNNNN)")
    p.add_argument("out_dir", help="where to write the Hugging Face directory (local or s3://)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="corpus -> packed shards; labelled data -> canonical parquet; statistics")
    groups = {"data": p.add_subparsers(dest="action", required=True, metavar="ACTION")}
    stats = groups["data"].add_parser("stats", help="print a prepared or ingested dataset's manifest as a table")
    stats.add_argument("path", help="dataset directory or manifest.json (local or s3://)")
    stats.set_defaults(func=cmd_data_stats)
    _add_kind_commands(sub, groups)

    p = sub.add_parser("cluster", help="a local Ray head on this machine (127.0.0.1, token auth)")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = csub.add_parser("up", help="start a local Ray head (ray start --head)")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs to offer (default: all cores)")
    up.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    up.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / Jobs API port (default 8265)")
    up.add_argument("--temp-dir", default="/tmp/lmjobs-ray", help="Ray temp dir of this cluster")
    up.add_argument("--autoscaling-config", help="run Ray's autoscaler in the head with this cluster config "
                    "(e.g. infra/local/fake-autoscaling.yaml: nodes started on this machine)")
    csub.add_parser("down", help="stop the cluster `up` started, and nothing else")
    st = csub.add_parser("status", help="resources, nodes and jobs")
    st.add_argument("--address", help="another cluster's GCS address (default: the local one)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("submit", help="send a job spec to a Ray cluster through the Jobs API (with retries)")
    _add_spec_args(p)
    addr_help = "the cluster's dashboard URL, e.g. http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, else the local cluster)"
    p.add_argument("--address", help=addr_help)
    p.add_argument("--follow", action="store_true", help="print the job's logs until it ends (every attempt)")
    p.add_argument("--wait", action="store_true", help="wait for the end; exit 0 only if it SUCCEEDED")
    p.add_argument("--working-dir", help="directory uploaded as the job's working_dir (default: this checkout)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="submitted jobs on a Ray cluster: list, status, logs, stop")
    jsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = jsub.add_parser("list", help="every submitted job, oldest first")
    ls.add_argument("--json", action="store_true")
    st = jsub.add_parser("status", help="one job's status")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true")
    lg = jsub.add_parser("logs", help="one job's driver logs")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    sp = jsub.add_parser("stop", help="stop a job and wait until Ray reports it stopped")
    sp.add_argument("job_id")
    sp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    for q in (ls, st, lg, sp):
        q.add_argument("--address", help=addr_help)
    p.set_defaults(func=cmd_jobs)
    return parser


def cmd_tune_report(argv: list[str]) -> int:
    """`lmjobs tune report DIR`: a campaign's report from its directory, while it runs or after."""
    from lmjobs.tune.report import write_report

    p = argparse.ArgumentParser(prog="lmjobs tune report",
                                description="leaderboard, learning curves, parallel coordinates, parameter "
                                            "importance and budget of a campaign (lmjobs tune)")
    p.add_argument("dir", help="the campaign directory, OUTPUT_ROOT/NAME (local or s3://)")
    p.add_argument("--endpoint-url", help="S3 endpoint of an s3:// campaign (default: AWS_ENDPOINT_URL)")
    p.add_argument("--out", help="where to write it (default DIR/report)")
    args = p.parse_args(argv)
    from cluster.storage import StorageConfig

    cfg = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    out = write_report(args.dir, cfg, args.out)
    b = out["budget"]
    print(f"[tune] {b['trials_started']} trials started of {b['trials_planned']} ({b['finished']} finished, "
          f"{b['stopped_early']} stopped early, {b['errored']} errored); best trial {out['best_trial']}")
    print(f"  leaderboard : {out['leaderboard_md']}  ({out['leaderboard_csv']})")
    print(f"  plots       : {', '.join(out['plots'])}")
    print(f"  report JSON : {out['report_json']}")
    return 0


def cmd_pipeline_status(argv: list[str]) -> int:
    from lmjobs.pipeline.driver import status

    parser = argparse.ArgumentParser(prog="lmjobs pipeline status",
                                     description="each stage of a pipeline: state, time, figures, outputs")
    parser.add_argument("dir", help="the pipeline's directory (ROOT/NAME of its spec; local or s3://)")
    args = parser.parse_args(argv)
    for line in status(args.dir):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["pipeline", "status"]:  # beside `lmjobs pipeline PIPELINE.yaml`
        try:
            return cmd_pipeline_status(argv[2:])
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            print(f"lmjobs: error: {exc}", file=sys.stderr)
            return 1
    if argv[:2] == ["tune", "report"]:  # beside `lmjobs tune CAMPAIGN.yaml`, whose argument is a path
        try:
            return cmd_tune_report(argv[2:])
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            print(f"lmjobs: error: {exc}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_SPEC
    except (RuntimeError, FileNotFoundError, ValueError) as exc:  # IngestError is a ValueError
        print(f"lmjobs: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
