"""ComfyUI entry point of the Würstchen v2 node pack (V3 nodes via comfy_entrypoint).

Outside ComfyUI this does nothing, so tests and the CLI never import ComfyUI. There is deliberately
no NODE_CLASS_MAPPINGS: ComfyUI would take it and never call comfy_entrypoint.
"""

import os
import sys

# wuerstchen_core is imported absolutely by the node modules. Appending (not inserting) keeps
# ComfyUI's own top-level `nodes` module ahead of this pack's `nodes` package, which is only ever
# imported relatively from here.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

try:
    import comfy_api.latest  # noqa: F401  (present only when running inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes.comfy_host import WuerstchenExtension

    async def comfy_entrypoint() -> WuerstchenExtension:
        return WuerstchenExtension()
