"""The `ocigate` command: mitmdump (or, as `ocigate web`, mitmweb) with the ocigate addons loaded (masters.py) and the
settings they depend on; its subcommands; and `--workers N`, the parent of N gateways (workers.py)."""

import os
import sys
from collections.abc import Sequence

# Only what the parent of `ocigate --workers N` needs, which starts and signals the workers: mitmproxy and the gateway
# (masters.py, worker.py) are imported by main() where a gateway runs (tests/test_workers.py checks).
from . import workers
from .workeridentity import ENVIRONMENT, Identity

USAGE_EXTRA = """
ocigate takes every mitmdump flag; `ocigate web` every mitmweb flag (--web-host, --web-port, ...) and shows the
flows in mitmweb's UI, each with ocigate's decision as its comment. Its own:
  --rules DIR      containerd hosts.toml tree (certs.d layout); same as --set ocigate_rules=DIR
  --workers N      N gateway processes sharing the listening address, the CA and the rules (not with `ocigate web`)
"""


def translate(argv: Sequence[str]) -> list[str]:
    """ocigate's command line as mitmdump's: --rules becomes an option, and the connection strategy is fixed."""
    out = ["--set", "connection_strategy=lazy"]
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--rules":
            if not args:
                raise SystemExit("ocigate: --rules needs a directory")
            out += ["--set", f"ocigate_rules={args.pop(0)}"]
        elif arg.startswith("--rules="):
            out += ["--set", f"ocigate_rules={arg.removeprefix('--rules=')}"]
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("login", "logout"):
        from . import login  # only here: the gateway itself never needs it

        raise SystemExit(login.main(argv))
    if argv and argv[0] == "report":
        from . import report  # only here: the gateway itself never needs it

        raise SystemExit(report.main(argv))
    if argv and argv[0] == "check":
        from . import check  # only here: the gateway itself never needs it

        raise SystemExit(check.main(argv))
    if argv and argv[0] == "explain":
        from . import explain  # only here: the gateway itself never needs it

        raise SystemExit(explain.main(argv))
    helping = "-h" in argv or "--help" in argv
    if helping:
        print(USAGE_EXTRA)
    web = bool(argv) and argv[0] == "web"
    count, argv = workers.split(argv[1:] if web else argv)
    if web:
        if count > 1:
            raise SystemExit(
                "ocigate web: --workers cannot be used with mitmweb's UI, which shows the flows of one process; "
                "run `ocigate --workers N` without it"
            )
        from . import masters

        masters.serve_web(translate(argv))
        return
    try:
        worker = Identity.from_environment(os.environ)
    except ValueError as e:
        raise SystemExit(f"ocigate: {e}") from None
    # Read once: what this worker starts (credential helpers) is no worker.
    os.environ.pop(ENVIRONMENT, None)
    if worker is None and count > 1 and not helping:
        raise SystemExit(workers.run(count, argv))
    from . import masters
    from .worker import follow_parent, label_output

    if worker is not None:
        follow_parent(worker)
        label_output(worker)
    masters.serve(translate(argv), worker)


if __name__ == "__main__":
    main()
