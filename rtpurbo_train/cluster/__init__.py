"""Cluster launch helpers: render the job templates of `launch/cluster/` and build DeepSpeed hostfiles.

`python -m rtpurbo_train.cluster --help` lists the commands (`list`, `params`, `render`, `hostfile`).
"""
from rtpurbo_train.cluster.hostfile import (
    HostfileError,
    expand_nodelist,
    format_hostfile,
    hosts_from_scontrol,
    parse_hostfile,
)
from rtpurbo_train.cluster.templates import (
    TemplateError,
    TemplateParam,
    list_templates,
    render_template,
    template_dir,
    template_params,
)

__all__ = [
    "HostfileError",
    "TemplateError",
    "TemplateParam",
    "expand_nodelist",
    "format_hostfile",
    "hosts_from_scontrol",
    "list_templates",
    "parse_hostfile",
    "render_template",
    "template_dir",
    "template_params",
]
