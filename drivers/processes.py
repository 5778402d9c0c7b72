"""Processes a run left behind when the daemon died, found again and killed.

Every heavy command of a backup (``qemu-img convert``, ``rsync``, ``cp``, ``openssl dgst``) names the run's
staging directory in its command line, and runs in its own process group, whose id the runner reports
once it runs (``started=``; the backup journals it). A command can start and the daemon die before that
id is journaled, so recovery does not rely on the ids: it kills every process group one of whose live
processes names the *marker* (the staging directory, unique to the run), on each machine the run used.
A group id recycled since by an unrelated process is never touched, for it does not name the marker.
"""

from __future__ import annotations

from drivers.commands import CommandFailed, Runner

TIMEOUT = 30.0
# $1 marker. Kills the groups of the processes naming it, waits for them to go, prints their ids. Not this
# script's own group, nor the groups of its ancestors (whose argv may carry the marker: a runner's wrapper).
# /proc/<pid>/cmdline of a zombie is empty: the dead do not match.
_KILL_MARKED = r"""
me=$(ps -o pgid= -p $$ | tr -d ' ')
ancestors=" "
p=$$
while [ -n "$p" ] && [ "$p" -gt 1 ]; do
  ancestors="$ancestors$(ps -o pgid= -p "$p" | tr -d ' ') "
  p=$(ps -o ppid= -p "$p" | tr -d ' ')
done
marked() {
  grep -alF -- "$1" /proc/[0-9]*/cmdline 2>/dev/null | while IFS=/ read -r _ _ pid _; do
    g=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
    case "$ancestors" in *" $g "*) continue ;; esac
    [ -n "$g" ] && echo "$g"
  done | sort -u
}
groups=$(marked "$1")
[ -n "$groups" ] || exit 0
for g in $groups; do kill -KILL "-$g" 2>/dev/null; done
n=200
while [ -n "$(marked "$1")" ] && [ "$n" -gt 0 ]; do sleep 0.05; n=$((n - 1)); done
echo $groups
[ -z "$(marked "$1")" ]
"""


async def kill_marked(runner: Runner, marker: str) -> list[int]:
    """SIGKILL every process group on ``runner``'s machine that runs a command naming ``marker``; the
    groups killed. CommandFailed when one would not die."""
    if len(marker) < 8:  # a staging directory, never a short word that could match anything
        raise ValueError(f"marker {marker!r} is too short to identify a run's processes")
    argv = ["sh", "-c", _KILL_MARKED, "sh", marker]
    result = await runner.run(argv, timeout=TIMEOUT, check=False)
    if result.exit_status != 0:
        raise CommandFailed(argv, result.exit_status, result.stderr, host=getattr(runner, "host", None))
    return [int(word) for word in result.stdout.split()]
