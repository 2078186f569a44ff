"""`ocigate web`: the gateway's addons where the plain command runs them, ahead of what mitmweb shows."""

from mitmproxy.options import Options

from ocigate.masters import OcigateWebMaster


async def test_ocigate_web_runs_its_addons_before_mitmwebs_view_and_lists_each_flows_comment() -> None:
    master = OcigateWebMaster(Options())
    names = [type(addon).__name__ for addon in master.addons.chain]
    assert names.index("ProxyAuth") < names.index("ScriptLoader") < names.index("OneEntry")
    # The view (the flow list) and the UI's own addons see a flow after the gateway has published its record.
    assert names.index("OneEntry") < min(names.index("View"), names.index("Save"), names.index("WebAddon"))
    members = [type(addon).__name__ for addon in master.addons.get("ocigate").members]
    assert members.index("Gateway") < members.index("Redaction")
    assert master.options.web_columns[-1] == "comment"
