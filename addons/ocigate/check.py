"""`ocigate check`: the rules tree and every credentials source the settings name, read as the gateway would read
them, with every problem listed by file and key (not only the first); or, when there is none, one line per registry
saying what its rule does. Runs no credential helper (it checks only that the helpers named are on PATH) and
contacts no host."""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from mitmproxy import exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.options import Options

from .credentials import FileProblem
from .hoststoml import Rule, RulesError, check_rules
from .policy import PolicyError, doubtful_entries, load_policy
from .services import credential_chain, tls_problems
from .settings import Settings, declare


@dataclass(frozen=True)
class Checked:
    problems: tuple[FileProblem, ...]
    rules: tuple[Rule, ...]  # every registry's rule, when the tree has no problem
    sources: tuple[str, ...]  # the credential sources read, in the order they are asked
    warnings: tuple[str, ...] = ()  # what is valid but most likely not meant; no problem


def check(settings: Settings) -> Checked:
    problems: list[FileProblem] = []
    rules: list[Rule] = []
    warnings: list[str] = []
    if settings.rules is not None:
        rule_set, rule_problems = check_rules(settings.rules)
        problems += [_of_rules(error) for error in rule_problems]
        if rule_set is not None:
            rules = list(rule_set.rules())
            problems += _tls_problems(rules, settings)
        try:
            warnings += doubtful_entries(load_policy(settings.rules))
        except PolicyError as e:
            # The first problem of the policy file: the gateway refuses to start with it.
            problems.append(FileProblem(e.path, e.key, e.problem))
    chain = credential_chain(settings)
    for source in chain.sources:
        problems += source.problems()
    sources = tuple(source.description for source in chain.sources)
    return Checked(tuple(problems), tuple(rules), sources, tuple(warnings))


def _of_rules(error: RulesError) -> FileProblem:
    return FileProblem(error.path, error.key, error.problem)


def _tls_problems(rules: list[Rule], settings: Settings) -> list[FileProblem]:
    """A `ca` or `client` file that cannot be loaded, as the gateway finds it at start (services.tls_problems)."""
    return [
        FileProblem(
            rule.source or settings.rules or Path(), "server" if host.is_server else f'host."{host.url}"', str(e)
        )
        for rule, host, e in tls_problems(rules, settings)
    ]


def render(checked: Checked, rules: Path | None) -> str:
    """Every problem, one a line; or a line per registry and per credential source. Warnings either way."""
    warnings = [f"warning: {warning}" for warning in checked.warnings]
    if checked.problems:
        count = len(checked.problems)
        lines = [f"{count} problem{'s' if count > 1 else ''}:", *(f"  {problem}" for problem in checked.problems)]
        return "\n".join([*lines, *warnings]) + "\n"
    lines = [*warnings, *(_summary(rule) for rule in checked.rules)]
    if rules is None:
        lines.append("no rules (ocigate_rules is empty): every registry passes through untouched")
    elif not checked.rules:
        lines.append(f"no registry has a rule in {rules}: every registry passes through untouched")
    lines += [f"credentials: {source}" for source in checked.sources] or ["credentials: none (anonymous only)"]
    return "\n".join(lines) + "\n"


def _summary(rule: Rule) -> str:
    hosts = " -> ".join(
        f"{'the registry itself' if host.is_server and rule.upstream == '_default' else host.url}"
        f" [{', '.join(name for name in ('pull', 'resolve', 'push', 'referrers') if name in host.capabilities)}]"
        for host in rule.hosts
    )
    modes = ["offline" if rule.offline else "online"]
    modes.append("client authenticates" if rule.client_authenticates else "gateway authenticates")
    return f"{rule.upstream}: {rule.source or 'certificate files only'}: {hosts}; {', '.join(modes)}"


# --- the command line, shared with ocigate explain -------------------------------------------------------------------


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", metavar="DIR", help="the rules tree (as ocigate --rules)")
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="an ocigate option, as the gateway is given it (ocigate_credentials=FILE, ocigate_docker_config=DIR, ...)",
    )


def settings_of(args: argparse.Namespace) -> Settings | None:
    """The settings the gateway would run with, given the same --rules and --set; None (and a message) when they
    cannot be used."""
    options = Options()
    # declare() only adds options: a loader needs nothing of a master but its options.
    declare(Loader(SimpleNamespace(options=options)))
    try:
        options.set(*args.set)
        if args.rules is not None:
            options.update(ocigate_rules=args.rules)
        return Settings.parse(options)
    except exceptions.OptionsError as e:
        print(f"ocigate: {e}", file=sys.stderr)
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocigate check",
        description="Check the rules tree and every credentials source; list every problem by file and key.",
    )
    add_settings_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`argv` starts with the command: ["check", ...]. Exit status: 0 no problem, 1 problems (all listed), 2 usage
    error."""
    args = _parser().parse_args(argv[1:])
    settings = settings_of(args)
    if settings is None:
        return 2
    checked = check(settings)
    sys.stdout.write(render(checked, settings.rules))
    return 1 if checked.problems else 0
