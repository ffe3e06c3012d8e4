"""``conveyor acl``: print the ACL SETUSER line of a least-privilege user for one role.

It asks no server: the line goes on stdout, for redis-cli or a config file; how to finish it
(a password, ``on``, saving) goes on stderr.
"""

from __future__ import annotations

import click

from conveyor.acl import acl_rules
from conveyor.cli import CliError, main
from conveyor.cli._common import streams_option


@main.command("acl")
@click.argument("role", metavar="ROLE")
@streams_option(
    "A stream the user works on (its key name); repeat for several. At least one.",
    required=False,  # checked in the command: one error line
)
@click.option(
    "-g",
    "--group",
    metavar="GROUP",
    help="Only this group's heartbeats (consumer, monitor, admin). Default: any group's.",
)
@click.option(
    "--reader",
    "reader",
    metavar="NAME",
    help="Only this StreamReader's checkpoints (reader). Default: any reader's.",
)
@click.option("--user", metavar="NAME", help="The ACL user name. Default: conveyor-ROLE.")
@click.option(
    "--cluster",
    is_flag=True,
    help="Add what a Redis Cluster client needs (CLUSTER SLOTS, COMMAND, ASKING, INFO); run "
    "the line on every node.",
)
def acl_command(
    role: str,
    streams: tuple[str, ...],
    group: str | None,
    reader: str | None,
    user: str | None,
    cluster: bool,
) -> None:
    """Print an ACL SETUSER line for a user that can do ROLE's work on the streams, and
    nothing else: commands granted one by one (never a category), keys limited to the streams
    and the keys conveyor derives from them (dead letters, heartbeats, reader checkpoints).

    \b
    Roles:
      producer  Producer, conveyor produce
      consumer  Consumer, AsyncConsumer, conveyor run and consume
      monitor   Monitor, Scaler, exporter; conveyor monitor, scale, pending, groups ls,
                dlq ls (reads only)
      admin     what monitor does, and conveyor trim, dlq replay and purge,
                monitor --cleanup, groups create/setid/destroy, claim
      reader    StreamReader and its checkpoints

    The line sets no password and leaves the user off: add ">PASSWORD on" at its end, run it
    with redis-cli, then ACL SAVE (with an ACL file) or CONFIG REWRITE. Nothing is sent to a
    server.

    \b
    Examples:
      conveyor acl consumer --stream orders --group billing
      conveyor acl admin -s orders -s payments --user ops
    """
    if not streams:
        raise CliError("name at least one stream: -s STREAM")
    # a bad role: acl_rules' ConfigError, shown as one error line
    line = acl_rules(role, streams, group, user=user, reader=reader, cluster=cluster)
    click.echo(line)
    click.echo(
        "# the user is off and has no password: append '>PASSWORD on' to the line, run it "
        "(on every node of a cluster), then ACL SAVE (aclfile) or CONFIG REWRITE to keep it",
        err=True,
    )
