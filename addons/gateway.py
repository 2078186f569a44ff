"""The script mitmproxy loads: `mitmdump -s addons/gateway.py --set ocigate_rules=rules`.

Works from a checkout without installing, and from an installed ocigate alike.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ocigate.addon import make_addons
from ocigate.oneentry import OneEntry

addons = [OneEntry(make_addons())]
