"""`python -m rtpurbo_train.cluster ...`: list/describe/render job templates, write hostfiles.

    python -m rtpurbo_train.cluster list
    python -m rtpurbo_train.cluster params slurm_sbatch
    python -m rtpurbo_train.cluster render slurm_sbatch --set nodes=2 --set recipe=quickstart ... [-o job.sh]
    scontrol show hostnames "$SLURM_JOB_NODELIST" | python -m rtpurbo_train.cluster hostfile --slots 8
    python -m rtpurbo_train.cluster hostfile --slots 8 --nodelist 'gpu[01-04]'
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rtpurbo_train.cluster.hostfile import HostfileError, expand_nodelist, format_hostfile, hosts_from_scontrol
from rtpurbo_train.cluster.templates import TemplateError, list_templates, render_template, template_params


def parse_assignments(items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TemplateError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rtpurbo_train.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="names of the templates in launch/cluster/")
    params = commands.add_parser("params", help="parameters of one template, with defaults")
    params.add_argument("template")
    render = commands.add_parser("render", help="print a template with its placeholders filled")
    render.add_argument("template")
    render.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    render.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    hostfile = commands.add_parser("hostfile", help="DeepSpeed hostfile from a Slurm allocation")
    hostfile.add_argument("--slots", type=int, required=True, help="GPUs per node")
    hostfile.add_argument("--nodelist", help="compressed Slurm nodelist; default: read "
                          "`scontrol show hostnames` output from stdin")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(list_templates()))
        elif args.command == "params":
            for p in template_params(args.template).values():
                default = "(required)" if p.required else f"= {p.default!r}"
                print(f"{p.name:<22} {p.type:<5} {default:<28} {p.description}")
        elif args.command == "render":
            text = render_template(args.template, parse_assignments(args.assignments))
            if args.output:
                if args.output.exists():
                    raise TemplateError(f"{args.output} exists; not overwriting it")
                args.output.write_text(text)
                if text.startswith("#!"):
                    args.output.chmod(0o755)
            else:
                sys.stdout.write(text)
        elif args.command == "hostfile":
            hosts = expand_nodelist(args.nodelist) if args.nodelist else hosts_from_scontrol(sys.stdin.read())
            sys.stdout.write(format_hostfile(hosts, args.slots))
    except (TemplateError, HostfileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
