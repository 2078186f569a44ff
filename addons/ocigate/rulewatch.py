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

The watchers start from the tree as it was when its rules and policy were read (a Snapshot, taken before reading), so
that an edit made before their first look is read at their next ones.

The new rules go into a new Services bundle (services.with_rules) that the Configuration addon swaps in: a request
under way keeps the rule its plan was made from. One loop (keep_live) drives the rules tree and the policy file alike.
"""

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, Protocol, TypeVar

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
        first: Mapping[str, Seen] | None = None,
    ) -> None:
        self.rules = rules
        self._roots, self._insecure = roots, insecure
        self._scan, self._clock = scan, clock
        # Each entry as last read, from the Snapshot taken when `rules` were read (`first`) on; one read for the first
        # time is compared with the rule in force, which came from it.
        self._seen: dict[str, Seen] = dict(first or {})
        self._pending: dict[str, Fingerprint] = {}  # each stale entry as the last look found it
        self._broken: dict[str, str] = {}  # what was logged for each entry that is broken
        self._root_problem: str | None = None

    @property
    def root(self) -> Path:
        return self.rules.root

    # What keep_live asks of a watcher.
    path = root

    @property
    def in_force(self) -> RuleSet:
        return self.rules

    def changes(self) -> "Looked[Reload]":
        reload = self.look()
        return Looked(reload if reload.rules is not None else None, reload.warnings, reload.notes)

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

    def _tls_files(self, name: str, directory: RegistryDirectory | None) -> list[Path]:
        return tls_files(self.root, name, directory)

    def _check_tls(self, name: str, directory: RegistryDirectory) -> None:
        """RulesError naming the hosts.toml and the key when a `ca` or `client` file its hosts name cannot be loaded,
        as start-up refuses it (services.py)."""
        for source, host in _hosts(self.root, name, directory):
            problem = tls_problem(host, roots=self._roots, insecure=self._insecure)
            if problem is None:
                continue
            key, why = problem
            if source is None:
                # Docker's certs.d layout (*.crt, *.cert, *.key beside no hosts.toml): the files are named in `why`.
                raise RulesError(self.root / name, None, why)
            raise RulesError(source, key if host.is_server else f'host."{_written(host)}".{key}', why)


def _hosts(root: Path, name: str, directory: RegistryDirectory) -> Iterable[tuple[Path | None, Host]]:
    for rule in RuleSet(root, {name: directory}).rules():
        for host in rule.hosts:
            yield rule.source, host


def tls_files(root: Path, name: str, directory: RegistryDirectory | None) -> list[Path]:
    """The `ca` and `client` files the rule of the entry `name` of the tree at `root` names."""
    if directory is None:
        return []
    files: set[Path] = set()
    for _, host in _hosts(root, name, directory):
        files.update(host.ca)
        files.update(path for pair in host.client for path in pair if path)
    return sorted(files)


@dataclass(frozen=True)
class Before:
    """A rules tree as it was just before it was read: its entries, its policy file, and when."""

    scan: TreeScan
    policy: Fingerprint
    taken_ns: int


@dataclass(frozen=True)
class Snapshot:
    """A rules tree as its rules and policy were read (services.build): each entry as the rules watcher would have
    seen it, and the policy file. The watchers start from it, so an edit made since is read at their next looks."""

    entries: Mapping[str, Seen]
    policy: Fingerprint | None  # None: not known (another policy was put in force since)


def before_reading(root: Path) -> Before:
    """Looks at the tree at `root` before its rules and policy are read: whatever changes from now on differs from
    this. Blocking: for start-up and for an option that changed, as reading the rules is."""
    root = Path(root).absolute()  # as load_rules names it, which the watchers' stamps use
    taken_ns = time.time_ns()
    return Before(scan_tree(root), stamps([root / POLICY_FILE]), taken_ns)


def snapshot(before: Before, rules: RuleSet) -> Snapshot:
    """The Snapshot of the tree whose rules were read after `before`. Stamps the TLS files the rules name: call it
    before they are loaded."""
    directories = rules.directories()
    entries = {}
    for name, own in before.scan.entries.items():
        tls = stamps(tls_files(rules.root, name, directories.get(name)))
        entries[name] = Seen(own, tls, settled(own | tls, before.taken_ns))
    return Snapshot(entries, before.policy)


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
    """The rules in force, the settings their TLS files are loaded with, and the tree as they were read from it (None:
    not known, as for rules a watcher put in force: each entry is read again and compared)."""

    rules: RuleSet
    roots: Path | None
    insecure: bool
    first: Snapshot | None = None


@dataclass(frozen=True)
class PolicyWatched:
    """The policy in force, the root of the rules tree it was read from, and its file as it was then (None: not
    known, as for a policy a watcher put in force)."""

    root: Path
    policy: Policy
    first: Fingerprint | None = None


In_co = TypeVar("In_co", covariant=True)
Found_co = TypeVar("Found_co", covariant=True)
In = TypeVar("In")
Found = TypeVar("Found")


@dataclass(frozen=True)
class Looked(Generic[Found_co]):
    """What one look found to put in force (None: what is in force stays), and what to log."""

    found: Found_co | None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


class Watcher(Protocol[In_co, Found_co]):
    """What keep_live drives: files looked at (`path`, for the log) and what is in force from them."""

    @property
    def path(self) -> Path: ...

    @property
    def in_force(self) -> In_co: ...

    def changes(self) -> Looked[Found_co]:
        """Looks, and reads again what changed. Blocking: keep_live runs it on a thread."""
        ...


async def keep_live(
    watcher: Callable[[Watcher[In, Found] | None], Watcher[In, Found] | None],
    swap: Callable[[In, Found], None],
    interval: float,
) -> None:
    """Every `interval` seconds, looks at what `watcher(the last one)` watches (the same watcher while what it
    watches is in force, a new one when something else was put in force, None: nothing to watch); what it found
    goes in through `swap(what was in force when it looked, what it found)`. An error in either is logged naming the
    files and stops nothing: the next look starts afresh. Runs until cancelled."""
    current: Watcher[In, Found] | None = None
    while True:
        await asyncio.sleep(interval)
        current = watcher(current)
        if current is None:
            continue
        looked_at = current.in_force
        try:
            looked = await asyncio.to_thread(current.changes)
        except Exception:
            log.exception("ocigate: internal error looking at %s; what is in force stays", current.path)
            current = None
            continue
        for line in looked.warnings:
            log.warning("ocigate: %s", line)
        for line in looked.notes:
            log.info("ocigate: %s", line)
        if looked.found is None:
            continue
        try:
            swap(looked_at, looked.found)
        except Exception:
            log.exception("ocigate: internal error putting in force what %s holds now; what was stays", current.path)
            current = None


async def keep_rules_live(
    in_force: Callable[[], Watched | None],
    swap: Callable[[RuleSet, Reload], None],
    interval: float = INTERVAL,
) -> None:
    """Keeps the rules `in_force()` names (None: no rules) in step with their tree: when it changed,
    `swap(the rules looked at, the reload)` puts the new rules in force. Runs until cancelled."""

    def watcher(tree: Watcher[RuleSet, Reload] | None) -> Watcher[RuleSet, Reload] | None:
        watched = in_force()
        if watched is None:
            return None
        if tree is None or tree.in_force is not watched.rules:
            # Other rules were put in force (an option changed, or a swap was refused): their tree is new to us.
            first = watched.first.entries if watched.first is not None else None
            return RulesTree(watched.rules, roots=watched.roots, insecure=watched.insecure, first=first)
        return tree

    await keep_live(watcher, swap, interval)


class PolicyFile:
    """The rules tree's policy.toml, looked at like a registry directory: read again once two looks in a row find it
    changed and the same; a broken edit keeps the policy in force and is named once (file, key, reason). `seen`: the
    file as `in_force` was read from it (else as it is now)."""

    def __init__(self, root: Path, in_force: Policy, seen: Fingerprint | None = None) -> None:
        self.path = root / POLICY_FILE
        self.policy = in_force
        self._seen = stamps([self.path]) if seen is None else seen
        self._pending: Fingerprint | None = None
        self._broken: str | None = None

    @property
    def in_force(self) -> Policy:
        return self.policy

    def changes(self) -> Looked[Policy]:
        policy, lines = self.look()
        return Looked(policy, (), tuple(lines)) if policy is not None else Looked(None, tuple(lines))

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
    in_force: Callable[[], PolicyWatched | None],
    swap: Callable[[Policy, Policy], None],
    interval: float = INTERVAL,
) -> None:
    """Keeps the policy `in_force()` names (None: no rules) in step with its file: a new one goes in through
    `swap(the policy looked at, the new one)`. Runs until cancelled."""

    def watcher(file: Watcher[Policy, Policy] | None) -> Watcher[Policy, Policy] | None:
        current = in_force()
        if current is None:
            return None
        if file is None or file.in_force is not current.policy or file.path != current.root / POLICY_FILE:
            return PolicyFile(current.root, current.policy, current.first)
        return file

    await keep_live(watcher, swap, interval)
