"""Rules that change live: the rules tree is looked at every few seconds and a registry directory that changed is read
again, so that an edit applies to the next request without a restart, as containerd reads hosts.toml on every pull.

Looking costs system calls (a listing of the tree and of each registry directory, a stat of each file there and of
each TLS file its rule names), so it is done on a thread, on a timer, never in a hook. What those files are (inode,
size, times) is a directory's fingerprint. A directory whose fingerprint changed is read again once two looks in a row
find it the same (a file may be half written, and half a hosts.toml can be a valid one: an empty one is no rule), and
the TLS files its rule names are loaded; a broken one keeps its last good rule in force (a new one stays without a
rule) and is named in one log line (the file, the key, the reason), not again while it stays broken the same way;
fixing it says so.

File times tick coarsely: a second edit of the same size within one tick leaves a fingerprint as it was. A directory
holding a file changed within RACY_SECONDS of a look is therefore read again at the next look too (git's "racy clean").

The new rules go into a new Services bundle (services.with_rules) that the Configuration addon swaps in: a request
under way keeps the rule its plan was made from.
"""

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .hoststoml import HOSTS_FILE, Host, RegistryDirectory, RulesError, RuleSet, is_hidden, load_registry_directory
from .hosttls import HostTLS, HostTLSError, openssl_context, python_context
from .policy import POLICY_FILE, Policy, PolicyError, load_policy

log = logging.getLogger("ocigate")

# How often the tree is looked at, in seconds: an edit is in force two or three looks later.
INTERVAL = 1.0
# A file changed this recently may change again unseen within the same tick of the file system's clock.
RACY_SECONDS = 2.0

# A file as stat sees it (mode, device, inode, size, mtime and ctime in nanoseconds), or why it cannot be stat-ed.
Stamp = tuple[int, int, int, int, int, int] | str
Fingerprint = frozenset[tuple[str, Stamp]]
# What a gone entry looks like.
GONE: Fingerprint = frozenset()


def stamps(paths: Iterable[Path]) -> Fingerprint:
    """What each path is now, symbolic links followed (a Kubernetes volume swaps a link to update its files)."""
    found: list[tuple[str, Stamp]] = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError as error:
            found.append((str(path), error.strerror or type(error).__name__))
            continue
        found.append(
            (
                str(path),
                (
                    status.st_mode,
                    status.st_dev,
                    status.st_ino,
                    status.st_size,
                    status.st_mtime_ns,
                    status.st_ctime_ns,
                ),
            )
        )
    return frozenset(found)


@dataclass(frozen=True)
class TreeScan:
    """What a rules tree is made of: each entry load_rules reads (a directory, or a hosts.toml misplaced in the root)
    by name, with the fingerprint of it and of what it holds."""

    entries: Mapping[str, Fingerprint]
    problem: str | None = None  # the root could not be listed: nothing is known


def scan_tree(root: Path) -> TreeScan:
    try:
        names = sorted(os.listdir(root))
    except OSError as error:
        return TreeScan({}, f"cannot list the rules directory: {error.strerror or error}")
    entries: dict[str, Fingerprint] = {}
    for name in names:
        if is_hidden(name):
            continue
        path = root / name
        try:
            mode: int | None = os.stat(path).st_mode
        except FileNotFoundError:
            continue  # a dangling link is absent, for load_rules too
        except OSError:
            mode = None  # cannot be resolved: reading it says why
        if name == HOSTS_FILE or mode is None or stat.S_ISDIR(mode):
            entries[name] = stamps([path, *_held(path)])
    return TreeScan(entries)


def _held(directory: Path) -> list[Path]:
    try:
        return sorted(Path(entry.path) for entry in os.scandir(directory))
    except OSError:
        return []  # not a directory, or not listable: reading it says why


@dataclass(frozen=True)
class Seen:
    """One entry as last looked at: the fingerprint of the entry itself and of the TLS files of its rule in force."""

    own: Fingerprint
    tls: Fingerprint
    settled: bool  # nothing in it changed within RACY_SECONDS of the look


def to_read(seen: Mapping[str, Seen], now: Mapping[str, Fingerprint], known: Iterable[str]) -> set[str]:
    """The entries that are stale: each one that appeared, changed, or was too fresh to trust when it was read (`now`
    holds each entry's own fingerprint and that of the TLS files of its rule in force), and each rule in force
    (`known`) whose directory is gone."""
    stale = {name for name, fingerprint in now.items() if _changed(seen.get(name), fingerprint)}
    return stale | (set(known) - set(now))


def ready(
    stale: Iterable[str], seen: Mapping[str, Seen], now: Mapping[str, Fingerprint], pending: Mapping[str, Fingerprint]
) -> set[str]:
    """Of the stale entries, those to read now: each that looked as it does now at the last look too (`pending`), and
    each that is still as it was read (read again because it was too fresh to trust). One that changed since the last
    look may be being written: half a hosts.toml can be a valid one (an empty one is no rule at all)."""
    return {
        name
        for name in stale
        if pending.get(name) == now.get(name, GONE)
        or (name in seen and seen[name].own | seen[name].tls == now.get(name))
    }


def _changed(seen: Seen | None, fingerprint: Fingerprint) -> bool:
    return seen is None or not seen.settled or seen.own | seen.tls != fingerprint


def settled(fingerprint: Fingerprint, now_ns: int) -> bool:
    """Whether nothing in `fingerprint` changed within RACY_SECONDS of `now_ns` (the wall clock, as file times are)."""
    racy = now_ns - int(RACY_SECONDS * 1e9)
    return all(isinstance(stamp, str) or max(stamp[4], stamp[5]) < racy for _, stamp in fingerprint)


@dataclass(frozen=True)
class Reload:
    """What one look found: the rules to put in force (None: those in force stay), and what to log."""

    rules: RuleSet | None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # A `ca` or `client` file changed under the same name: TLS contexts made from it are stale.
    tls_changed: bool = False


class RulesTree:
    """A rules tree as last looked at, and the rules made from it: each registry directory's last good reading.
    `roots` and `insecure` are the settings the hosts' TLS files are loaded with; `scan` and `clock` are what looking
    and the time are (the file system and the wall clock, unless a test says otherwise)."""

    def __init__(
        self,
        rules: RuleSet,
        *,
        roots: Path | None = None,
        insecure: bool = False,
        scan: Callable[[Path], TreeScan] = scan_tree,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.rules = rules
        self._roots, self._insecure = roots, insecure
        self._scan, self._clock = scan, clock
        # Each entry as last read; one read for the first time is compared with the rule in force, which came from it.
        self._seen: dict[str, Seen] = {}
        self._pending: dict[str, Fingerprint] = {}  # each stale entry as the last look found it
        self._broken: dict[str, str] = {}  # what was logged for each entry that is broken
        self._root_problem: str | None = None

    @property
    def root(self) -> Path:
        return self.rules.root

    def look(self) -> Reload:
        """Looks at the tree and reads again what changed. Blocking: run it on a thread."""
        warnings: list[str] = []
        notes: list[str] = []
        scan = self._scan(self.root)
        if scan.problem is not None:
            if scan.problem != self._root_problem:
                warnings.append(f"{self.root}: {scan.problem}; the rules read before stay in force")
            self._root_problem = scan.problem
            return Reload(None, tuple(warnings))
        if self._root_problem is not None:
            notes.append(f"{self.root}: can be listed again")
            self._root_problem = None
        directories = dict(self.rules.directories())
        seen = dict(self._seen)
        tls_now = {name: stamps(self._tls_files(name, directories.get(name))) for name in scan.entries}
        now = {name: own | tls_now[name] for name, own in scan.entries.items()}
        changed = tls_changed = False
        stale = to_read(seen, now, {*directories, *seen})
        reading = ready(stale, seen, now, self._pending)
        self._pending = {name: now.get(name, GONE) for name in stale - reading}
        for name in sorted(reading):
            path = self.root / name
            if name not in scan.entries:
                seen.pop(name, None)
                self._broken.pop(name, None)
                changed = self._drop(name, directories, notes) or changed
                continue
            try:
                directory = load_registry_directory(path)
                if directory is not None:
                    self._check_tls(name, directory)
            except RulesError as error:
                seen[name] = Seen(scan.entries[name], tls_now[name], settled(now[name], self._clock()))
                in_force = name in directories and not directories[name].changes_nothing
                self._broke(name, str(error), in_force, warnings)
                continue
            if self._broken.pop(name, None) is not None:
                notes.append(f"{path}: fixed, in force again")
            if directory is None:
                # No longer a directory: nothing reads it.
                seen.pop(name, None)
                changed = self._drop(name, directories, notes) or changed
                continue
            before = seen.get(name)
            tls = stamps(self._tls_files(name, directory))
            seen[name] = Seen(scan.entries[name], tls, settled(scan.entries[name] | tls, self._clock()))
            # The same files under the same names with new contents: contexts made from them are stale.
            moved = bool(tls) and before is not None and (not before.settled or before.tls != tls)
            if directory == directories.get(name) and not moved:
                continue
            directories[name] = directory
            changed, tls_changed = True, tls_changed or moved
            notes.append(f"{path}: read again: {_summary(name, directory)}")
        self._seen = seen
        if not changed:
            return Reload(None, tuple(warnings), tuple(notes))
        self.rules = RuleSet(self.root, dict(sorted(directories.items())))
        return Reload(self.rules, tuple(warnings), tuple(notes), tls_changed)

    def _broke(self, name: str, message: str, in_force: bool, warnings: list[str]) -> None:
        """The entry cannot be read: said once, and again only when it is broken another way."""
        if self._broken.get(name) != message:
            kept = "its last good rule stays in force" if in_force else "it has no rule"
            warnings.append(f"{message} ({kept} until the file is fixed)")
        self._broken[name] = message

    def _drop(self, name: str, directories: dict[str, RegistryDirectory], notes: list[str]) -> bool:
        """The entry is gone: its rule, if it had one, is no longer in force. Whether the rules changed."""
        directory = directories.pop(name, None)
        if directory is None or directory.changes_nothing:
            return False
        notes.append(f"{self.root / name}: gone, its rule is no longer in force")
        return True

    def _hosts(self, name: str, directory: RegistryDirectory) -> Iterable[tuple[Path | None, Host]]:
        for rule in RuleSet(self.root, {name: directory}).rules():
            for host in rule.hosts:
                yield rule.source, host

    def _tls_files(self, name: str, directory: RegistryDirectory | None) -> list[Path]:
        if directory is None:
            return []
        files: set[Path] = set()
        for _, host in self._hosts(name, directory):
            files.update(host.ca)
            files.update(path for pair in host.client for path in pair if path)
        return sorted(files)

    def _check_tls(self, name: str, directory: RegistryDirectory) -> None:
        """RulesError naming the hosts.toml and the key when a `ca` or `client` file its hosts name cannot be loaded,
        as start-up refuses it (services.py)."""
        for source, host in self._hosts(name, directory):
            problem = tls_problem(host, roots=self._roots, insecure=self._insecure)
            if problem is None:
                continue
            key, why = problem
            if source is None:
                # Docker's certs.d layout (*.crt, *.cert, *.key beside no hosts.toml): the files are named in `why`.
                raise RulesError(self.root / name, None, why)
            raise RulesError(source, key if host.is_server else f'host."{_written(host)}".{key}', why)


def tls_problem(host: Host, *, roots: Path | None, insecure: bool) -> tuple[str, str] | None:
    """The key (`ca` or `client`) whose files cannot be loaded for `host`, and why; None when they all can. Loaded
    afresh, past the contexts cached for the gateway's connections, which keep the files as they were."""
    tls = HostTLS.of(host, roots=roots, insecure=insecure)
    for key, files, loaded in (("ca", tls.ca, replace(tls, client=())), ("client", tls.client, tls)):
        if not files:
            continue
        try:
            python_context.__wrapped__(loaded)
            openssl_context.__wrapped__(loaded)
        except HostTLSError as error:
            return key, str(error)
    return None


def _written(host: Host) -> str:
    """A mirror's URL as its [host."..."] table header most likely says it: without the /v2 containerd appends."""
    path = host.path if host.override_path else host.path.removesuffix("/v2")
    return f"{host.scheme}://{host.netloc}{path}"


def _summary(name: str, directory: RegistryDirectory) -> str:
    rules = list(RuleSet(Path(), {name: directory}).rules())
    if not rules:
        return "routes nothing: the registry passes through"
    return "hosts " + ", ".join(host.url for host in rules[0].hosts)


@dataclass(frozen=True)
class Watched:
    """The rules in force and the settings their TLS files are loaded with."""

    rules: RuleSet
    roots: Path | None
    insecure: bool


async def keep_rules_live(
    in_force: Callable[[], Watched | None],
    swap: Callable[[RuleSet, Reload], None],
    interval: float = INTERVAL,
) -> None:
    """Every `interval` seconds, compares the rules `in_force()` names (None: no rules) with their tree; when it
    changed, `swap(the rules looked at, the reload)` puts the new rules in force. Runs until cancelled."""
    tree: RulesTree | None = None
    while True:
        await asyncio.sleep(interval)
        watched = in_force()
        if watched is None:
            tree = None
            continue
        if tree is None or tree.rules is not watched.rules:
            # Other rules were put in force (an option changed, or a swap was refused): their tree is new to us.
            tree = RulesTree(watched.rules, roots=watched.roots, insecure=watched.insecure)
        looked_at = tree.rules
        try:
            reload = await asyncio.to_thread(tree.look)
        except Exception:
            log.exception("ocigate: internal error looking at the rules in %s; the rules in force stay", tree.root)
            tree = None
            continue
        for line in reload.warnings:
            log.warning("ocigate: %s", line)
        for line in reload.notes:
            log.info("ocigate: %s", line)
        if reload.rules is not None:
            swap(looked_at, reload)


class PolicyFile:
    """The rules tree's policy.toml, looked at like a registry directory: read again once two looks in a row find it
    changed and the same; a broken edit keeps the policy in force and is named once (file, key, reason)."""

    def __init__(self, root: Path, in_force: Policy) -> None:
        self.path = root / POLICY_FILE
        self.policy = in_force
        self._seen = stamps([self.path])
        self._pending: Fingerprint | None = None
        self._broken: str | None = None

    def look(self) -> tuple[Policy | None, list[str]]:
        """A new policy to put in force (None: none), and what to log. Blocks (stat, read): run it on a thread."""
        now = stamps([self.path])
        if now == self._seen and now != self._pending:
            self._pending = None
            return None, []
        if now != self._pending:
            self._pending = now  # changed: read once the next look finds it the same
            return None, []
        self._seen, self._pending = now, None
        try:
            policy = load_policy(self.path.parent)
        except PolicyError as error:
            message = f"{error} (the policy in force stays until the file is fixed)"
            if message == self._broken:
                return None, []
            self._broken = message
            return None, [message]
        notes = [f"{self.path}: fixed, in force again"] if self._broken else [f"{self.path}: read again"]
        self._broken = None
        self.policy = policy
        return policy, notes


async def keep_policy_live(
    in_force: Callable[[], tuple[Path, Policy] | None],
    swap: Callable[[Policy, Policy], None],
    interval: float = INTERVAL,
) -> None:
    """Every `interval` seconds, compares the policy `in_force()` names (its rules root and the policy; None: no
    rules) with its file; a new one goes in through `swap(the policy looked at, the new one)`. Runs until
    cancelled."""
    watched: PolicyFile | None = None
    while True:
        await asyncio.sleep(interval)
        current = in_force()
        if current is None:
            watched = None
            continue
        root, policy = current
        if watched is None or watched.policy is not policy or watched.path.parent != root:
            watched = PolicyFile(root, policy)
        looked_at = watched.policy
        try:
            new, lines = await asyncio.to_thread(watched.look)
        except Exception:
            log.exception("ocigate: internal error looking at %s; the policy in force stays", watched.path)
            watched = None
            continue
        for line in lines:
            (log.info if new is not None else log.warning)("ocigate: %s", line)
        if new is not None:
            swap(looked_at, new)
